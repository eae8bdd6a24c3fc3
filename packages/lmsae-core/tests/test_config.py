"""Typed configs: strict structuring, located errors, tags, files and overrides."""

from __future__ import annotations

import json
import pathlib
from typing import ClassVar, Literal

import pytest

from lmsae.config import DictionaryConfig, RunConfig, config_class, option
from lmsae.config.fields import field_doc, positive, steps_or_fraction
from lmsae.config.files import apply_overrides, dumps_toml, parse_override_value, read_config_file
from lmsae.errors import ConfigError
from lmsae.hookspecs import hookimpl
from lmsae.records import TaskSpec
from lmsae.registry import load_registry
from lmsae.testing.plugins import fake_entry_points, module


@config_class
class Inner:
    """A nested table."""

    rate: float = option(1.0, doc="A rate.", validator=positive())
    mode: Literal["fast", "slow"] = option("fast", doc="A mode.")


@config_class
class DemoRun(RunConfig):
    """A run config used only by these tests."""

    name: ClassVar[str] = "demo"
    dictionary: DictionaryConfig = option(doc="The dictionary.")
    steps: int = option(10, doc="Steps.")
    warmup: int | float = option(0.1, doc="Warmup.", validator=steps_or_fraction())
    flag: bool = option(False, doc="A flag.")
    inner: Inner = option(factory=Inner, doc="Nested.")
    hooks: list[str] = option(factory=list, doc="Hooks.")
    weights: dict[str, float] = option(factory=dict, doc="Weights.")
    maybe: int | None = option(None, doc="Optional.")
    pair: tuple[float, float] = option((0.9, 0.99), doc="A pair.")


@hookimpl
def lmsae_register_tasks():
    return [TaskSpec(config_class=DemoRun, factory=lambda c, ctx: None)]


@pytest.fixture
def registry(monkeypatch):
    fake_entry_points(monkeypatch, [])
    return load_registry(plugins=["lmsae.testing.toy", module("demo_tasks", lmsae_register_tasks=lmsae_register_tasks)])


def good() -> dict:
    return {"task": "demo", "dictionary": {"architecture": "toy", "hook_point": "h", "d_model": 4, "n_latents": 8}}


def problems(registry, data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        registry.structure(data, RunConfig)
    return info.value.problems


def test_valid_config_structures_and_round_trips(registry):
    cfg = registry.structure({**good(), "hooks": ["a"], "weights": {"x.y": 2}, "warmup": 5}, RunConfig)
    assert isinstance(cfg, DemoRun) and cfg.dictionary.name == "toy" and cfg.warmup == 5
    data = registry.unstructure(cfg)
    assert data["task"] == "demo" and data["dictionary"]["architecture"] == "toy"
    assert registry.structure(json.loads(json.dumps(data)), RunConfig) == cfg


def test_misspelt_key_names_path_and_closest_key(registry):
    data = good()
    data["dictionary"]["n_latent"] = 3
    data["stepz"] = 1
    out = problems(registry, data)
    assert any(p.startswith("$.dictionary.n_latent: unknown key; did you mean 'n_latents'?") for p in out)
    assert any(p.startswith("$.stepz: unknown key; did you mean 'steps'?") for p in out)


def test_unknown_tag_lists_installed_choices(registry):
    data = good()
    data["dictionary"]["architecture"] = "toi"
    (p,) = problems(registry, data)
    assert p.startswith("$.dictionary.architecture: unknown architecture 'toi'; installed architectures: sae, toy")
    assert "did you mean 'toy'" in p


def test_unknown_task_and_missing_task(registry):
    assert problems(registry, {**good(), "task": "dmeo"})[0].startswith("$.task: unknown task 'dmeo'")
    data = good()
    del data["task"]
    assert problems(registry, data)[0].startswith("$.task: missing key; installed tasks: analyze, attribute-logits, autointerp, demo, evaluate, generate, init, sweep, train")


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("steps", 1.5, "$.steps: expected an integer, got float 1.5"),
    ("steps", "3", "$.steps: expected an integer, got str '3'"),
    ("steps", True, "$.steps: expected an integer, got bool True"),
    ("flag", 1, "$.flag: expected a boolean (true/false), got int 1"),
    ("hooks", ["a", 2], "$.hooks[1]: expected a string, got int 2"),
    ("weights", {"a": "x"}, "$.weights.a: expected a number, got str 'x'"),
    ("inner", {"mode": "quick"}, "$.inner.mode: expected one of 'fast', 'slow', got 'quick'"),
    ("inner", {"rate": -1}, "$.inner.rate: must be > 0, got -1.0"),
    ("warmup", 2.5, "$.warmup: must be an int >= 0 (steps) or a float in [0, 1]"),
    ("inner", 3, "$.inner: expected a table"),
    # containers of the wrong shape: a typed message, no raw AttributeError, no string taken as
    # the array of its characters nor a table as the array of its keys
    ("inner", "", "$.inner: expected a table, got str ''"),
    ("inner", [1], "$.inner: expected a table, got an array"),
    ("weights", "", "$.weights: expected a table, got str ''"),
    ("weights", ["a"], "$.weights: expected a table, got an array"),
    ("hooks", "abc", "$.hooks: expected an array, got str 'abc'"),
    ("hooks", {"a": 1}, "$.hooks: expected an array, got a table"),
    ("pair", 0.5, "$.pair: expected an array, got float 0.5"),
    ("pair", [0.5], "$.pair: expected an array of 2 values (a number, a number), got 1: [0.5]"),
])
def test_wrong_types_name_path_and_expected_type(registry, key, value, expected):
    out = problems(registry, {**good(), key: value})
    assert any(p.startswith(expected) for p in out), out


def test_empty_override_of_a_table_names_the_key_and_the_expected_type(registry):
    # `lmsae config check FILE --set inner=`: the value is the empty string
    assert problems(registry, apply_overrides(good(), ["inner="])) == ["$.inner: expected a table, got str ''"]


def test_every_problem_is_reported_at_once(registry):
    data = {**good(), "steps": "x", "flag": "y", "bogus": 1}
    del data["dictionary"]["d_model"]
    out = problems(registry, data)
    assert len(out) == 4
    assert "$.dictionary.d_model: required key missing (expected an integer)" in out


def test_lenient_where_harmless(registry):
    cfg = registry.structure({**good(), "steps": 1e6, "inner": {"rate": "1e-3"}, "maybe": None}, RunConfig)
    assert cfg.steps == 1_000_000 and cfg.inner.rate == 1e-3 and cfg.maybe is None


def test_every_option_has_a_docstring():
    import attrs

    for cls in (DemoRun, Inner):
        for f in attrs.fields(cls):
            assert field_doc(f)
    with pytest.raises(ValueError, match="docstring"):
        option(1, doc=" ")


def test_files_toml_yaml_json(tmp_path: pathlib.Path, registry):
    data = good()
    (tmp_path / "a.toml").write_text(dumps_toml(data))
    (tmp_path / "a.json").write_text(json.dumps(data))
    import yaml

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(data))
    for name in ("a.toml", "a.json", "a.yaml"):
        assert read_config_file(tmp_path / name) == data


def test_file_errors_are_config_errors(tmp_path: pathlib.Path):
    with pytest.raises(ConfigError, match="file not found"):
        read_config_file(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("x = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(tmp_path / "bad.toml")
    (tmp_path / "x.ini").write_text("")
    with pytest.raises(ConfigError, match="unsupported config file type '.ini'"):
        read_config_file(tmp_path / "x.ini")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ConfigError, match="table/mapping at the top"):
        read_config_file(tmp_path / "list.json")


def test_overrides():
    data = {"trainer": {"lr": 1.0}, "sources": [{"w": 1}]}
    out = apply_overrides(data, ["trainer.lr=1e-3", "sources.0.w=2", "new.key=\"s\"", "flag=true", "raw=abc"])
    assert out == {"trainer": {"lr": 1e-3}, "sources": [{"w": 2}], "new": {"key": "s"}, "flag": True, "raw": "abc"}
    assert data["trainer"]["lr"] == 1.0  # the input is not modified
    assert parse_override_value("[1, 2]") == [1, 2]
    with pytest.raises(ConfigError) as info:
        apply_overrides(data, ["trainer.lr.x=1", "sources.5.w=1", "noequals"])
    msgs = info.value.problems
    assert any(m.startswith("$.trainer.lr: --set 'trainer.lr.x=1': is a float, not a table") for m in msgs)
    assert any("index 5 out of range" in m for m in msgs)
    assert any("expected KEY.PATH=VALUE" in m for m in msgs)


# --- the generated reference -----------------------------------------------------------------


def _reference_sections(registry) -> dict[str, str]:
    """The reference's sections by heading (``task `demo```, ``SweepItemConfig`` ...)."""
    from lmsae.config.reference import render_reference

    return {chunk.split("\n", 1)[0]: chunk for chunk in render_reference(registry).split("\n### ")[1:]}


def test_reference_documents_fields_called_name(registry):
    sections = _reference_sections(registry)
    # a sweep item's name and a Hub dataset's configuration name are keys users write
    assert "| `name` | `str` | **required** | Name of the item:" in sections["SweepItemConfig"]
    assert "| `name` | `str \\| None` | unset | Configuration (subset) of a Hub dataset" in sections["DatasetConfig"]
    # a component's tag is not a key row: it is in the component's heading line
    assert '(`task = "demo"`, from ' in sections["task `demo`"]
    assert '(`architecture = "toy"`, from ' in sections["architecture `toy`"]
    assert "| `name` |" not in sections["task `demo`"] + sections["architecture `toy`"]


def test_reference_default_of_a_nested_table_names_it(registry):
    sections = _reference_sections(registry)
    assert "`` defaults" not in "".join(sections.values())
    assert "| `inner` | `Inner` | `[inner]` defaults |" in sections["task `demo`"]
    assert "| `explainer` | `ExplainerConfig` | `[explainer]` defaults |" in sections["task `autointerp`"]
    # a component's default also names the tag that chooses it
    assert '| `writer` | `WriterConfig` | `[writer]` defaults (`format = "safetensors"`) |' in sections["task `generate`"]
    assert "| `loggers` | `list[LoggerConfig]` | [`console`, `jsonl`] |" in sections["task `train`"]
