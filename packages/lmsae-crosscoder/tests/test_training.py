"""Training end to end through ``lmsae.tasks.train`` on fake multi-head streams.

``fake_heads`` (an in-test source plugin registered with ``load_registry(plugins=[...])``) draws
sparse codes over ground-truth features and writes each head as ``code @ D_h``: a third of the
features are shared (non-zero directions in both heads), a third exist only in head 0 and a
third only in head 1. A crosscoder should recover every feature and tell which heads it lives in.
"""

from __future__ import annotations

import io
import json
import pathlib
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file

from lmsae.activations.protocol import SourceContext
from lmsae.cli import main
from lmsae.config.base import RunConfig, SourceConfig
from lmsae.config.fields import config_class, option
from lmsae.dictionary.io import load_dictionary
from lmsae.errors import DataError
from lmsae.hookspecs import hookimpl
from lmsae.logging.loggers import read_jsonl_metrics
from lmsae.records import SourceSpec
from lmsae.registry import load_registry
from lmsae.runtime import RunContext
from lmsae.testing.plugins import fake_entry_points, module

from lmsae_crosscoder.analysis import SHARED, head_distribution, relative_decoder_norms
from lmsae_crosscoder.model import Crosscoder

HEADS = ["model_a.blocks.3.hook_resid_post", "model_b.blocks.3.hook_resid_post"]


# --- the in-test source plugin -------------------------------------------------------------------------


@config_class
class FakeHeadsConfig(SourceConfig):
    """Two heads built from shared and head-specific ground-truth features."""

    name: ClassVar[str] = "fake_heads"

    d_model: int = option(16, doc="Width of every head.")
    n_per_group: int = option(8, doc="Ground-truth features per group (shared, head 0 only, head 1 only).")
    mean_active: float = option(3.0, doc="Expected active features per token.")
    chunk: int = option(256, doc="Tokens per chunk.")
    seed: int = option(0, doc="Seed of the ground truth and the data.")


class FakeHeads:
    def __init__(self, config: FakeHeadsConfig, context: SourceContext):
        self.config = config
        self.keys = tuple(context.hook_points) or tuple(HEADS)
        if len(self.keys) != 2:
            raise DataError(f"fake_heads provides exactly two heads, {len(self.keys)} requested")
        g = torch.Generator().manual_seed(config.seed)
        n, d = config.n_per_group, config.d_model
        self.directions = torch.zeros(2, 3 * n, d)
        self.directions[:, :n] = torch.randn(2, n, d, generator=g)  # shared: a direction in each head
        self.directions[0, n:2 * n] = torch.randn(n, d, generator=g)  # head 0 only
        self.directions[1, 2 * n:] = torch.randn(n, d, generator=g)  # head 1 only
        self.directions /= self.directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.position = 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.config.seed * 100_003 + self.position + 1)
            n_true = self.directions.shape[1]
            fires = torch.rand(self.config.chunk, n_true, generator=g) < self.config.mean_active / n_true
            code = fires * (0.5 + torch.rand(self.config.chunk, n_true, generator=g))
            self.position += 1
            out = {key: code @ self.directions[h] for h, key in enumerate(self.keys)}
            out["mask"] = torch.ones(self.config.chunk, dtype=torch.bool)
            yield out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


@hookimpl
def lmsae_register_sources():
    return [SourceSpec(config_class=FakeHeadsConfig, factory=FakeHeads, summary="test heads")]


@pytest.fixture
def registry(monkeypatch):
    fake_entry_points(monkeypatch, [])  # only the core, this package and the test source
    return load_registry(plugins=["lmsae_crosscoder.plugin",
                                  module("fake_heads_plugin", lmsae_register_sources=lmsae_register_sources)])


def run_train(registry, data: dict) -> Any:
    cfg = registry.structure(data, RunConfig)
    return registry.get("task", "train").factory(cfg, RunContext(registry=registry, out=io.StringIO(), progress=False))


def crosscoder_run(out: pathlib.Path, **dictionary) -> dict:
    return {
        "task": "train", "output_dir": str(out), "device": "cpu", "loggers": [{"type": "jsonl"}],
        "dictionary": {"architecture": "crosscoder", "hook_points": HEADS, "d_model": 16, "d_sae": 48,
                       "act_fn": "topk", "top_k": 3, **dictionary},
        "activations": {"batch_size": 256, "prefetch": 0, "sources": [{"type": "fake_heads", "seed": 3}]},
        "trainer": {"total_training_tokens": 500 * 256, "lr": 1e-2, "log_every": 50, "lr_warmup_steps": 0},
    }


# --- tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["identical", "independent"])
def test_crosscoder_recovers_shared_and_head_specific_features(registry, tmp_path, init):
    data = crosscoder_run(tmp_path, init=init)
    data["trainer"].update(auxk_coefficient=0.03, dead_threshold_tokens=5000)
    result = run_train(registry, data)
    assert result.reason == "completed"
    model = load_dictionary(tmp_path, registry)
    assert isinstance(model, Crosscoder)
    # saved folded: raw activations in, the per-head norm weights carry the normalisation factors
    assert model.config.normalization == "none"
    assert not torch.allclose(model.head_norm_weight, torch.ones(2))

    truth = FakeHeads(FakeHeadsConfig(seed=3), SourceContext(hook_points=tuple(HEADS)))
    # match each true feature to the learnt feature whose decoders point the same way in every head
    # it lives in (cosine of the concatenated, per-head-normalised decoder rows)
    w = model.W_D.detach().double() * model.head_norm_weight.double()[:, None, None]  # normalised units
    learnt = torch.cat([w[0], w[1]], dim=-1)
    learnt = learnt / learnt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    wanted = torch.cat([truth.directions[0], truth.directions[1]], dim=-1).double()
    wanted = wanted / wanted.norm(dim=-1, keepdim=True)
    cos = wanted @ learnt.T  # (24 true, 48 learnt)
    best = cos.max(dim=1)
    assert float(best.values.min()) > 0.9, best.values
    dist = head_distribution(model, threshold=0.1)
    categories = dist.category[best.indices]
    assert (categories[:8] == SHARED).all() and (categories[8:16] == 0).all() and (categories[16:] == 1).all()
    rel = relative_decoder_norms(model)[best.indices]
    assert float(rel[8:16, 1].max()) < 0.1 and float(rel[16:, 0].max()) < 0.1

    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["explained_variance"] > 0.8  # k = 3 cannot keep every feature of busy tokens
    last = read_jsonl_metrics(tmp_path / "metrics.jsonl")[-1]
    for hook in HEADS:
        assert last[f"metrics/explained_variance/{hook}"] > 0.8
        assert last[f"metrics/decoder_norm/{hook}"] > 0
    assert 2.0 < last["metrics/l0"] <= 3.0


@pytest.mark.parametrize("act_fn, extra", [
    ("batchtopk", {"decoder_norm_gating": True}),
    ("jumprelu", {"decoder_norm_gating": True, "jumprelu_init_threshold": 0.1, "jumprelu_bandwidth": 0.2}),
    ("relu", {}),
])
def test_every_activation_trains_and_saves(registry, tmp_path, act_fn, extra):
    data = crosscoder_run(tmp_path, act_fn=act_fn, **extra)
    data["trainer"].update(total_training_tokens=40 * 256, log_every=10, n_checkpoints=1,
                           sparsity_coefficient=0.0 if act_fn == "batchtopk" else 0.05,
                           lp_coefficient=0.01 if act_fn == "jumprelu" else 0.0, auxk_coefficient=0.1,
                           dead_threshold_tokens=2048)
    data["initializer"] = {"decoder_bias": "mean", "encoder_bias_from_mean_pre": True}
    result = run_train(registry, data)
    assert result.reason == "completed" and result.steps == 40
    rows = read_jsonl_metrics(tmp_path / "metrics.jsonl")
    assert all(r[f"metrics/explained_variance/{h}"] is not None for r in rows for h in HEADS)
    model = load_dictionary(tmp_path, registry)
    assert model.config.act_fn == act_fn


def aliased_sources(check_tokens: bool = False) -> list[dict]:
    """Two synthetic streams (two 'models') of the same hook point under distinct keys."""
    member = {"type": "synthetic", "d_model": 16, "n_features": 32, "mean_active": 3.0, "batch_size": 96,
              "hook_point": "blocks.3.hook_resid_post"}
    return [{"type": "crosscoder_heads", "check_tokens": check_tokens,
             "members": [{"keys": {HEADS[0]: "blocks.3.hook_resid_post"}, "source": {**member, "seed": 1}},
                         {"keys": {HEADS[1]: "blocks.3.hook_resid_post"}, "source": {**member, "seed": 2}}]}]


def test_resume_through_the_joined_source_continues_exactly(registry, tmp_path):
    import shutil

    from lmsae.training.trainer import list_checkpoints

    data = crosscoder_run(tmp_path / "full")
    data["activations"].update(sources=aliased_sources(), shuffle_buffer=512)
    data["trainer"].update(total_training_tokens=30 * 256, n_checkpoints=3, log_every=5)
    run_train(registry, data)
    # an interrupted copy: the same run resumed from its first checkpoint (step 10)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints", part / "checkpoints")
    for later in list_checkpoints(part)[1:]:
        shutil.rmtree(later)
    run_train(registry, dict(data, output_dir=str(part), resume=True))
    a = load_file(str(tmp_path / "full" / "sae_weights.safetensors"))
    b = load_file(str(part / "sae_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_aliased_sources_feed_two_heads(registry, tmp_path):
    """The same hook point of two 'models' (two synthetic streams) under distinct keys."""
    data = crosscoder_run(tmp_path)
    data["activations"]["sources"] = aliased_sources()
    data["trainer"].update(total_training_tokens=20 * 256, log_every=10)
    assert run_train(registry, data).reason == "completed"
    # synthetic token ids are the strongest feature's index, so they differ between the seeds
    data["activations"]["sources"][0]["check_tokens"] = True
    data["overwrite"] = True
    with pytest.raises(DataError, match="other tokens"):
        run_train(registry, data)


def test_heads_command_on_a_trained_crosscoder(registry, tmp_path, capsys):
    data = crosscoder_run(tmp_path)
    data["trainer"].update(total_training_tokens=10 * 256)
    run_train(registry, data)
    main(["crosscoder", "heads", str(tmp_path), "--threshold", "0.2", "--json", "--per-feature"], registry=registry)
    report = json.loads(capsys.readouterr().out)
    assert report["hook_points"] == HEADS and report["n_features"] == 48 and report["threshold"] == 0.2
    assert len(report["features"]) == 48
    counts = report["counts"]
    assert counts["shared"] + sum(counts["specific"].values()) + counts["partial"] + counts["zero"] == 48
