"""Training a MOLT end to end with the core's train task, on the synthetic transcoder source.

The source's feature magnitudes are constant: a MOLT's output is bilinear in its input (gate times
transform), so heavy-tailed input norms come out squared. MOLTs read LayerNorm'd MLP inputs
(``ln2.hook_normalized``), whose token norms are nearly constant, and the test data imitates that.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from lmsae.config.base import RunConfig
from lmsae.dictionary import load_dictionary
from lmsae.logging.loggers import read_jsonl_metrics
from lmsae.registry import load_registry
from lmsae.runtime import RunContext
from lmsae.sources.synthetic import SyntheticActivations

from lmsae_molt.model import MixtureOfLinearTransforms

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
SOURCE = {"type": "synthetic", "hook_point": IN, "hook_point_out": OUT, "d_model": 16, "d_out": 12,
          "n_features": 48, "mean_active": 3.0, "batch_size": 256, "seed": 5, "bias_scale": 1.0,
          "magnitude": "constant"}
RANKS = (1, 2, 4)


def train_config(out, dictionary=None, trainer=None, tokens=100 * 256, **top) -> dict:
    return {
        "task": "train",
        "output_dir": str(out),
        "device": "cpu",
        "loggers": [{"type": "jsonl"}],
        "dictionary": {"architecture": "molt", "hook_point_in": IN, "hook_point_out": OUT, "d_model": 16,
                       "d_out": 12, "rank_counts": {"1": 32, "2": 16, "4": 8}, "act_fn": "topk", "top_k": 4,
                       **(dictionary or {})},
        "activations": {"batch_size": 256, "sources": [SOURCE]},
        "trainer": {"total_training_tokens": tokens, "lr": 1e-2, "log_every": 10, "lr_warmup_steps": 0,
                    **(trainer or {})},
        "initializer": {"decoder_bias": "mean"},
        **top,
    }


def run_train(data):
    registry = load_registry(strict=True)
    cfg = registry.structure(data, RunConfig)
    return registry.get("task", "train").factory(cfg, RunContext(registry=registry, out=io.StringIO(), progress=False))


def held_out(n=4):
    truth = SyntheticActivations(d_model=16, n_features=48, mean_active=3.0, batch_size=256, seed=5,
                                 hook_point=IN, hook_point_out=OUT, d_out=12, bias_scale=1.0,
                                 magnitude="constant")
    return [truth.batch(10_000 + i) for i in range(n)]


def explained_variance(model, batches) -> float:
    err = var = 0.0
    with torch.no_grad():
        for b in batches:
            y = b[OUT].double()
            y_hat = model.forward_raw(b).double()
            err += float((y_hat - y).square().sum())
            var += float((y - y.mean(0)).square().sum())
    return 1 - err / var


@pytest.fixture(scope="module")
def trained_topk(tmp_path_factory):
    out = tmp_path_factory.mktemp("molt_topk")
    result = run_train(train_config(out, trainer={"auxk_coefficient": 0.03, "dead_threshold_tokens": 2048}))
    return out, result


def test_topk_molt_trains_logs_rank_metrics_and_saves_a_folded_model(trained_topk):
    out, result = trained_topk
    assert result.reason == "completed"
    rows = read_jsonl_metrics(out / "metrics.jsonl")
    last = rows[-1]
    assert last["details/step"] == 100
    for r in RANKS:
        assert 0 <= last[f"metrics/l0/rank{r}"] <= 4
        assert 0 <= last[f"metrics/l0_ratio/rank{r}"] <= 1
    # per-rank metrics describe the last batch, metrics/l0 the logging window: close, not equal
    assert sum(last[f"metrics/l0/rank{r}"] for r in RANKS) == pytest.approx(last["metrics/l0"], abs=0.5)
    assert sum(last[f"metrics/l0_ratio/rank{r}"] for r in RANKS) == pytest.approx(1.0)
    assert last["metrics/rank_used"] == pytest.approx(sum(r * last[f"metrics/l0/rank{r}"] for r in RANKS))
    assert last["metrics/explained_variance"] > rows[0]["metrics/explained_variance"]
    assert last["metrics/explained_variance"] > 0.35
    assert json.loads((out / "training_summary.json").read_text())["reason"] == "completed"

    registry = load_registry(strict=True)
    model = load_dictionary(out, registry)
    assert isinstance(model, MixtureOfLinearTransforms) and model.config.normalization == "none"
    assert model.config.rank_groups == ((1, 32), (2, 16), (4, 8))
    assert explained_variance(model, held_out()) > 0.35


@pytest.mark.parametrize("dictionary, trainer", [
    ({"act_fn": "jumprelu", "jumprelu_init_threshold": 0.2, "jumprelu_bandwidth": 0.2, "decoder_norm_gating": True},
     {"sparsity_coefficient": 0.1, "sparsity_loss": "tanh", "lp_coefficient": 1e-3}),
    ({"act_fn": "batchtopk", "top_k": 3, "decoder_norm_gating": True}, {"initial_k": 12, "k_warmup_steps": 0.5}),
    ({"act_fn": "relu"}, {"sparsity_coefficient": 0.05}),
], ids=["jumprelu-gated", "batchtopk-gated-k-schedule", "relu"])
def test_every_variant_trains_with_its_loss_terms(tmp_path, dictionary, trainer):
    result = run_train(train_config(tmp_path, tokens=12 * 256, dictionary=dictionary,
                                    trainer={"log_every": 4, **trainer}))
    assert result.reason == "completed"
    last = read_jsonl_metrics(tmp_path / "metrics.jsonl")[-1]
    assert math.isfinite(last["losses/overall_loss"])
    assert all(math.isfinite(last[f"metrics/l0/rank{r}"]) for r in RANKS)
    model = load_dictionary(tmp_path, load_registry(strict=True))
    batch = held_out(1)[0]
    assert torch.isfinite(model.forward_raw(batch)).all()


def test_default_initializer_and_grid_search_work(tmp_path):
    data = train_config(tmp_path, tokens=4 * 256)
    data["initializer"] = {"grid_search_decoder_norm": True, "encoder_bias_from_mean_pre": True}
    assert run_train(data).reason == "completed"
