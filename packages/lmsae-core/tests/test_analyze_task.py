"""The analyze task end to end on the tiny random model: records in the store, decodable contexts,
architecture extras, the summary and config errors."""

from __future__ import annotations

import io
import pathlib
from typing import ClassVar

import numpy as np
import pytest
import torch

from lmsae.config import config_class
from lmsae.config.base import RunConfig
from lmsae.dictionary.io import save_dictionary
from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder, sae_sharding_rules
from lmsae.errors import ConfigError, DataError
from lmsae.hookspecs import hookimpl
from lmsae.records import ArchitectureSpec
from lmsae.registry import load_registry
from lmsae.runtime import RunContext
from lmsae.testing.plugins import module

HOOK = "blocks.0.hook_resid_post"
MODEL = {"backend": "transformer_lens", "model": "tiny-random", "device": "cpu"}
N_FEATURES = 48
DEAD = 7
EXTRAS_CALLS: list[np.ndarray] = []


@config_class
class ExtrasSAEConfig(SAEConfig):
    """An SAE whose architecture adds per-feature analysis extras."""

    name: ClassVar[str] = "sae-with-extras"


def _extras(model, indices):
    EXTRAS_CALLS.append(np.asarray(indices))
    norms = model.decoder_norm().detach().numpy()[indices]
    return {"decoder_norm": norms, "pair": np.stack([norms, 2 * norms], axis=1)}


EXTRAS_SPEC = ArchitectureSpec(
    config_class=ExtrasSAEConfig, model_class=SparseAutoEncoder, sharding_rules=sae_sharding_rules,
    example_config=lambda: ExtrasSAEConfig(hook_point_in=HOOK, d_model=64, d_sae=N_FEATURES),
    analysis_extras=_extras)


def _registry():
    """The core registry plus the analyze task, the local store and an architecture with extras
    (the task and the store only until the core wires them)."""
    base = load_registry(entry_points=False)

    @hookimpl
    def lmsae_register_architectures():
        return [EXTRAS_SPEC]

    extra = {"lmsae_register_architectures": lmsae_register_architectures}
    if "analyze" not in base.names("task"):
        from lmsae.tasks import analyze

        @hookimpl
        def lmsae_register_tasks():
            return [analyze.SPEC]

        extra["lmsae_register_tasks"] = lmsae_register_tasks
    if "local" not in base.names("store"):
        from lmsae.stores.specs import STORE_SPECS

        @hookimpl
        def lmsae_register_stores():
            return [s for s in STORE_SPECS if s.name == "local"]

        extra["lmsae_register_stores"] = lmsae_register_stores
    return load_registry(entry_points=False, plugins=[module("analyze_test", **extra)])


@pytest.fixture(scope="module")
def registry():
    return _registry()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over a lazy dog while sparse features fire rarely".split()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        n = int(torch.randint(30, 90, (1,), generator=g))
        text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))
        (d / f"doc{i:02d}.txt").write_text(text + ".", encoding="utf-8")
    return d


def _save(registry, directory: pathlib.Path, config_class=SAEConfig) -> pathlib.Path:
    cfg = config_class(hook_point_in=HOOK, d_model=64, d_sae=N_FEATURES, act_fn="topk", top_k=6,
                       normalization="dataset", dataset_norms={HOOK: 8.0})
    model = SparseAutoEncoder(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.b_E[DEAD] = -1e4  # never fires
    save_dictionary(model, directory, registry)
    return directory


def _config(corpus, path, store_dir, **top) -> dict:
    source = {"type": "text", "dataset": {"path": str(corpus / "*.txt")}, "context_size": 32,
              "model_batch_size": 4}
    return {"task": "analyze", "pretrained": {"path": str(path)}, "model": MODEL,
            "activations": {"layout": "sequences", "batch_size": 4, "prefetch": 0, "sources": [source]},
            "n_tokens": 20 * 32, "n_top": 4, "n_per_quantile": 2, "histogram_bins": 16, "device": "cpu",
            "store": {"type": "local", "directory": str(store_dir)}, **top}


def _run(registry, data):
    out = io.StringIO()
    cfg = registry.structure(data, RunConfig)
    summary = registry.get("task", "analyze").factory(cfg, RunContext(registry=registry, out=out, progress=False))
    return summary, out.getvalue()


def _store(store_dir):
    from lmsae.stores.configs import LocalStoreConfig
    from lmsae.stores.local import LocalStore

    return LocalStore(LocalStoreConfig(directory=store_dir))


@pytest.fixture(scope="module")
def analysed(registry, corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    path = _save(registry, tmp / "my-sae")
    summary, text = _run(registry, _config(corpus, path, tmp / "store"))
    return summary, text, tmp / "store"


def test_every_feature_is_recorded_with_statistics(analysed):
    summary, _, store_dir = analysed
    with _store(store_dir) as store:
        record = store.get_dictionary("my-sae", "default")
        assert record is not None and record.model_name == "tiny-random"
        assert record.config["architecture"] == "sae" and record.config["d_sae"] == N_FEATURES
        # the model's config is recorded too: auto-interp rebuilds its tokenizer without a [model] table
        lm = store.get_language_model("tiny-random")
        assert lm is not None and lm.config["model"] == "tiny-random" and lm.config["backend"] == "transformer_lens"
        assert store.list_analyses("my-sae") == ["default"]
        stats = store.feature_statistics("my-sae", "default")
        assert len(stats["index"]) == N_FEATURES and list(stats["index"]) == list(range(N_FEATURES))
        # 20 sequences of 32 tokens, BOS masked
        assert set(stats["n_tokens"].tolist()) == {20 * 31} == {summary["tokens"]}
        assert stats["act_count"][DEAD] == 0 and stats["max_activation"][DEAD] == 0
        assert (stats["act_count"] > 0).sum() == summary["alive"] > N_FEATURES // 2
        dead = store.get_feature_analysis("my-sae", "default", DEAD)
        assert dead.act_count == 0 and dead.samplings == ()


def test_top_contexts_decode_to_the_corpus_text(analysed):
    _, _, store_dir = analysed
    from lmsae.models.transformer_lens import ByteTokenizer

    tok = ByteTokenizer()
    with _store(store_dir) as store:
        stats = store.feature_statistics("my-sae", "default")
        busiest = int(stats["index"][np.argmax(stats["act_count"])])
        fa = store.get_feature_analysis("my-sae", "default", busiest)
    names = [s.name for s in fa.samplings]
    assert names == ["top_activations", "quantile_0.00-0.25", "quantile_0.25-0.50", "quantile_0.50-0.75",
                     "quantile_0.75-1.00"]
    top = fa.samplings[0].samples
    assert len(top) == 4
    assert [s.peak for s in top] == sorted((s.peak for s in top), reverse=True)
    assert top[0].peak == pytest.approx(fa.max_activation)
    for s in top:
        assert s.tokens.shape == s.activations.shape == (32,)
        assert s.tokens[0] == tok.bos_token_id and s.activations[0] == 0  # BOS is masked
        text = tok.decode(s.tokens[1:].tolist())
        assert any(w in text for w in ("fox", "quick", "sparse", "features", "lazy", "dog"))
        assert set(s.meta) >= {"dataset", "document_index", "offset"}
    assert fa.histogram_counts.sum() == fa.act_count and len(fa.histogram_edges) == 17


def test_summary_names_features_with_highlighted_contexts(analysed):
    summary, text, _ = analysed
    assert f"analysed {N_FEATURES} features of 'my-sae'" in text
    assert f"alive: {summary['alive']} of {N_FEATURES}" in text
    assert text.count("«") >= 5 and text.count("»") >= 5
    assert summary["alive_fraction"] == pytest.approx(summary["alive"] / N_FEATURES)


def test_architecture_extras_are_stored(registry, corpus, tmp_path):
    path = _save(registry, tmp_path / "with-extras", config_class=ExtrasSAEConfig)
    EXTRAS_CALLS.clear()
    _run(registry, _config(corpus, path, tmp_path / "store", dictionary_name="x", series="s", analysis_name="a1",
                           n_tokens=4 * 32))
    assert len(EXTRAS_CALLS) == 1 and EXTRAS_CALLS[0].tolist() == list(range(N_FEATURES))
    from lmsae.dictionary.io import load_dictionary

    norms = load_dictionary(path, registry).decoder_norm().detach().numpy()
    with _store(tmp_path / "store") as store:
        assert store.list_analyses("x", "s") == ["a1"]
        for i in (0, 5, DEAD):
            fa = store.get_feature_analysis("x", "s", i, "a1")
            assert fa.extras["decoder_norm"] == pytest.approx(float(norms[i]))
            np.testing.assert_allclose(fa.extras["pair"], [norms[i], 2 * norms[i]], rtol=1e-6)


def test_layout_must_be_sequences(registry, corpus, tmp_path):
    data = _config(corpus, tmp_path / "nothing", tmp_path / "store")
    data["activations"]["layout"] = "tokens"
    with pytest.raises(ConfigError) as err:
        registry.structure(data, RunConfig)
    assert any(p.startswith("$.activations.layout:") and "sequences" in p for p in err.value.problems)


def test_hook_width_mismatch_names_the_hook(registry, corpus, tmp_path):
    cfg = SAEConfig(hook_point_in="blocks.0.hook_mlp_in", d_model=32, d_sae=16, act_fn="relu", normalization="none")
    model = SparseAutoEncoder(cfg)
    save_dictionary(model, tmp_path / "narrow", registry)
    with pytest.raises(DataError, match="blocks.0.hook_mlp_in"):
        _run(registry, _config(corpus, tmp_path / "narrow", tmp_path / "store"))


def test_example_config_round_trips(registry):
    from lmsae.tasks.analyze import example

    cfg = example(registry)
    assert cfg.activations.layout == "sequences" and str(cfg.pretrained.path) == "runs/quickstart"
    plain = registry.unstructure(cfg)
    assert plain["task"] == "analyze"
    assert registry.structure(plain, RunConfig) == cfg
