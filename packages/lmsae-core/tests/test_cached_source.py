"""Tests for lmsae.sources.cached_source: the ``cached`` source behind the stream protocol."""

from __future__ import annotations

import itertools

import pytest
import torch
from lmsae.activations.cache import ActivationWriter, ActivationWriterConfig
from lmsae.activations.factory import ActivationsConfig, build_activation_stream
from lmsae.activations.protocol import ActivationStream, SourceContext
from lmsae.config.fields import FieldValueError, field_doc
from lmsae.errors import CheckpointError, DataError
from lmsae.sources.cached_source import (
    CACHED_SOURCE_SPEC,
    CachedSource,
    CachedSourceConfig,
    build_cached_source,
)
from lmsae.sources.synthetic_source import SyntheticSource, SyntheticSourceConfig

A = "blocks.0.hook_resid_post"
B = "blocks.1.hook_mlp_out"
T = 5


def synthetic(seed: int, n_batches: int, batch_size: int = 3) -> list[dict]:
    cfg = SyntheticSourceConfig(d_model=8, n_features=32, mean_active=2.0, batch_size=batch_size, seed=seed,
                                context_size=T, n_batches=n_batches, hook_point=A, hook_point_out=B, d_out=4)
    return list(SyntheticSource(cfg, SourceContext(hook_points=(A, B), layout="sequences")))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A two-shard cache: shard 0 holds 13 sequences (chunks 4,4,4,1), shard 1 holds 9 (4,4,1)."""
    root = tmp_path_factory.mktemp("cache")
    for shard, (seed, n) in enumerate([(0, 5), (1, 3)]):
        with ActivationWriter(root, (A, B), ActivationWriterConfig(chunk_sequences=4, dtype="bfloat16"),
                              shard_index=shard, n_shards=2, description={"model": "toy"}) as w:
            batches = synthetic(seed, n)
            if shard == 0:
                batches = [*batches[:4], {k: v[:1] for k, v in batches[4].items()}]
            for i, b in enumerate(batches):
                b["meta"] = [{"shard": shard, "batch": i, "row": r} for r in range(b[A].shape[0])]
                w.write(b)
    return root


def source(path, hooks=(A, B), shard=(0, 1), **cfg) -> CachedSource:
    return build_cached_source(CachedSourceConfig(path=str(path), **cfg),
                               SourceContext(hook_points=tuple(hooks), layout="sequences", shard=shard))


def assert_same_stream(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if key == "meta":
                assert x[key] == y[key]
            else:
                assert torch.equal(x[key], y[key]), key


def test_config_tag_docs_and_validation():
    cfg = CachedSourceConfig(path="x")
    assert cfg.name == "cached" and CACHED_SOURCE_SPEC.name == "cached"
    assert (cfg.verify, cfg.prefetch_chunks, cfg.shards, cfg.weight) == ("size", 2, None, 1.0)
    for field in cfg.__attrs_attrs__:
        assert field_doc(field), field.name
    with pytest.raises(FieldValueError, match="verify"):
        CachedSourceConfig(path="x", verify="md5")
    with pytest.raises(FieldValueError, match="shards"):
        CachedSourceConfig(path="x", shards=[-1])
    with pytest.raises(FieldValueError, match="path"):
        CachedSourceConfig(path="")


def test_yields_shard_0_then_shard_1_in_float32(cache_dir):
    src = source(cache_dir)
    assert isinstance(src, ActivationStream)
    chunks = list(src)
    assert [c[A].shape[0] for c in chunks] == [4, 4, 4, 1, 4, 4, 1]
    assert all(c[A].dtype == torch.float32 and c[A].shape[1:] == (T, 8) and c[B].shape[2] == 4 for c in chunks)
    assert [m["shard"] for c in chunks for m in c["meta"]] == [0] * 13 + [1] * 9
    expected = torch.cat([b[A] for b in synthetic(0, 5)])[:13]
    assert torch.equal(torch.cat([c[A] for c in chunks[:4]]), expected.to(torch.bfloat16).float())
    assert src.state_dict() == {"chunk": 7, "offset": 0}
    assert list(src) == []


@pytest.mark.parametrize("verify", ["none", "size", "sha256"])
def test_prefetch_on_and_off_give_identical_streams(cache_dir, verify):
    reference = list(source(cache_dir, prefetch_chunks=0, verify=verify))
    for depth in (1, 3, 20):
        assert_same_stream(list(source(cache_dir, prefetch_chunks=depth, verify=verify)), reference)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_exact_resume_through_state_dict(cache_dir, prefetch):
    reference = list(source(cache_dir, prefetch_chunks=prefetch))
    src = source(cache_dir, prefetch_chunks=prefetch)
    it = iter(src)
    head = [next(it) for _ in range(3)]
    state = src.state_dict()
    # chunks read ahead by the prefetch thread are not counted as consumed
    assert state == {"chunk": 3, "offset": 0}
    rest_here = list(it)
    resumed = source(cache_dir, prefetch_chunks=prefetch)
    resumed.load_state_dict(state)
    assert_same_stream(head + list(resumed), reference)
    assert_same_stream(head + rest_here, reference)


def test_load_state_dict_restarts_an_abandoned_iteration(cache_dir):
    reference = list(source(cache_dir))
    src = source(cache_dir)
    it = iter(src)
    next(it), next(it)
    src.load_state_dict({"chunk": 1, "offset": 0})
    # the old generator stops instead of moving the restored position
    assert list(it) == [] and src.position == 1
    assert_same_stream(list(src), reference[1:])


def test_bad_states_are_refused(cache_dir):
    src = source(cache_dir)
    for bad in ({"chunk": -1, "offset": 0}, {"chunk": 1, "offset": 3}, {"position": 1}, {"chunk": 8, "offset": 0}):
        with pytest.raises(CheckpointError):
            src.load_state_dict(bad)


@pytest.mark.parametrize("world", [2, 3, 7, 9])
def test_data_parallel_split_is_disjoint_and_covering(cache_dir, world):
    everything = source(cache_dir).chunk_refs
    keys = [(r.shard, r.index) for r in everything]
    parts = [[(r.shard, r.index) for r in source(cache_dir, shard=(rank, world)).chunk_refs] for rank in range(world)]
    flat = list(itertools.chain.from_iterable(parts))
    assert sorted(flat) == sorted(keys) and len(set(flat)) == len(flat)
    for rank, part in enumerate(parts):
        assert part == keys[rank::world]  # every world-th chunk of the global order
    # and the data matches
    rank1 = list(source(cache_dir, shard=(1, world)))
    reference = list(source(cache_dir))
    assert_same_stream(rank1, reference[1::world])


def test_shard_selection(cache_dir):
    chunks = list(source(cache_dir, shards=[1]))
    assert [m["shard"] for c in chunks for m in c["meta"]] == [1] * 9
    with pytest.raises(DataError, match=r"no shard\(s\) \[5\]"):
        source(cache_dir, shards=[5])


def test_hook_subset_and_unknown_hook(cache_dir):
    chunks = list(source(cache_dir, hooks=(B,)))
    assert set(chunks[0]) == {B, "tokens", "mask", "meta"}
    everything = list(source(cache_dir, hooks=()))
    assert set(everything[0]) == {A, B, "tokens", "mask", "meta"}
    with pytest.raises(DataError, match="no hook point") as info:
        source(cache_dir, hooks=(A, "blocks.9.hook_resid_post"))
    assert "'blocks.9.hook_resid_post'" in str(info.value) and A in str(info.value) and B in str(info.value)


def test_missing_cache(tmp_path):
    with pytest.raises(DataError, match="missing manifest"):
        source(tmp_path / "nowhere")


@pytest.mark.parametrize("prefetch", [0, 2])
def test_corrupt_chunk_fails_at_its_position(tmp_path, prefetch):
    with ActivationWriter(tmp_path, (A, B), ActivationWriterConfig(chunk_sequences=3, write_threads=0)) as w:
        for b in synthetic(0, 4):
            w.write(b)
    bad = tmp_path / "shard-0000" / B / "chunk-000002.safetensors"
    bad.write_bytes(bad.read_bytes()[:-1])
    src = source(tmp_path, prefetch_chunks=prefetch)
    it = iter(src)
    next(it), next(it)
    with pytest.raises(DataError, match="size mismatch") as info:
        next(it)
    assert str(bad) in str(info.value) and repr(B) in str(info.value)
    assert src.state_dict()["chunk"] == 2


@pytest.mark.parametrize("layout", ["tokens", "sequences"])
def test_through_the_activation_factory(cache_dir, layout):
    config = ActivationsConfig(sources=[CachedSourceConfig(path=str(cache_dir))], batch_size=7, layout=layout,
                               remainder="keep")
    context = SourceContext(hook_points=(A, B))
    stream = build_activation_stream(config, context, build_cached_source)
    batches = list(stream)
    rows = sum(b[A].shape[0] for b in batches)
    if layout == "sequences":
        assert rows == 22 and "meta" in batches[0]
    else:
        mask_total = sum(int(c["mask"].sum()) for c in source(cache_dir))
        assert rows == mask_total and batches[0][A].shape[1] == 8

    # exact resume through the factory's state
    stream = build_activation_stream(config, context, build_cached_source)
    it = iter(stream)
    head = [next(it) for _ in range(2)]
    state = stream.state_dict()
    resumed = build_activation_stream(config, context, build_cached_source)
    resumed.load_state_dict(state)
    assert_same_stream(head + list(resumed), batches)
