"""The evaluate task end to end: evaluation.json, store records, density histogram, summary."""

from __future__ import annotations

import io
import json
import math
import pathlib

import numpy as np
import pytest
import torch

from lmsae.config.base import RunConfig
from lmsae.errors import ConfigError
from lmsae.hookspecs import hookimpl
from lmsae.registry import load_registry
from lmsae.runtime import RunContext
from lmsae.testing.plugins import module
from lmsae.training.evaluation import density_histogram

HOOK = "blocks.0.hook_resid_post"
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Sparse dictionaries decompose activations into features that fire rarely. " * 5,
    "def f(x):\n    return x * 2\n\nprint(f(21))\n" * 6,
    "Evaluation splices the dictionary into the model and measures the loss. " * 5,
]


def _registry():
    """The core registry, plus the evaluate task and the local store until the core wires them."""
    base = load_registry(entry_points=False)
    extra = {}
    if "evaluate" not in base.names("task"):
        from lmsae.tasks import evaluate

        @hookimpl
        def lmsae_register_tasks():
            return [evaluate.SPEC]

        extra["lmsae_register_tasks"] = lmsae_register_tasks
    if "local" not in base.names("store"):
        from lmsae.stores.specs import STORE_SPECS

        @hookimpl
        def lmsae_register_stores():
            return [s for s in STORE_SPECS if s.name == "local"]

        extra["lmsae_register_stores"] = lmsae_register_stores
    return load_registry(entry_points=False, plugins=[module("evaluate_test", **extra)]) if extra else base


@pytest.fixture(scope="module")
def registry():
    return _registry()


@pytest.fixture
def docs(tmp_path) -> pathlib.Path:
    d = tmp_path / "docs"
    d.mkdir()
    for i, text in enumerate(TEXTS):
        (d / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return d


def _saved_sae(registry, directory: pathlib.Path, **kw) -> pathlib.Path:
    from lmsae.dictionary.io import save_dictionary
    from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder

    cfg = SAEConfig(hook_point_in=HOOK, d_model=64, d_sae=128, act_fn="topk", top_k=8, normalization="dataset",
                    dataset_norms={HOOK: 8.0}, **kw)
    model = SparseAutoEncoder(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0))
    save_dictionary(model, directory, registry)
    return directory


def _text_source(docs: pathlib.Path, tmp_path: pathlib.Path) -> dict:
    return {"type": "text", "dataset": {"path": str(docs), "cache_dir": str(tmp_path / "hf")},
            "context_size": 32, "model_batch_size": 4}


def _run(registry, data: dict) -> tuple[dict, str]:
    cfg = registry.structure(data, RunConfig)
    out = io.StringIO()
    result = registry.get("task", "evaluate").factory(cfg, RunContext(registry=registry, out=out, progress=False))
    return result, out.getvalue()


@pytest.mark.lm
def test_evaluate_end_to_end(registry, docs, tmp_path):
    pytest.importorskip("transformer_lens")
    from lmsae.stores.configs import LocalStoreConfig
    from lmsae.stores.local import LocalStore

    path = _saved_sae(registry, tmp_path / "dicts" / "tiny-sae")
    source = _text_source(docs, tmp_path)
    data = {
        "task": "evaluate",
        "pretrained": {"path": str(path)},
        "model": {"backend": "transformer_lens", "model": "tiny-random", "device": "cpu"},
        "activations": {"batch_size": 64, "prefetch": 0, "sources": [source]},
        "splice": {"sources": [source], "batch_size": 4, "n_tokens": 150},
        "n_tokens": 300,
        "density_bins": 10,
        "store": {"type": "local", "directory": str(tmp_path / "store")},
        "output_dir": str(tmp_path / "eval"),
        "series": "tests",
        "device": "cpu",
    }
    result, printed = _run(registry, data)

    written = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert written["dictionary"] == "tiny-sae" and written["series"] == "tests" and written["evaluation"] == "default"
    assert written["model_name"] == "tiny-random"
    m = written["metrics"]
    assert m == pytest.approx(result["metrics"])
    for key in ("explained_variance", "mse", "l2_ratio", "l0", "dead_fraction", "never_fired", "ce_clean",
                "ce_spliced", "ce_ablated", "ce_loss_recovered", "ce_loss_increase", "kl_div", "kl_div_ablated",
                "kl_div_score"):
        assert math.isfinite(m[key]), key
    assert m["n_tokens"] >= 300 and m["splice_n_tokens"] >= 150
    assert m["l0"] == pytest.approx(8.0)  # TopK, k = 8 (a random dictionary's pre-activations are never all <= 0)
    assert m["ce_loss_recovered"] == pytest.approx((m["ce_ablated"] - m["ce_spliced"]) / (m["ce_ablated"] - m["ce_clean"]))
    assert m["ce_loss_increase"] == pytest.approx(m["ce_spliced"] - m["ce_clean"])
    assert m["kl_div_score"] == pytest.approx((m["kl_div_ablated"] - m["kl_div"]) / m["kl_div_ablated"])
    assert m["kl_div"] > 0 and m["kl_div_ablated"] > 0

    # density histogram: every feature is either in a bin or never fired
    hist = written["density_histogram"]
    assert len(hist["counts"]) == 10 and len(hist["log10_edges"]) == 11
    assert hist["log10_edges"][0] == pytest.approx(-7.0) and hist["log10_edges"][-1] == 0.0
    assert hist["n_features"] == 128
    assert sum(hist["counts"]) + hist["never_fired"] == 128
    assert m["never_fired"] == hist["never_fired"] and m["dead_fraction"] == pytest.approx(hist["never_fired"] / 128)
    # densities of at least 1/n_tokens > 1e-3: nothing below 1e-3 (the bins are 0.7 decades wide)
    assert sum(hist["counts"][:5]) == 0

    # the store holds the dictionary and the evaluation
    store = LocalStore(LocalStoreConfig(directory=tmp_path / "store"))
    try:
        record = store.get_dictionary("tiny-sae", "tests")
        assert record is not None and pathlib.Path(record.path) == path.resolve()
        assert record.config["architecture"] == "sae" and record.model_name == "tiny-random"
        (evaluation,) = store.list_evaluations("tiny-sae", "tests")
        assert evaluation.name == "default"
        assert evaluation.metrics["ce_loss_recovered"] == pytest.approx(m["ce_loss_recovered"])
        np.testing.assert_array_equal(evaluation.arrays["density_histogram"], hist["counts"])
        np.testing.assert_allclose(evaluation.arrays["density_edges"], hist["log10_edges"])
        assert evaluation.config["task"] == "evaluate"
    finally:
        store.close()

    # metrics logged under eval/
    lines = [json.loads(x) for x in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["eval/ce_loss_recovered"] == pytest.approx(m["ce_loss_recovered"])

    # the printed summary, with the definitions once
    assert "explained variance" in printed and "CE loss recovered" in printed and "feature density" in printed
    assert printed.count("definitions:") == 1
    assert printed.count("ce_loss_recovered: (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)") == 1
    assert "KL(p_clean || p_spliced)" in printed


def test_reconstruction_only_on_synthetic_activations(registry, tmp_path):
    from lmsae.stores.configs import LocalStoreConfig
    from lmsae.stores.local import LocalStore

    path = _saved_sae(registry, tmp_path / "my-dictionary")
    data = {
        "task": "evaluate",
        "pretrained": {"path": str(path)},
        "activations": {"batch_size": 256, "prefetch": 0,
                        "sources": [{"type": "synthetic", "d_model": 64, "n_features": 256, "mean_active": 4.0,
                                     "hook_point": HOOK, "batch_size": 256, "seed": 3}]},
        "n_tokens": 2048,
        "store": {"type": "local", "directory": str(tmp_path / "store")},
        "loggers": [],
        "output_dir": str(tmp_path / "eval"),
        "device": "cpu",
    }
    result, printed = _run(registry, data)
    m = result["metrics"]
    assert m["n_tokens"] == 2048 and "ce_clean" not in m and result["model_name"] is None
    hist = result["density_histogram"]
    assert sum(hist["counts"]) + hist["never_fired"] == hist["n_features"] == 128
    assert "CE" not in printed and "ce_loss_recovered" not in printed and "definitions:" in printed

    # same evaluation name again: replaced, not duplicated; another name: added
    _run(registry, data)
    _run(registry, {**data, "evaluation_name": "second", "dictionary_name": "my-dictionary"})
    with LocalStore(LocalStoreConfig(directory=tmp_path / "store")) as store:
        assert [e.name for e in store.list_evaluations("my-dictionary")] == ["default", "second"]


def test_splice_needs_a_model(registry, tmp_path):
    synthetic = {"type": "synthetic", "d_model": 8, "n_features": 16, "mean_active": 2.0, "hook_point": HOOK}
    data = {"task": "evaluate", "pretrained": {"path": str(tmp_path)},
            "activations": {"sources": [synthetic]}, "splice": {"sources": [synthetic]}}
    with pytest.raises(ConfigError, match=r"splice.*\[model\] table"):
        registry.structure(data, RunConfig)


def test_density_histogram_bins_and_invariant():
    n = 10_000_000
    counts = torch.tensor([0, 0, 1, 5, 100, 10_000, n // 2, n], dtype=torch.int64)  # 1e-7 .. 1
    h = density_histogram(counts, n, bins=7)
    np.testing.assert_allclose(h.edges, np.arange(-7.0, 0.5, 1.0))
    assert h.never_fired == 2 and h.n_features == 8
    # densities 1e-7, 5e-7, 1e-5, 1e-3, 0.5, 1 (the last bin is closed on the right)
    assert h.counts.tolist() == [2, 0, 1, 0, 1, 0, 2]
    assert h.counts.sum() + h.never_fired == h.n_features
    # below the lower end: clipped into the first bin, never dropped
    tiny = density_histogram(torch.tensor([1]), 10**9, bins=7)
    assert tiny.counts.tolist() == [1, 0, 0, 0, 0, 0, 0] and tiny.never_fired == 0


def test_sparkline():
    from lmsae.tasks.evaluate import sparkline

    assert sparkline([0, 1, 4, 8]) == " ▁▄█"
    assert sparkline([0, 0]) == "  "


def test_example_round_trips(registry):
    from lmsae.tasks.evaluate import example

    cfg = example(registry)
    plain = registry.unstructure(cfg)
    assert plain["task"] == "evaluate" and plain["pretrained"]["path"] == "runs/quickstart"
    assert plain["activations"]["sources"][0]["dataset"]["split"] == "train[90%:]"
    assert registry.structure(plain, RunConfig) == cfg
