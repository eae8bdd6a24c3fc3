"""Train, evaluate (each head spliced in), analyse and attribute logits of a layer crosscoder, through
the core's tasks, on a tiny random language model over the built-in corpus."""

from __future__ import annotations

import io
import json

import pytest

from lmsae.cli import main
from lmsae.config.base import RunConfig
from lmsae.registry import load_registry
from lmsae.runtime import RunContext
from lmsae.testing.plugins import fake_entry_points

pytestmark = pytest.mark.lm

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
MODEL = {"backend": "transformer_lens", "model": "tiny-random", "device": "cpu"}


def text(split: str) -> dict:
    return {"type": "text", "dataset": {"path": "builtin:python-docs", "split": split}, "context_size": 32,
            "model_batch_size": 8}


@pytest.fixture
def registry(monkeypatch, tmp_path):
    pytest.importorskip("transformer_lens")
    pytest.importorskip("datasets")
    monkeypatch.setenv("LMSAE_STORE_DIR", str(tmp_path / "store"))
    fake_entry_points(monkeypatch, [])
    return load_registry(plugins=["lmsae_crosscoder.plugin"])


def run(registry, data: dict) -> tuple[object, str]:
    out = io.StringIO()
    cfg = registry.structure(data, RunConfig)
    result = registry.get("task", cfg.name).factory(cfg, RunContext(registry=registry, out=out, progress=False))
    return result, out.getvalue()


def test_train_evaluate_analyze_attribute(registry, tmp_path, capsys):
    cc = tmp_path / "cc"
    result, _ = run(registry, {
        "task": "train", "output_dir": str(cc), "device": "cpu", "loggers": [{"type": "jsonl"}], "model": MODEL,
        "dictionary": {"architecture": "crosscoder", "hook_points": HOOKS, "d_model": 64, "expansion_factor": 2,
                       "act_fn": "topk", "top_k": 8, "decoder_norm_gating": True},
        "activations": {"batch_size": 256, "prefetch": 0, "sources": [text("train[:20%]")]},
        "trainer": {"total_training_tokens": 20 * 256, "lr": 3e-3, "log_every": 10, "calibration_batches": 2},
    })
    assert result.reason == "completed"

    evaluation, printed = run(registry, {
        "task": "evaluate", "output_dir": str(tmp_path / "eval"), "device": "cpu", "model": MODEL,
        "loggers": [{"type": "jsonl"}], "pretrained": {"path": str(cc)}, "n_tokens": 512,
        "activations": {"batch_size": 128, "prefetch": 0, "sources": [text("train[90%:]")]},
        "splice": {"n_tokens": 128, "batch_size": 4, "mode": "per_hook", "sources": [text("train[90%:]")]},
    })
    metrics = evaluation["metrics"]
    for hook in HOOKS:
        assert {f"ce_spliced/{hook}", f"ce_loss_recovered/{hook}", f"kl_div/{hook}"} <= set(metrics)
        assert metrics[f"ce_spliced/{hook}"] > 0 and f"{hook}: CE spliced" in printed
    assert "ce_spliced" not in metrics  # no closed-loop joint splice across layers

    summary, _ = run(registry, {
        "task": "analyze", "dictionary_name": "cc", "device": "cpu", "model": MODEL, "n_tokens": 256,
        "pretrained": {"path": str(cc)},
        "activations": {"layout": "sequences", "batch_size": 8, "prefetch": 0, "sources": [text("train[90%:]")]},
    })
    assert summary["features"] == 128
    # the same, through the train task's [after_training] (what examples/crosscoder.toml does)
    _, printed = run(registry, {
        "task": "train", "output_dir": str(tmp_path / "cc2"), "device": "cpu", "loggers": [], "model": MODEL,
        "dictionary": {"architecture": "crosscoder", "hook_points": HOOKS, "d_model": 64, "expansion_factor": 2,
                       "act_fn": "topk", "top_k": 8},
        "activations": {"batch_size": 256, "prefetch": 0, "sources": [text("train[:20%]")]},
        "eval_activations": {"batch_size": 128, "prefetch": 0, "sources": [text("train[90%:]")]},
        "trainer": {"total_training_tokens": 5 * 256, "calibration_batches": 1, "eval_tokens": 256},
        "after_training": {"evaluate": True, "evaluate_tokens": 256, "splice_tokens": 64, "splice_mode": "per_hook",
                           "analyze": True, "analyze_tokens": 128},
    })
    for hook in HOOKS:
        assert f"{hook}: CE spliced" in printed
    assert "analysed 128 features of 'cc2'" in printed

    from lmsae.stores.configs import open_store

    with open_store(registry, None) as store:
        feature = store.get_feature_analysis("cc", "default", 3)
    assert feature.extras["decoder_norms"].shape == (2,)
    assert feature.extras["relative_decoder_norms"].sum() == pytest.approx(1.0)
    assert feature.extras["decoder_cosine_similarity"].shape == (2, 2)

    run(registry, {"task": "attribute-logits", "dictionary_name": "cc", "device": "cpu", "model": MODEL,
                   "top_k": 3, "pretrained": {"path": str(cc)}})

    main(["crosscoder", "heads", str(cc)], registry=registry)
    assert "crosscoder with 2 heads, 128 features" in capsys.readouterr().out
    assert json.loads((cc / "config.json").read_text())["normalization"] == "none"
