"""The sweep task: several dictionaries trained in lockstep on one activation stream.

The key property: each item's saved dictionary (and metrics) is bit-identical to a separate
``task = "train"`` run of that item (:func:`lmsae.tasks.sweep.item_train_config`) on the same
stream, while the stream is read once per batch for all items.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pathlib
import subprocess
import sys
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file

import lmsae.tasks.sweep as sweep_module
import lmsae.tasks.train as train_module
from lmsae.config import config_class
from lmsae.config.base import RunConfig
from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder, sae_example_config, sae_sharding_rules
from lmsae.errors import ConfigError, DataError
from lmsae.hookspecs import hookimpl
from lmsae.logging.loggers import read_jsonl_metrics
from lmsae.records import ArchitectureSpec
from lmsae.registry import load_registry
from lmsae.runtime import RunContext
from lmsae.tasks.sweep import item_train_config
from lmsae.testing.plugins import module

HOOK = "blocks.0.hook_resid_post"
HOOK_OUT = "blocks.0.hook_mlp_out"
D = 16
BATCH = 128


def _dictionary(**kw: Any) -> dict[str, Any]:
    return {"architecture": "sae", "hook_point_in": HOOK, "d_model": D, "expansion_factor": 4.0, "act_fn": "topk",
            "top_k": 4, **kw}


def _source(**kw: Any) -> dict[str, Any]:
    return {"type": "synthetic", "d_model": D, "n_features": 32, "mean_active": 3.0, "hook_point": HOOK,
            "hook_point_out": HOOK_OUT, "batch_size": BATCH, "seed": 7, **kw}


def sweep_config(out: pathlib.Path, items: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {
        "task": "sweep",
        "output_dir": str(out),
        "device": "cpu",
        "loggers": [{"type": "jsonl"}, {"type": "console"}],
        "activations": {"batch_size": BATCH, "shuffle_buffer": 4 * BATCH, "sources": [_source()]},
        "eval_activations": {"batch_size": BATCH, "prefetch": 0, "sources": [_source(seed=8, n_batches=8)]},
        "trainer": {"total_training_tokens": 40 * BATCH, "lr": 4e-3, "log_every": 8, "lr_warmup_steps": 0,
                    "calibration_batches": 4, "eval_every": 16, "eval_tokens": 3 * BATCH},
        "items": items,
        **top,
    }


#: three items: a TopK SAE; a k-annealed SAE with its own lr, AuxK and a shorter budget; a transcoder
#: reading a second hook point (the stream then provides both hook points to everyone)
ITEMS = [
    {"name": "k4", "dictionary": _dictionary()},
    {"name": "k2-lr1e-2", "dictionary": _dictionary(top_k=2),
     "trainer": {"lr": 1e-2, "initial_k": 8, "k_warmup_steps": 10, "auxk_coefficient": 0.03,
                 "dead_threshold_tokens": 4 * BATCH, "total_training_tokens": 23 * BATCH},
     "initializer": {"decoder_bias": "mean", "seed": 3}},
    {"name": "transcoder", "dictionary": _dictionary(hook_point_out=HOOK_OUT, top_k=3),
     "trainer": {"eval_tokens": 5 * BATCH}},
]


def _registry(*plugins: Any):
    return load_registry(entry_points=False, plugins=list(plugins))


def _run(registry, data: dict[str, Any], out: io.StringIO | None = None):
    cfg = registry.structure(data, RunConfig)
    return registry.get("task", cfg.name).factory(cfg, RunContext(registry=registry, out=out or io.StringIO(),
                                                                  progress=False))


class _Counted:
    """A stream that counts the batches taken from it."""

    def __init__(self, stream: Any, record: dict[str, Any]):
        self._stream, self._record = stream, record

    def __iter__(self):
        for batch in self._stream:
            self._record["batches"] += 1
            yield batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _counting(monkeypatch, module_, log: list[dict[str, Any]]) -> None:
    """Count the streams ``module_`` builds and the batches read from each."""
    real = module_.stream_builder

    def builder(registry, activations, hook_points, **kw):
        make = real(registry, activations, hook_points, **kw)

        def counted_make():
            record = {"activations": activations, "batches": 0}
            log.append(record)
            return _Counted(make(), record)

        return counted_make

    monkeypatch.setattr(module_, "stream_builder", builder)


@pytest.fixture(scope="module")
def lockstep(tmp_path_factory):
    """One 3-item sweep and the three separate train runs of its items, with stream counts."""
    root = tmp_path_factory.mktemp("sweep")
    registry = _registry()
    data = sweep_config(root / "sweep", copy.deepcopy(ITEMS))
    sweep_reads: list[dict[str, Any]] = []
    train_reads: dict[str, list[dict[str, Any]]] = {}
    with pytest.MonkeyPatch.context() as mp:
        _counting(mp, sweep_module, sweep_reads)
        console = io.StringIO()
        summary = _run(registry, data, console)
    cfg = registry.structure(data, RunConfig)
    for i, item in enumerate(cfg.items):
        train_cfg = item_train_config(cfg, i)
        plain = registry.unstructure(train_cfg)
        plain["output_dir"] = str(root / "train" / item.name)
        train_reads[item.name] = []
        with pytest.MonkeyPatch.context() as mp:
            _counting(mp, train_module, train_reads[item.name])
            _run(registry, plain)
    return {"root": root, "cfg": cfg, "summary": summary, "console": console.getvalue(),
            "sweep_reads": sweep_reads, "train_reads": train_reads, "registry": registry}


@pytest.mark.parametrize("name", [item["name"] for item in ITEMS])
def test_each_item_is_bit_identical_to_its_own_train_run(lockstep, name):
    sweep_dir, train_dir = lockstep["root"] / "sweep" / name, lockstep["root"] / "train" / name
    a, b = load_file(sweep_dir / "sae_weights.safetensors"), load_file(train_dir / "sae_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}: {key} differs from the separate train run"
    assert json.loads((sweep_dir / "config.json").read_text()) == json.loads((train_dir / "config.json").read_text())
    # the metrics (periodic held-out evaluations included) are the same, line for line
    assert read_jsonl_metrics(sweep_dir / "metrics.jsonl") == read_jsonl_metrics(train_dir / "metrics.jsonl")
    s, t = (json.loads((d / "training_summary.json").read_text()) for d in (sweep_dir, train_dir))
    for volatile in ("seconds", "tokens_per_second"):
        s.pop(volatile), t.pop(volatile)
    assert s == t
    # the item's run_config.json is the train config that reproduces it
    run_config = json.loads((sweep_dir / "run_config.json").read_text())
    assert run_config["task"] == "train" and run_config["output_dir"] == str(sweep_dir)


def test_the_stream_is_read_once_per_batch_for_all_items(lockstep):
    cfg = lockstep["cfg"]
    steps = {it.name: cfg.item_trainer(i).total_training_tokens // BATCH for i, it in enumerate(cfg.items)}
    train_stream = [r for r in lockstep["sweep_reads"] if r["activations"] == cfg.activations]
    eval_stream = [r for r in lockstep["sweep_reads"] if r["activations"] == cfg.eval_activations]
    # one calibration pass (the largest calibration_batches) and one training pass, whatever the item count
    assert [r["batches"] for r in train_stream] == [4, max(steps.values())]
    # held-out batches: one stream, read up to the largest eval_tokens, replayed to every evaluation
    assert len(eval_stream) == 1 and eval_stream[0]["batches"] == 5
    # a separate train run reads its own calibration and training batches (3 runs: 3x the stream)
    for name, reads in lockstep["train_reads"].items():
        training = [r["batches"] for r in reads if r["activations"] == cfg.activations]
        assert training == [4, steps[name]]
    separate = sum(r["batches"] for reads in lockstep["train_reads"].values() for r in reads
                   if r["activations"] == cfg.activations)
    assert separate == 3 * 4 + sum(steps.values())
    stream = lockstep["summary"]["stream"]
    assert stream["batches"] == max(steps.values()) and stream["tokens"] == max(steps.values()) * BATCH


def test_items_with_different_budgets_stop_independently(lockstep):
    root, summary = lockstep["root"] / "sweep", lockstep["summary"]
    rows = {r["name"]: r for r in summary["items"]}
    assert rows["k4"]["steps"] == 40 and rows["transcoder"]["steps"] == 40
    assert rows["k2-lr1e-2"]["steps"] == 23 and rows["k2-lr1e-2"]["tokens"] == 23 * BATCH
    assert all(r["reason"] == "completed" for r in rows.values())
    assert read_jsonl_metrics(root / "k2-lr1e-2" / "metrics.jsonl")[-1]["step"] == 23
    assert summary["dictionary_tokens"] == (40 + 23 + 40) * BATCH
    on_disk = json.loads((root / "sweep_summary.json").read_text())
    assert [r["name"] for r in on_disk["items"]] == ["k4", "k2-lr1e-2", "transcoder"]
    # console lines carry the item's name; the shorter item is saved before the others finish
    console = lockstep["console"]
    assert "[k2-lr1e-2] step 8 |" in console and "[transcoder] step 40 |" in console
    assert console.index("[k2-lr1e-2] trained 23 steps") < console.index("[k4] step 24 |")
    sweep_config = json.loads((root / "run_config.json").read_text())
    assert sweep_config["task"] == "sweep" and len(sweep_config["items"]) == 3


# --- configuration errors ---------------------------------------------------------------------


def _problems(registry, data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        _run(registry, data)
    return err.value.problems


def test_config_errors_name_the_item(tmp_path):
    registry = _registry()
    assert _problems(registry, sweep_config(tmp_path, [])) == [
        "$.items: a sweep needs at least one item ([[items]] tables with a name and a [items.dictionary])"]
    dup = _problems(registry, sweep_config(tmp_path, [{"name": "a", "dictionary": _dictionary()},
                                                      {"name": "b", "dictionary": _dictionary()},
                                                      {"name": "A", "dictionary": _dictionary()}]))
    assert len(dup) == 1 and dup[0].startswith("$.items[2].name: duplicate item name 'A' (also $.items[0].name")
    bad = _problems(registry, sweep_config(tmp_path, [
        {"name": "../up", "dictionary": _dictionary()},
        {"name": "ok", "dictionary": _dictionary(), "trainer": {"lrr": 1e-3, "lr": "fast", "type": "standard"}},
        {"name": "ok2", "dictionary": _dictionary(), "initializer": {"decoder_bias": "median"}},
    ]))
    assert bad[0].startswith("$.items[0].name: '../up' is not a safe directory name")
    assert any(p.startswith("$.items[1].trainer.lrr: unknown key; did you mean 'lr'?") for p in bad)
    assert "$.items[1].trainer.lr: expected a number, got str 'fast'" in bad
    assert any(p.startswith("$.items[1].trainer.type: the trainer type is shared") for p in bad)
    assert any(p.startswith("$.items[2].initializer.decoder_bias: expected one of 'auto', 'zeros', 'mean'") for p in bad)
    ckpt = _problems(registry, sweep_config(tmp_path, [{"name": "a", "dictionary": _dictionary(),
                                                        "trainer": {"n_checkpoints": 2}}]))
    assert ckpt[0].startswith("$.items[0].trainer.n_checkpoints: the sweep task writes no resumable checkpoints")
    mesh = _problems(registry, sweep_config(tmp_path, [{"name": "a", "dictionary": _dictionary()}],
                                            distributed={"sweep": 2, "model": 2}))
    assert any(p.startswith("$.distributed.model: a sweep splits its items over the 'sweep' axis only") for p in mesh)
    assert any(p.startswith("$.distributed.sweep: 2 sweep processes for 1 item(s)") for p in mesh)


@config_class
class _SeqSAEConfig(SAEConfig):
    name: ClassVar[str] = "seq-sae"


class _SeqSAE(SparseAutoEncoder):
    needs_sequences = True


_SEQ_SPEC = ArchitectureSpec(config_class=_SeqSAEConfig, model_class=_SeqSAE, sharding_rules=sae_sharding_rules,
                             example_config=sae_example_config)


def test_items_needing_another_layout_are_rejected_before_any_work(tmp_path):
    registry = _registry(module("sweep_seq_arch", lmsae_register_architectures=hookimpl(lambda: [_SEQ_SPEC])))
    items = [{"name": "tokens", "dictionary": _dictionary()},
             {"name": "seq", "dictionary": _dictionary(architecture="seq-sae")},
             {"name": "wide", "dictionary": _dictionary(d_model=2 * D)}]
    problems = _problems(registry, sweep_config(tmp_path, items))
    assert problems[0].startswith("$.items[1].dictionary.architecture: architecture 'seq-sae' needs whole sequences "
                                  "but the sweep's stream has layout = 'tokens'")
    assert problems[1].startswith(f"$.items[2].dictionary: hook point '{HOOK}' is 32 wide here but 16 wide in "
                                  "$.items[0]")
    assert not (tmp_path / "tokens").exists()  # nothing was built or written


def test_previous_results_need_overwrite(tmp_path):
    registry = _registry()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    with pytest.raises(Exception, match="already holds results"):
        _run(registry, sweep_config(tmp_path, [{"name": "a", "dictionary": _dictionary()}]))


def test_stream_end_follows_each_items_on_stream_end(tmp_path):
    registry = _registry()
    data = sweep_config(tmp_path, [{"name": "keep", "dictionary": _dictionary()},
                                   {"name": "strict", "dictionary": _dictionary(),
                                    "trainer": {"on_stream_end": "error"}}])
    data["activations"]["sources"][0]["n_batches"] = 6  # 6 x 128 tokens: the stream ends after 6 steps
    data.pop("eval_activations")
    with pytest.raises(DataError, match="item 'strict': the activation stream ended after 6 of 40 steps"):
        _run(registry, data)
    summary = json.loads((tmp_path / "keep" / "training_summary.json").read_text())
    assert summary["reason"] == "stream_exhausted" and summary["steps"] == 6
    assert not (tmp_path / "strict" / "config.json").exists()


def test_example_config_is_valid():
    registry = _registry()
    cfg = registry.get("task", "sweep").example(registry)
    again = registry.structure(registry.unstructure(cfg), RunConfig)
    assert again == cfg and [it.name for it in cfg.items] == ["k2", "k4", "k8"]


def test_examples_sweep_toml_is_valid():
    from lmsae.cli import load_run_config

    path = pathlib.Path(__file__).resolve().parents[3] / "examples" / "sweep.toml"
    cfg = load_run_config(load_registry(), path)
    assert cfg.name == "sweep" and [cfg.item_trainer(i).total_training_tokens for i in range(len(cfg.items))]
    assert sorted({it.dictionary.top_k for it in cfg.items}) == sorted(it.dictionary.top_k for it in cfg.items)


# --- two processes --------------------------------------------------------------------------


def test_two_process_sweep_matches_one_process(lockstep, tmp_path):
    """``[distributed] sweep = 2`` under torchrun: items 0 and 2 on rank 0, item 1 on rank 1."""
    data = sweep_config(tmp_path / "dist", copy.deepcopy(ITEMS), distributed={"sweep": 2})
    cfg_path = tmp_path / "sweep.json"
    cfg_path.write_text(json.dumps(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "LMSAE_DISABLE_PLUGINS": "all"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "lmsae", "run", str(cfg_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "dist" / "sweep_summary.json").read_text())
    assert [(r["name"], r["rank"]) for r in summary["items"]] == [("k4", 0), ("k2-lr1e-2", 1), ("transcoder", 0)]
    for item in ITEMS:
        a = load_file(tmp_path / "dist" / item["name"] / "sae_weights.safetensors")
        b = load_file(lockstep["root"] / "sweep" / item["name"] / "sae_weights.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in b), item["name"]


def test_a_shared_problem_is_reported_once_not_once_per_item(tmp_path):
    items = [{"name": f"k{k}", "dictionary": _dictionary(top_k=k)} for k in (2, 3, 4)]
    data = sweep_config(tmp_path, items)
    data["trainer"]["n_checkpoints"] = 2
    problems = _problems(_registry(), data)
    assert [p for p in problems if "n_checkpoints" in p] == [
        "$.trainer.n_checkpoints: the sweep task writes no resumable checkpoints; set it to 0 (train an item alone "
        "with task = 'train' for checkpoints)"]
