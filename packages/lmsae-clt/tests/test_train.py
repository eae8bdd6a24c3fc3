"""Training a CLT end to end with the core's train task, on a fake multi-layer activation stream."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmsae.dictionary import load_dictionary
from lmsae.logging.loggers import read_jsonl_metrics
from lmsae_clt.convert import reconstruction_report
from lmsae_clt.model import CrossLayerTranscoder

L = 3
OUT = [f"blocks.{i}.hook_mlp_out" for i in range(L)]


def test_topk_clt_learns_the_fake_layers_and_logs_per_layer_metrics(trained_topk_clt, layered_registry, held_out):
    rows = read_jsonl_metrics(trained_topk_clt / "metrics.jsonl")
    last = rows[-1]
    assert last["details/step"] == 100
    for hook in OUT:
        assert 0.5 < last[f"metrics/explained_variance/{hook}"] <= 1
    for i in range(L):
        assert last[f"metrics/l0/layer{i}"] == pytest.approx(3.0, abs=0.05)
    assert last["metrics/explained_variance"] > 0.6
    assert rows[0]["metrics/explained_variance"] < last["metrics/explained_variance"]
    assert json.loads((trained_topk_clt / "training_summary.json").read_text())["reason"] == "completed"

    # saved folded (it takes raw activations), and as good on held-out data
    model = load_dictionary(trained_topk_clt, layered_registry)
    assert isinstance(model, CrossLayerTranscoder) and model.config.normalization == "none"
    report = reconstruction_report(model, held_out(layered_registry))
    assert report["ev_total"] > 0.6, report
    assert report["l0"] == pytest.approx([3.0] * L, abs=0.1)


@pytest.mark.parametrize("dictionary, trainer", [
    ({"act_fn": "batchlayertopk", "top_k": 8, "decoder_norm_gating": True, "init_cross_layer_decoders_zero": True},
     {"auxk_coefficient": 0.03, "dead_threshold_tokens": 512}),
    ({"act_fn": "batchtopk", "top_k": 3}, {}),
    ({"act_fn": "layertopk", "top_k": 8, "decoder_norm_gating": True}, {}),
    ({"act_fn": "jumprelu", "jumprelu_init_threshold": 0.3, "jumprelu_bandwidth": 0.3, "decoder_norm_gating": True},
     {"sparsity_coefficient": 0.3, "sparsity_loss": "tanh", "lp_coefficient": 1e-3}),
    ({"act_fn": "relu"}, {"sparsity_coefficient": 0.1}),
], ids=["batchlayertopk-gated-zeroinit", "batchtopk", "layertopk-gated", "jumprelu-gated", "relu"])
def test_every_variant_trains_with_every_loss_term(layered_registry, tmp_path, train_config, run_train,
                                                   dictionary, trainer):
    result = run_train(layered_registry, train_config(tmp_path, tokens=12 * 256, dictionary=dictionary,
                                                      trainer={"log_every": 6, **trainer}))
    assert result.reason == "completed"
    last = read_jsonl_metrics(tmp_path / "metrics.jsonl")[-1]
    for hook in OUT:
        assert math.isfinite(last[f"metrics/explained_variance/{hook}"])
    assert all(math.isfinite(last[f"metrics/l0/layer{i}"]) for i in range(L))
    assert math.isfinite(last["losses/overall_loss"])


def test_initial_k_schedule_drives_the_clt_activation(layered_registry, tmp_path, train_config, run_train):
    run_train(layered_registry, train_config(tmp_path, tokens=24 * 256, dictionary={"act_fn": "layertopk", "top_k": 6},
                                             trainer={"initial_k": 24, "k_warmup_steps": 0.5, "log_every": 4}))
    rows = read_jsonl_metrics(tmp_path / "metrics.jsonl")
    ks = [r["sparsity/k"] for r in rows]
    assert ks[0] > 6 and ks[-1] == 6
    assert 5.5 < rows[-1]["metrics/l0"] <= 6.0  # at most k per token (fewer when under k are positive)


def test_continue_training_a_folded_clt_keeps_its_norm_units(layered_registry, tmp_path, train_config, run_train):
    run_train(layered_registry, train_config(tmp_path / "a", tokens=6 * 256, dictionary={"decoder_norm_gating": True}))
    folded = load_dictionary(tmp_path / "a", layered_registry)
    assert not torch.allclose(folded.target_norm_factors, torch.ones(L))
    data = train_config(tmp_path / "b", tokens=6 * 256)
    del data["dictionary"]
    data["pretrained"] = {"path": str(tmp_path / "a")}
    assert run_train(layered_registry, data).reason == "completed"
