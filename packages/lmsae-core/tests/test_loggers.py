"""Metric loggers: console lines, JSON lines (NaN, resume, summary), W&B offline, combinators."""

from __future__ import annotations

import io
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from tqdm import tqdm

from lmsae.config.fields import FieldValueError, field_doc
from lmsae.errors import DataError, LmsaeError
from lmsae.logging import (
    LOGGER_SPECS,
    SUMMARY_FILE,
    WANDB_RUN_ID_FILE,
    ConsoleLogger,
    ConsoleLoggerConfig,
    JsonlLogger,
    JsonlLoggerConfig,
    LoggerContext,
    MetricLogger,
    MultiLogger,
    NullLogger,
    WandbLogger,
    WandbLoggerConfig,
    format_console_value,
    make_console_logger,
    make_jsonl_logger,
    make_wandb_logger,
    read_jsonl_metrics,
)
from lmsae.records import LoggerSpec
from lmsae.testing.plugins import module

STEP_METRICS = {
    "losses/overall_loss": 0.12341,
    "metrics/explained_variance": 0.81234,
    "metrics/l0": 48.23,
    "metrics/dead_fraction": 0.0,
    "details/current_learning_rate": 4e-4,
    "sparsity/above_1e-2": 0.25,
}


def ctx(tmp_path, *, resume=False, rank=0, **kw):
    return LoggerContext(output_dir=tmp_path, run_name="test-run", config={"seed": 1}, resume=resume, rank=rank,
                         **kw)


# --------------------------------------------------------------------------------------------
# specs and configs


def test_specs_cover_the_three_loggers_and_every_field_is_documented():
    assert all(isinstance(s, LoggerSpec) for s in LOGGER_SPECS)
    assert [s.name for s in LOGGER_SPECS] == ["console", "jsonl", "wandb"]
    import attrs

    for spec in LOGGER_SPECS:
        assert spec.summary and spec.config_class.__doc__
        for f in attrs.fields(spec.config_class):
            assert field_doc(f), f"{spec.name}.{f.name} has no docstring"


def test_config_defaults_and_validation():
    assert ConsoleLoggerConfig().keys is None and ConsoleLoggerConfig().precision == 4
    assert JsonlLoggerConfig().path == "metrics.jsonl"
    w = WandbLoggerConfig()
    assert (w.project, w.entity, w.run_name, w.mode, w.tags, w.resume_id) == ("lmsae", None, None, None, [], None)
    with pytest.raises(FieldValueError):
        ConsoleLoggerConfig(keys=[])
    with pytest.raises(FieldValueError):
        ConsoleLoggerConfig(precision=-1)
    with pytest.raises(FieldValueError):
        JsonlLoggerConfig(path="")
    with pytest.raises(FieldValueError):
        WandbLoggerConfig(mode="online-ish")
    with pytest.raises(FieldValueError):
        WandbLoggerConfig(resume_id="a/b")


def test_configs_structure_from_plain_data_through_the_registry():
    from lmsae.config.base import LoggerConfig
    from lmsae.hookspecs import hookimpl
    from lmsae.registry import Registry

    # a registry holding only these loggers (independent of what the core plugin registers)
    reg = Registry()
    reg.add_plugin(module("test_loggers_plugin", lmsae_register_loggers=hookimpl(lambda: list(LOGGER_SPECS))))
    cfg = reg.structure({"type": "wandb", "mode": "offline", "tags": ["a"]}, LoggerConfig)
    assert cfg == WandbLoggerConfig(mode="offline", tags=["a"])
    assert reg.structure(reg.unstructure(cfg), LoggerConfig) == cfg
    assert reg.structure({"type": "console", "keys": ["metrics/l0"]}, LoggerConfig) == ConsoleLoggerConfig(
        keys=["metrics/l0"])


# --------------------------------------------------------------------------------------------
# console


def test_console_line_format():
    out = io.StringIO()
    ConsoleLogger(stream=out).log(1200, STEP_METRICS)
    assert out.getvalue() == "step 1200 | loss 0.1234 | ev 0.8123 | l0 48.2 | dead 0.0% | lr 4.0e-04\n"


def test_console_selected_keys_precision_missing_and_non_finite_values():
    out = io.StringIO()
    logger = ConsoleLogger(ConsoleLoggerConfig(keys=["sparsity/above_1e-2", "losses/overall_loss", "nope"],
                                               precision=2), stream=out)
    logger.log(5, {"sparsity/above_1e-2": 0.25, "losses/overall_loss": float("nan")})
    logger.log(6, {"unrelated": 1.0})  # none of the keys: no line
    logger.log(7, {"losses/overall_loss": torch.tensor(0.5), "sparsity/above_1e-2": np.float32(1e-5)})
    assert out.getvalue().splitlines() == [
        "step 5 | above_1e-2 0.25 | loss nan",
        "step 7 | above_1e-2 1.0e-05 | loss 0.50",
    ]


def test_console_value_formats():
    assert format_console_value("metrics/dead_fraction", 0.125) == "12.5%"
    assert format_console_value("details/current_learning_rate", 3e-3) == "3.0e-03"
    assert format_console_value("metrics/l0", 7) == "7"
    assert format_console_value("losses/x", float("-inf")) == "-inf"
    assert format_console_value("losses/x", 2.5e7) == "2.500e+07"
    assert format_console_value("info/name", "abc") == "abc"


def test_console_goes_through_tqdm_write_and_keeps_the_progress_bar_intact():
    out = io.StringIO()
    logger = ConsoleLogger(stream=out)
    with tqdm(total=10, file=out, mininterval=0, miniters=1, ascii=True) as bar:
        bar.update(3)
        logger.log(3, {"losses/overall_loss": 1.0})
        bar.update(1)
    text = out.getvalue()
    # tqdm.write clears the bar line ("\r   \r"), prints the line on its own, then redraws the bar
    i = text.index("step 3 | loss 1.0000\n")
    assert text[:i].endswith("\r") and "3/10" in text[:i]
    assert "4/10" in text[i:]


def test_console_default_stream_is_stdout_at_write_time(capsys):
    logger = make_console_logger(ConsoleLoggerConfig(), LoggerContext(output_dir=None))
    logger.log(1, {"metrics/l0": 10.0})
    assert capsys.readouterr().out == "step 1 | l0 10.0\n"


def test_console_summary_is_off_by_default():
    out = io.StringIO()
    with ConsoleLogger(stream=out) as logger:
        logger.log_summary({"losses/overall_loss": 0.1})
    assert out.getvalue() == ""


def test_console_summary_is_an_aligned_table():
    out = io.StringIO()
    with ConsoleLogger(ConsoleLoggerConfig(summary=True), stream=out) as logger:
        logger.log_summary({"losses/overall_loss": 0.1, "metrics": {"l0": 31.0}, "tokens": 100000})
        logger.log_summary({})
    assert out.getvalue().splitlines() == [
        "final values:",
        "  losses/overall_loss  0.1000",
        "  metrics/l0             31.0",
        "  tokens               100000",
    ]


# --------------------------------------------------------------------------------------------
# jsonl


def test_jsonl_lines_nan_as_null_and_flush(tmp_path):
    logger = make_jsonl_logger(JsonlLoggerConfig(), ctx(tmp_path))
    logger.log(1, {"losses/overall_loss": 0.5, "metrics/l0": torch.tensor(3.0)})
    # flushed at each call: readable before close
    assert read_jsonl_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "losses/overall_loss": 0.5,
                                                               "metrics/l0": 3.0}]
    logger.log(2, {"a": float("nan"), "b": float("inf"), "c": np.float64(-np.inf), "d": 7})
    logger.close()
    logger.close()  # idempotent
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 2, "a": None, "b": None, "c": None, "d": 7}
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    with pytest.raises(ValueError, match="closed"):
        logger.log(3, {"a": 1.0})


def test_jsonl_rejects_a_metric_called_step_and_unserialisable_values(tmp_path):
    with JsonlLogger(tmp_path / "m.jsonl") as logger:
        with pytest.raises(ValueError, match="step"):
            logger.log(1, {"step": 1.0})
        with pytest.raises(TypeError, match="weird"):
            logger.log(1, {"weird": object()})
    assert (tmp_path / "m.jsonl").read_text() == ""


def test_jsonl_new_run_truncates_existing_file_and_stale_summary(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n')
    (tmp_path / SUMMARY_FILE).write_text('{"old": 1}')
    logger = make_jsonl_logger(JsonlLoggerConfig(), ctx(tmp_path, resume=False))
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # truncated right away
    assert not (tmp_path / SUMMARY_FILE).exists()
    logger.log(1, {"x": 10.0})
    logger.close()
    assert read_jsonl_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "x": 10.0}]


def test_jsonl_resume_drops_relogged_steps_without_duplicates(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    with make_jsonl_logger(JsonlLoggerConfig(path="sub/m.jsonl"), ctx(tmp_path)) as first:
        for step in (10, 20, 30, 40):
            first.log(step, {"x": float(step)})
    with open(path, "ab") as f:  # a crash during a write left a torn line
        f.write(b'{"step": 50, "x"')

    # the checkpoint was at step 20: the resumed run logs 30, 40, ... again
    second = make_jsonl_logger(JsonlLoggerConfig(path="sub/m.jsonl"), ctx(tmp_path, resume=True))
    assert len(path.read_text().splitlines()) == 5  # untouched until the first log call
    second.log(30, {"x": 300.0})
    second.log(40, {"x": 400.0})
    second.close()
    records = read_jsonl_metrics(path)
    assert [(r["step"], r["x"]) for r in records] == [(10, 10.0), (20, 20.0), (30, 300.0), (40, 400.0)]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_jsonl_resume_without_logging_keeps_the_file_and_creates_a_missing_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 1}\n')
    make_jsonl_logger(JsonlLoggerConfig(), ctx(tmp_path, resume=True)).close()
    assert path.read_text() == '{"step": 1, "x": 1}\n'
    path.unlink()
    with make_jsonl_logger(JsonlLoggerConfig(), ctx(tmp_path, resume=True)) as logger:
        logger.log(5, {"x": 1.0})
    assert read_jsonl_metrics(path) == [{"step": 5, "x": 1.0}]


def test_jsonl_summary_is_written_atomically_and_merged(tmp_path, monkeypatch):
    logger = make_jsonl_logger(JsonlLoggerConfig(), ctx(tmp_path))
    logger.log_summary({"final/loss": 0.25, "ev": float("nan"), "nested": {"a": (1, 2)}, "path": tmp_path})
    summary_path = tmp_path / SUMMARY_FILE
    assert json.loads(summary_path.read_text()) == {"final/loss": 0.25, "ev": None, "nested": {"a": [1, 2]},
                                                    "path": str(tmp_path)}

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        logger.log_summary({"final/loss": 9.0})
    monkeypatch.undo()
    # the previous summary is intact and no temporary file is left behind
    assert json.loads(summary_path.read_text())["final/loss"] == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", SUMMARY_FILE]

    logger.log_summary({"tokens": 10})
    logger.close()
    assert json.loads(summary_path.read_text())["tokens"] == 10
    assert json.loads(summary_path.read_text())["final/loss"] == 0.25

    # a resumed run keeps updating the existing summary
    with make_jsonl_logger(JsonlLoggerConfig(), ctx(tmp_path, resume=True)) as resumed:
        resumed.log_summary({"tokens": 20})
    assert json.loads(summary_path.read_text())["final/loss"] == 0.25
    assert json.loads(summary_path.read_text())["tokens"] == 20


def test_jsonl_path_resolution(tmp_path):
    with pytest.raises(LmsaeError, match="absolute"):
        make_jsonl_logger(JsonlLoggerConfig(), LoggerContext(output_dir=None))
    absolute = tmp_path / "elsewhere" / "m.jsonl"
    with make_jsonl_logger(JsonlLoggerConfig(path=str(absolute)), LoggerContext(output_dir=None)) as logger:
        logger.log(0, {"x": 1.0})
    assert read_jsonl_metrics(absolute) == [{"step": 0, "x": 1.0}]


def test_read_jsonl_metrics_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl_metrics(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        read_jsonl_metrics(bad)
    bad.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="JSON object"):
        read_jsonl_metrics(bad)


# --------------------------------------------------------------------------------------------
# wandb


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    return tmp_path


def _run_dirs(tmp_path):
    return sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_offline_writes_run_files_and_id_and_resume_reuses_it(wandb_env):
    tmp_path = wandb_env
    config = WandbLoggerConfig(tags=["test"])
    with make_wandb_logger(config, ctx(tmp_path)) as logger:
        assert isinstance(logger, WandbLogger)
        logger.log(1, {"losses/overall_loss": 0.5, "metrics/l0": float("nan")})
        logger.log_summary({"final/loss": 0.5})
        run_id = logger.run.id
        assert logger.run.name == "test-run"
    assert json.loads((tmp_path / WANDB_RUN_ID_FILE).read_text())["run_id"] == run_id
    dirs = _run_dirs(tmp_path)
    assert len(dirs) == 1 and dirs[0].endswith(run_id)
    assert (tmp_path / "wandb" / dirs[0] / f"run-{run_id}.wandb").is_file()

    with make_wandb_logger(config, ctx(tmp_path, resume=True)) as resumed:
        assert resumed.run.id == run_id
        resumed.log(2, {"losses/overall_loss": 0.4})
    assert json.loads((tmp_path / WANDB_RUN_ID_FILE).read_text())["run_id"] == run_id

    # a new (not resumed) run gets a new id, recorded in place of the old one
    with make_wandb_logger(config, ctx(tmp_path, resume=False)) as fresh:
        new_id = fresh.run.id
    assert new_id != run_id
    assert json.loads((tmp_path / WANDB_RUN_ID_FILE).read_text())["run_id"] == new_id


def test_wandb_explicit_resume_id_wins_and_bad_id_file_is_reported(wandb_env):
    tmp_path = wandb_env
    (tmp_path / WANDB_RUN_ID_FILE).write_text("{not json")
    with pytest.raises(LmsaeError, match=WANDB_RUN_ID_FILE):
        make_wandb_logger(WandbLoggerConfig(), ctx(tmp_path, resume=True))
    logger = make_wandb_logger(WandbLoggerConfig(resume_id="myrun123", mode="offline"), ctx(tmp_path, resume=True))
    try:
        assert logger.run.id == "myrun123"
    finally:
        logger.close()
    assert json.loads((tmp_path / WANDB_RUN_ID_FILE).read_text())["run_id"] == "myrun123"


def test_wandb_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(LmsaeError, match="pip install wandb"):
        make_wandb_logger(WandbLoggerConfig(), ctx(tmp_path))


def test_wandb_logger_forwards_calls_and_marks_failed_runs():
    calls = []

    class FakeRun:
        summary = types.SimpleNamespace(update=lambda d: calls.append(("summary", d)))

        def log(self, metrics, step):
            calls.append(("log", step, metrics))

        def finish(self, exit_code=0):
            calls.append(("finish", exit_code))

    with pytest.raises(RuntimeError):
        with WandbLogger(FakeRun()) as logger:
            logger.log(3, {"a": 1.0})
            logger.log_summary({"b": 2})
            raise RuntimeError("boom")
    logger.close()  # already finished: no second finish
    assert calls == [("log", 3, {"a": 1.0}), ("summary", {"b": 2}), ("finish", 1)]


# --------------------------------------------------------------------------------------------
# rank, null and multi


@pytest.mark.parametrize("spec", LOGGER_SPECS, ids=lambda s: s.name)
def test_every_factory_returns_a_null_logger_on_other_ranks(spec, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # rank != 0 must not even need wandb
    logger = spec.factory(spec.config_class(), ctx(tmp_path, rank=1))
    assert isinstance(logger, NullLogger)
    with logger:
        logger.log(1, {"x": 1.0})
        logger.log_summary({"x": 1.0})
    assert list(tmp_path.iterdir()) == []


class Recorder(MetricLogger):
    def __init__(self, name, events, fail_on=()):
        self.name, self.events, self.fail_on = name, events, set(fail_on)

    def _do(self, what, *args):
        self.events.append((self.name, what, *args))
        if what in self.fail_on:
            raise RuntimeError(f"{self.name} {what} failed")

    def log(self, step, metrics):
        self._do("log", step)

    def log_summary(self, summary):
        self._do("summary")

    def close(self):
        self._do("close")


def test_multilogger_fans_out_and_closes_all_even_when_one_fails():
    events = []
    a = Recorder("a", events, fail_on={"close", "log"})
    b = Recorder("b", events, fail_on={"close"})
    c = Recorder("c", events)
    multi = MultiLogger([a, b, c])
    with pytest.raises(RuntimeError, match="a log failed"):
        multi.log(1, {"x": 1.0})
    multi.log_summary({"x": 1.0})
    with pytest.raises(RuntimeError, match="a close failed") as info:
        multi.close()
    assert any("b failed" in note or "b close failed" in note for note in info.value.__notes__)
    assert events == [("a", "log", 1), ("b", "log", 1), ("c", "log", 1),
                      ("a", "summary"), ("b", "summary"), ("c", "summary"),
                      ("a", "close"), ("b", "close"), ("c", "close")]


def test_multilogger_as_context_manager_closes_everything():
    events = []
    with pytest.raises(RuntimeError, match="a close failed"):
        with MultiLogger([Recorder("a", events, fail_on={"close"}), Recorder("b", events)]) as multi:
            multi.log(4, {})
    assert events == [("a", "log", 4), ("b", "log", 4), ("a", "close"), ("b", "close")]
    with MultiLogger([]) as empty:  # no logger at all is fine
        empty.log(1, {"x": math.pi})
