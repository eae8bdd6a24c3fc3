"""The built-in corpus 'builtin:python-docs': built once, cached, deterministic, substantial."""

from __future__ import annotations

import json
import sys
import time

import pytest

from lmsae.data.corpus import builtin_corpus_document_count, builtin_corpus_path, cache_dir, read_corpus


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lmsae-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMSAE_TEST_CANARY", "canary-7f3a91")  # must not reach the corpus
        path = builtin_corpus_path(cache)
    return cache, path


def test_built_once_then_cached(built):
    cache, path = built
    assert path.is_file() and path.parent == cache / "corpora"
    assert f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}" in path.name
    before = (path.stat().st_mtime_ns, path.read_bytes())
    start = time.monotonic()
    again = builtin_corpus_path(cache)
    assert time.monotonic() - start < 1.0  # a cached load only checks the file (never timing-sensitive)
    assert again == path and (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left nothing behind


def test_content_is_substantial_and_clean(built):
    _, path = built
    columns = read_corpus(path)
    texts = columns["text"]
    assert len(texts) == builtin_corpus_document_count(built[0]) > 1000
    assert path.stat().st_size > 1_000_000 and sum(len(t) for t in texts) > 1_000_000
    assert all(t.strip() for t in texts)  # no empty documents
    assert len(set(texts)) == len(texts)  # deduplicated
    assert not any(" at 0x" in t for t in texts)  # no memory addresses (they would break determinism)
    raw = path.read_text(encoding="utf-8")
    # nothing of this machine: environment variables, installation paths
    assert "canary-7f3a91" not in raw
    assert sys.prefix not in raw and sys.base_prefix not in raw and sys.executable not in raw
    sources = columns["source"]
    assert "topic:assert" in sources and "function:json.dumps" in sources
    assert any(s.startswith("class:collections.") for s in sources)
    # the build ran in a separate interpreter: nothing it imported leaked into this process
    assert "smtpd" not in sys.modules and "turtle" not in sys.modules
    for line in path.read_text(encoding="utf-8").splitlines()[:50]:
        assert set(json.loads(line)) == {"text", "source"}


def test_deterministic(built, tmp_path):
    _, path = built
    rebuilt = builtin_corpus_path(tmp_path, rebuild=True)
    assert rebuilt.read_bytes() == path.read_bytes()


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LMSAE_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LMSAE_CACHE_DIR")
    assert cache_dir().parts[-2:] == (".cache", "lmsae")


def test_loads_as_a_dataset(built, monkeypatch):
    pytest.importorskip("datasets")
    from lmsae.data.datasets import DatasetConfig, iter_texts, load_documents

    cache, path = built
    monkeypatch.setenv("LMSAE_CACHE_DIR", str(cache))
    ds = load_documents(DatasetConfig(path="builtin:python-docs"))
    assert len(ds) == builtin_corpus_document_count(cache)
    first = next(iter_texts(ds, "text"))
    assert first == (0, read_corpus(path)["text"][0])
    head = load_documents(DatasetConfig(path="builtin:python-docs", split="train[:10]"))
    assert len(head) == 10
