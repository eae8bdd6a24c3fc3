"""`task = "generate"` end to end with the tiny random model: cache, check, resume, train from it."""

from __future__ import annotations

import io
import json
import pathlib
from typing import ClassVar

import pytest
import torch

from lmsae.activations.cache import check_cache, describe_cache
from lmsae.config import config_class
from lmsae.config.base import LanguageModelConfig, RunConfig, WriterConfig
from lmsae.errors import DataError
from lmsae.hookspecs import hookimpl
from lmsae.records import WriterSpec
from lmsae.registry import load_registry
from lmsae.runtime import RunContext
from lmsae.tasks.common import model_loader, stream_builder
from lmsae.testing.plugins import fake_entry_points, module

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
MODEL = {"backend": "transformer_lens", "model": "tiny-random", "device": "cpu"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over the lazy dog while sparse features fire rarely".split()
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        n = int(torch.randint(20, 120, (1,), generator=g))
        text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))
        (d / f"doc{i:03d}.txt").write_text(text + ".")
    return d


@pytest.fixture
def registry(monkeypatch):
    fake_entry_points(monkeypatch, [])
    return load_registry()


def source(corpus, **kw) -> dict:
    return {"type": "text", "dataset": {"path": str(corpus / "*.txt")}, "context_size": 32, "model_batch_size": 5,
            **kw}


def generate(registry, corpus, out, **top) -> dict:
    data = {"task": "generate", "model": MODEL, "sources": [source(corpus)], "hook_points": HOOKS,
            "output_dir": str(out), "writer": {"chunk_sequences": 8, "write_threads": 1}, **top}
    cfg = registry.structure(data, RunConfig)
    return registry.get("task", "generate").factory(cfg, RunContext(registry=registry, out=io.StringIO(),
                                                                     progress=False))


def test_generate_writes_a_checked_cache(registry, corpus, tmp_path):
    summary = generate(registry, corpus, tmp_path / "c")
    assert summary["sequences"] > 20 and summary["tokens"] == summary["sequences"] * 32
    assert set(summary["hook_points"]) == set(HOOKS)
    report = check_cache(tmp_path / "c", verify="sha256", progress=False)
    assert report.ok, report.problems
    assert describe_cache(tmp_path / "c")["model"] == "tiny-random"


def test_total_tokens_budget(registry, corpus, tmp_path):
    summary = generate(registry, corpus, tmp_path / "c", total_tokens=10 * 32)
    assert summary["sequences"] == 10


def test_unknown_hook_fails_before_writing(registry, corpus, tmp_path):
    with pytest.raises(DataError, match="blocks.0.hook_resid_postt"):
        generate(registry, corpus, tmp_path / "c", hook_points=["blocks.0.hook_resid_postt"])
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_sharded_generation_resumes_after_a_kill(registry, corpus, tmp_path, monkeypatch):
    # reference: two shards written in one go each
    for shard in (0, 1):
        generate(registry, corpus, tmp_path / "ref", n_shards=2, shard_index=shard)

    # shard 0 is killed after its third chunk write; rerunning the same config resumes it
    import lmsae.activations.cache as cache_mod

    real_write = cache_mod.ActivationWriter.write
    calls = {"n": 0}

    def dying_write(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real_write(self, batch)

    monkeypatch.setattr(cache_mod.ActivationWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        generate(registry, corpus, tmp_path / "run", n_shards=2, shard_index=0)
    monkeypatch.setattr(cache_mod.ActivationWriter, "write", real_write)
    partial = json.loads((tmp_path / "run" / "shard-0000" / "manifest.json").read_text())
    assert 0 < len(partial["chunks"]) and not partial.get("finished")
    out = io.StringIO()
    data = {"task": "generate", "model": MODEL, "sources": [source(corpus)], "hook_points": HOOKS,
            "output_dir": str(tmp_path / "run"), "writer": {"chunk_sequences": 8, "write_threads": 1},
            "n_shards": 2, "shard_index": 0}
    registry.get("task", "generate").factory(registry.structure(data, RunConfig),
                                             RunContext(registry=registry, out=out, progress=False))
    assert "resuming shard 0" in out.getvalue()
    generate(registry, corpus, tmp_path / "run", n_shards=2, shard_index=1)
    for rel in ("shard-0000", "shard-0001"):
        for f in sorted((tmp_path / "ref" / rel).rglob("*.safetensors")):
            assert f.read_bytes() == (tmp_path / "run" / rel / f.relative_to(tmp_path / "ref" / rel)).read_bytes()
    assert check_cache(tmp_path / "run", progress=False).ok


def test_training_from_the_cache_sees_the_live_batches(registry, corpus, tmp_path):
    generate(registry, corpus, tmp_path / "c")
    acts = {"batch_size": 64, "shuffle_buffer": 256, "seed": 5, "prefetch": 0}
    from lmsae.activations.factory import ActivationsConfig

    live_cfg = registry.structure({**acts, "sources": [source(corpus)]}, ActivationsConfig)
    cached_cfg = registry.structure({**acts, "sources": [{"type": "cached", "path": str(tmp_path / "c")}]},
                                    ActivationsConfig)
    lm = model_loader(registry, registry.structure(MODEL, LanguageModelConfig))
    live = list(stream_builder(registry, live_cfg, tuple(HOOKS), language_model=lm, progress=False)())
    cached = list(stream_builder(registry, cached_cfg, tuple(HOOKS), language_model=lm, progress=False)())
    assert len(live) == len(cached) > 3
    for a, b in zip(live, cached, strict=True):
        for k in (*HOOKS, "tokens", "mask"):
            assert torch.equal(a[k], b[k]), k


def test_train_from_cache_end_to_end(registry, corpus, tmp_path):
    generate(registry, corpus, tmp_path / "c")
    data = {"task": "train", "output_dir": str(tmp_path / "sae"), "device": "cpu", "loggers": [],
            "dictionary": {"architecture": "sae", "hook_point_in": HOOKS[0], "d_model": 64, "expansion_factor": 2,
                           "top_k": 8},
            "activations": {"batch_size": 128, "sources": [{"type": "cached", "path": str(tmp_path / "c")}]},
            "trainer": {"total_training_tokens": 128 * 6, "log_every": 2}}
    out = io.StringIO()
    result = registry.get("task", "train").factory(registry.structure(data, RunConfig),
                                                   RunContext(registry=registry, out=out, progress=False))
    assert result.reason == "completed" and result.steps == 6
    assert "explained variance" in out.getvalue()


def test_train_then_evaluate_analyze_and_attribute_logits(registry, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LMSAE_STORE_DIR", str(tmp_path / "store"))
    text = {"batch_size": 64, "prefetch": 0, "sources": [source(corpus)]}
    data = {"task": "train", "output_dir": str(tmp_path / "sae"), "device": "cpu", "loggers": [], "model": MODEL,
            "dictionary": {"architecture": "sae", "hook_point_in": HOOKS[0], "d_model": 64, "expansion_factor": 2,
                           "top_k": 8},
            "activations": text, "eval_activations": text,
            "trainer": {"total_training_tokens": 64 * 6, "log_every": 2},
            "after_training": {"evaluate": True, "analyze": True, "attribute_logits": True, "evaluate_tokens": 256,
                               "splice_tokens": 64, "analyze_tokens": 256, "dictionary_name": "tiny-sae"}}
    out = io.StringIO()
    registry.get("task", "train").factory(registry.structure(data, RunConfig),
                                          RunContext(registry=registry, out=out, progress=False))
    text_out = out.getvalue()
    assert "after training: evaluate (with splicing)" in text_out and "after training: analyze" in text_out
    from lmsae.stores.configs import LocalStoreConfig
    from lmsae.stores.local import LocalStore

    with LocalStore(LocalStoreConfig()) as store:
        assert store.get_dictionary("tiny-sae") is not None
        assert store.list_analyses("tiny-sae") == ["default"]
        assert len(store.feature_statistics("tiny-sae", "default")["index"]) == 128
        assert store.get_logit_attribution("tiny-sae", "default", 0) is not None
        (evaluation,) = store.list_evaluations("tiny-sae")
        assert "ce_loss_recovered" in evaluation.metrics


def test_after_training_needs_held_out_text(registry, corpus, tmp_path):
    from lmsae.errors import ConfigError

    data = {"task": "train", "output_dir": str(tmp_path), "model": MODEL,
            "dictionary": {"architecture": "sae", "hook_point_in": HOOKS[0], "d_model": 64},
            "activations": {"sources": [source(corpus)]}, "trainer": {"total_training_tokens": 64},
            "after_training": {"analyze": True}}
    with pytest.raises(ConfigError, match=r"\$\.after_training: evaluate/analyze after training read held-out"):
        registry.structure(data, RunConfig)


def test_generation_stops_at_the_budget_without_running_the_model_further(registry, corpus, tmp_path, monkeypatch):
    from lmsae.sources.text_source import TextSource

    real_iter = TextSource.__iter__
    produced: list[int] = []

    def counting_iter(self):
        for chunk in real_iter(self):
            produced.append(int(chunk["tokens"].shape[0]))  # the model has run on these sequences
            yield chunk

    monkeypatch.setattr(TextSource, "__iter__", counting_iter)
    summary = generate(registry, corpus, tmp_path / "c", total_tokens=10 * 32)
    assert summary["sequences"] == 10
    assert produced == [5, 5]  # two model batches of 5 sequences, no third one thrown away


@config_class
class MemoryWriterConfig(WriterConfig):
    """A plugin's cache format that is not the core's (nothing on disk)."""

    name: ClassVar[str] = "memory"


class MemoryWriter:
    def __init__(self, config, directory, *, hook_points, shard_index, n_shards, description, overwrite):
        self.batches: list[dict] = []

    def resume_position(self) -> int:
        return 0

    def write(self, batch) -> None:
        self.batches.append(batch)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


@hookimpl
def _register_memory_writer():
    return [WriterSpec(config_class=MemoryWriterConfig, factory=MemoryWriter)]


def test_a_plugin_writer_of_another_format_finishes_without_the_core_summary(corpus, tmp_path, monkeypatch):
    fake_entry_points(monkeypatch, [])
    reg = load_registry(plugins=[module("memory_writer", lmsae_register_writers=_register_memory_writer)])
    summary = generate(reg, corpus, tmp_path / "c", writer={"format": "memory"}, total_tokens=10 * 32)
    assert summary == {"path": str(tmp_path / "c"), "format": "memory", "shard_index": 0, "written_tokens": 10 * 32}
    assert not (tmp_path / "c" / "manifest.json").exists()
