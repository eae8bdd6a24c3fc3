"""Tests for lmsae.activations.factory: mixing, re-batching, shuffling and exact resume."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from lmsae.activations.factory import ActivationFactory, ActivationsConfig, build_activation_stream
from lmsae.activations.protocol import SourceContext
from lmsae.config.fields import FieldValueError
from lmsae.errors import CheckpointError, DataError, PluginError
from lmsae.sources.synthetic_source import SyntheticSource, SyntheticSourceConfig, build_synthetic_source
from lmsae.training.state_io import load_tensors_and_json, save_tensors_and_json

HOOK = "hook"
D = 4


class TaggedStream:
    """A resumable in-memory stream whose every row is identifiable.

    Chunk ``i`` has ``rows`` rows (or ``rows`` sequences of ``context`` tokens); ``tokens`` holds a
    unique id ``source * 10**9 + i * 1000 + j`` and the activations hold
    ``[source, i, j, i * 1000 + j]``.
    ``masked`` rows (positions ``j`` in that set) have mask False.
    """

    def __init__(self, source: int, n_chunks: int | None = None, rows: int = 3, *, context: int | None = None,
                 meta: bool = False, masked: tuple[int, ...] = (), d: int = D, dtype=torch.float32,
                 keys: tuple[str, ...] = (HOOK,)):
        self.source, self.n_chunks, self.rows, self.context = source, n_chunks, rows, context
        self.meta, self.masked, self.d, self.dtype, self.keys = meta, masked, d, dtype, keys
        self.position = 0

    def chunk(self, i: int) -> dict:
        n = self.rows * (self.context or 1)
        j = torch.arange(n)
        ids = self.source * 10**9 + i * 1000 + j
        x = torch.zeros(n, self.d, dtype=torch.float64)
        x[:, 0], x[:, 1], x[:, 2], x[:, 3] = self.source, i, j, ids % 10**9
        mask = torch.ones(n, dtype=torch.bool)
        for m in self.masked:
            mask[j % (self.context or n) == m] = False
        lead = (self.rows,) if self.context is None else (self.rows, self.context)
        out = {k: x.to(self.dtype).reshape(*lead, self.d) for k in self.keys}
        out["mask"] = mask.reshape(lead)
        out["tokens"] = ids.reshape(lead)
        if self.meta:
            out["meta"] = [{"source": self.source, "chunk": i, "row": r} for r in range(self.rows)]
        return out

    def __iter__(self):
        while self.n_chunks is None or self.position < self.n_chunks:
            i = self.position
            self.position += 1
            yield self.chunk(i)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def cfg(**overrides) -> ActivationsConfig:
    kwargs = dict(sources=[SyntheticSourceConfig(d_model=D, n_features=8, mean_active=1.0)], batch_size=4)
    kwargs.update(overrides)
    return ActivationsConfig(**kwargs)


def factory(streams, weights=None, **overrides) -> ActivationFactory:
    c = cfg(**overrides)
    return ActivationFactory(c, streams, weights or [1.0] * len(streams), layout=c.layout)


def ids(batches) -> list[int]:
    return [int(t) for b in batches for t in b["tokens"].reshape(-1)]


def sources_of(batches) -> list[int]:
    return [i // 10**9 for i in ids(batches)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if key == "meta":
                assert x[key] == y[key]
            else:
                assert x[key].dtype == y[key].dtype, key
                assert torch.equal(x[key], y[key]), key


# ---------------------------------------------------------------------- config


def test_config_defaults_and_validation():
    c = cfg()
    assert (c.batch_size, c.layout, c.shuffle_buffer, c.remainder, c.dtype, c.seed, c.drop_masked_tokens) == (
        4, "tokens", 0, "drop", None, 0, True)
    assert ActivationsConfig(sources=c.sources).batch_size == 4096
    for overrides, field in [(dict(sources=[]), "sources"), (dict(batch_size=0), "batch_size"),
                             (dict(shuffle_buffer=-1), "shuffle_buffer"), (dict(remainder="pad"), "remainder"),
                             (dict(layout="rows"), "layout"), (dict(dtype="int8"), "dtype"),
                             (dict(seed=-1), "seed")]:
        with pytest.raises(FieldValueError) as info:
            cfg(**overrides)
        assert info.value.field == field


# ---------------------------------------------------------------------- batching


def test_fixed_batch_size_and_order_without_shuffling():
    f = factory([TaggedStream(0, n_chunks=5, rows=3)], batch_size=4)
    batches = list(f)
    assert [b[HOOK].shape for b in batches] == [(4, D)] * 3  # 15 rows -> 3 batches, 3 dropped
    assert ids(batches) == ids([TaggedStream(0, 5, 3).chunk(i) for i in range(5)])[:12]
    assert all(b["mask"].all() and b["mask"].shape == (4,) for b in batches)
    assert list(f) == []  # ended for good


def test_remainder_keep_emits_the_last_partial_batch():
    batches = list(factory([TaggedStream(0, n_chunks=5, rows=3)], batch_size=4, remainder="keep"))
    assert [b[HOOK].shape[0] for b in batches] == [4, 4, 4, 3]
    assert len(set(ids(batches))) == 15
    exact = list(factory([TaggedStream(0, n_chunks=4, rows=3)], batch_size=4, remainder="keep"))
    assert [b[HOOK].shape[0] for b in exact] == [4, 4, 4]


def test_large_chunks_are_cut_into_many_batches():
    batches = list(factory([TaggedStream(0, n_chunks=2, rows=10)], batch_size=3))
    assert [b[HOOK].shape[0] for b in batches] == [3] * 6
    assert ids(batches) == sorted(ids(batches))


def test_masked_tokens_are_dropped():
    stream = TaggedStream(0, n_chunks=4, rows=5, masked=(1, 3))
    batches = list(factory([stream], batch_size=4, remainder="keep"))
    assert sum(b[HOOK].shape[0] for b in batches) == 4 * 3
    assert all(b["mask"].all() for b in batches)
    assert all(int(i) % 1000 not in (1, 3) for i in ids(batches))

    kept = list(factory([TaggedStream(0, n_chunks=4, rows=5, masked=(1, 3))], batch_size=4,
                        drop_masked_tokens=False))
    assert sum(b[HOOK].shape[0] for b in kept) == 20
    assert int(sum((~b["mask"]).sum() for b in kept)) == 8


def test_tokens_layout_flattens_sequence_chunks_and_drops_meta():
    stream = TaggedStream(0, n_chunks=2, rows=2, context=3, meta=True, masked=(0,))  # position 0 ~ BOS
    batches = list(factory([stream], batch_size=2, remainder="keep"))
    assert all(b[HOOK].ndim == 2 and "meta" not in b for b in batches)
    assert len(ids(batches)) == 2 * 2 * 2  # 12 tokens, 4 masked


def test_sequences_layout_keeps_sequences_and_meta():
    stream = TaggedStream(0, n_chunks=3, rows=2, context=5, meta=True, masked=(0,))
    batches = list(factory([stream], batch_size=4, layout="sequences", remainder="keep"))
    assert [b[HOOK].shape for b in batches] == [(4, 5, D), (2, 5, D)]
    assert [b["mask"].shape for b in batches] == [(4, 5), (2, 5)]
    assert not batches[0]["mask"][:, 0].any()  # masks are kept, not applied, for sequences
    assert [m["chunk"] for m in batches[0]["meta"]] == [0, 0, 1, 1]
    assert len(batches[1]["meta"]) == 2


def test_sequences_layout_with_synthetic_source():
    source = SyntheticSourceConfig(d_model=D, n_features=8, mean_active=1.0, batch_size=3, context_size=7,
                                   n_batches=4)
    c = cfg(sources=[source], batch_size=5, layout="sequences")
    stream = build_activation_stream(c, SourceContext(hook_points=("synthetic.hook_in",)), build_synthetic_source)
    batches = list(stream)
    assert [b["synthetic.hook_in"].shape for b in batches] == [(5, 7, D)] * 2


def test_dtype_cast_applies_to_activations_only():
    batches = list(factory([TaggedStream(0, n_chunks=2)], batch_size=2, dtype="bfloat16"))
    assert batches[0][HOOK].dtype == torch.bfloat16
    assert batches[0]["mask"].dtype == torch.bool and batches[0]["tokens"].dtype == torch.int64


def test_chunk_without_mask_counts_every_token():
    class NoMask(TaggedStream):
        def chunk(self, i):
            out = super().chunk(i)
            del out["mask"]
            return out

    batches = list(factory([NoMask(0, n_chunks=2, rows=2)], batch_size=2))
    assert all(b["mask"].all() for b in batches) and len(batches) == 2


# ---------------------------------------------------------------------- mixing


def mixed(weights, n_rows=4000, seed=0, n_sources=None):
    n_sources = n_sources or len(weights)
    streams = [TaggedStream(s, rows=1) for s in range(n_sources)]
    f = factory(streams, weights, batch_size=100, seed=seed)
    return sources_of(itertools.islice(f, n_rows // 100))


def test_mixing_follows_the_weights_in_config_order():
    counts = Counter(mixed([3.0, 1.0]))
    assert abs(counts[0] / 4000 - 0.75) < 0.03
    counts = Counter(mixed([1.0, 3.0]))
    assert abs(counts[1] / 4000 - 0.75) < 0.03


def test_mixing_is_deterministic_for_a_seed():
    assert mixed([1.0, 1.0], n_rows=500, seed=3) == mixed([1.0, 1.0], n_rows=500, seed=3)
    assert mixed([1.0, 1.0], n_rows=500, seed=3) != mixed([1.0, 1.0], n_rows=500, seed=4)


def test_single_source_needs_no_randomness():
    f = factory([TaggedStream(0, n_chunks=3)], seed=1)
    before = f.state_dict()["mix_generator"].clone()
    list(f)
    assert torch.equal(f.state_dict()["mix_generator"], before)


def test_weights_are_renormalised_when_a_source_runs_out():
    # source 0 is short; afterwards sources 1 and 2 share the draws 2:1
    streams = [TaggedStream(0, n_chunks=30, rows=1), TaggedStream(1, rows=1), TaggedStream(2, rows=1)]
    f = factory(streams, [5.0, 2.0, 1.0], batch_size=1)
    seq = sources_of(itertools.islice(f, 6000))
    assert seq.count(0) == 30  # nothing of the short source is lost
    last = max(i for i, s in enumerate(seq) if s == 0)
    assert last < 200 and f.exhausted == (True, False, False)
    tail = Counter(seq[last + 1:])
    assert abs(tail[1] / sum(tail.values()) - 2 / 3) < 0.03


def test_stream_ends_when_every_source_is_exhausted():
    streams = [TaggedStream(0, n_chunks=7), TaggedStream(1, n_chunks=2)]
    batches = list(factory(streams, [1.0, 1.0], batch_size=1))
    assert Counter(sources_of(batches)) == {0: 21, 1: 6}
    # rows of one source keep their order
    assert ids([b for b in batches if sources_of([b])[0] == 0]) == sorted(i for i in ids(batches) if i < 10**9)


# ---------------------------------------------------------------------- shuffling


def shuffled(seed=0, shuffle_buffer=12, remainder="keep", n_chunks=20):
    streams = [TaggedStream(0, n_chunks=n_chunks, rows=3), TaggedStream(1, n_chunks=n_chunks, rows=5)]
    return list(factory(streams, [1.0, 1.0], batch_size=4, shuffle_buffer=shuffle_buffer, seed=seed,
                        remainder=remainder))


def test_shuffle_is_deterministic_and_preserves_the_rows():
    plain = shuffled(shuffle_buffer=0)
    a, b, other = shuffled(seed=0), shuffled(seed=0), shuffled(seed=1)
    assert_batches_equal(a, b)
    assert ids(a) != ids(plain)
    assert ids(a) != ids(other)
    assert sorted(ids(a)) == sorted(ids(plain)) and len(set(ids(a))) == len(ids(a)) == 20 * 8
    # rows stay whole: activations follow their token id
    for batch in a:
        assert torch.equal(batch[HOOK][:, 0].long() * 10**9 + batch[HOOK][:, 3].long(), batch["tokens"])


def test_shuffle_buffer_mixes_across_chunks_and_drops_remainder():
    a = shuffled(remainder="drop")
    assert all(bt[HOOK].shape[0] == 4 for bt in a) and len(a) == 40
    chunks_in_first = {i // 1000 for i in ids(a[:3])}
    assert len(chunks_in_first) > 1


def test_shuffle_buffer_smaller_than_a_batch():
    batches = list(factory([TaggedStream(0, n_chunks=10, rows=3)], batch_size=8, shuffle_buffer=5,
                           remainder="keep"))
    assert [b[HOOK].shape[0] for b in batches] == [8, 8, 8, 6]
    assert sorted(ids(batches)) == ids([TaggedStream(0, 10, 3).chunk(i) for i in range(10)])


# ---------------------------------------------------------------------- exact resume


def save_and_load(state, tmp_path):
    """Round-trip ``state`` through safetensors + JSON (tensors by reference, the rest as JSON)."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj, path):
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj
            return {"__tensor__": path}
        if isinstance(obj, dict):
            assert all(isinstance(k, str) for k in obj)
            return {k: encode(v, f"{path}.{k}") for k, v in obj.items()}
        if isinstance(obj, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(obj)]
        assert obj is None or isinstance(obj, (bool, int, float, str)), type(obj)
        return obj

    save_tensors_and_json(tmp_path, "stream", tensors, encode(state, "state"))
    loaded, meta = load_tensors_and_json(tmp_path, "stream")

    def decode(obj):
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                return loaded[obj["__tensor__"]]
            return {k: decode(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        return obj

    return decode(meta)


def synthetic_streams(context):
    configs = [SyntheticSourceConfig(d_model=D, n_features=16, mean_active=2.0, batch_size=5, seed=1, n_batches=12),
               SyntheticSourceConfig(d_model=D, n_features=16, mean_active=2.0, batch_size=3, seed=2, n_batches=9,
                                     noise_std=0.1, context_size=2, weight=2.0)]
    return [build_synthetic_source(c, context) for c in configs], [c.weight for c in configs]


def build_tagged(layout):
    context = 3 if layout == "sequences" else None
    return [TaggedStream(0, n_chunks=9, rows=3, context=context, meta=layout == "sequences", masked=(1,)),
            TaggedStream(1, n_chunks=6, rows=4, context=context, meta=layout == "sequences")], [1.0, 3.0]


RESUME_CASES = {
    "one source": (lambda: ([TaggedStream(0, n_chunks=10, rows=3)], [1.0]), dict()),
    "one source shuffled": (lambda: ([TaggedStream(0, n_chunks=10, rows=3)], [1.0]), dict(shuffle_buffer=9)),
    "two sources": (lambda: build_tagged("tokens"), dict()),
    "two sources shuffled keep": (lambda: build_tagged("tokens"), dict(shuffle_buffer=10, remainder="keep")),
    # one source runs out early while two remain: the exhausted flags save a mixing draw
    "three sources one short": (lambda: ([TaggedStream(0, n_chunks=2, rows=2), TaggedStream(1, n_chunks=12, rows=2),
                                          TaggedStream(2, n_chunks=12, rows=2)], [1.0, 1.0, 1.0]),
                                dict(batch_size=3)),
    "sequences shuffled keep": (lambda: build_tagged("sequences"),
                                dict(layout="sequences", batch_size=2, shuffle_buffer=5, remainder="keep")),
    "synthetic mix shuffled": (lambda: synthetic_streams(SourceContext(hook_points=("synthetic.hook_in",))),
                               dict(batch_size=6, shuffle_buffer=16, remainder="keep", dtype="float16", seed=5)),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_exact_resume(case, tmp_path):
    build, overrides = RESUME_CASES[case]
    reference = list(factory(*build(), **overrides))
    assert len(reference) >= 5
    for k in sorted({0, 1, 2, len(reference) // 2, len(reference) - 1, len(reference)}):
        f = factory(*build(), **overrides)
        it = iter(f)
        head = [next(it) for _ in range(k)]
        assert_batches_equal(head, reference[:k])
        state = save_and_load(f.state_dict(), tmp_path / f"k{k}")
        fresh = factory(*build(), **overrides)
        fresh.load_state_dict(state)
        assert_batches_equal(list(fresh), reference[k:])
        # the interrupted factory itself also carries on unchanged
        assert_batches_equal(list(it), reference[k:])


def test_state_is_taken_after_the_batch_is_handed_out():
    f = factory([TaggedStream(0, n_chunks=10, rows=3)], [1.0])
    it = iter(f)
    first = next(it)
    state = f.state_dict()
    assert state["buffer"]["rows"] + state["pending"]["rows"] == 2 and state["sources"] == [{"position": 2}]
    fresh = factory([TaggedStream(0, n_chunks=10, rows=3)], [1.0])
    fresh.load_state_dict(state)
    assert ids([first]) == [0, 1, 2, 1000]
    assert ids([next(iter(fresh))]) == [1001, 1002, 2000, 2001]


def test_load_state_dict_rejects_a_different_set_of_sources():
    state = factory([TaggedStream(0, n_chunks=3)], [1.0]).state_dict()
    with pytest.raises(CheckpointError, match="sources"):
        factory([TaggedStream(0), TaggedStream(1)], [1.0, 1.0]).load_state_dict(state)
    with pytest.raises(CheckpointError):
        factory([TaggedStream(0)], [1.0]).load_state_dict({"format": "something else"})


# ---------------------------------------------------------------------- errors


def test_mismatched_keys_between_sources_name_source_and_key():
    streams = [TaggedStream(0), TaggedStream(1, keys=(HOOK, "other"))]
    with pytest.raises(DataError) as info:
        list(itertools.islice(factory(streams, [1.0, 1.0], batch_size=1, seed=0), 50))
    assert "activation source 1" in str(info.value) and "'other'" in str(info.value)


def test_mismatched_shapes_between_sources_name_source_and_key():
    streams = [TaggedStream(0, d=D), TaggedStream(1, d=D + 2)]
    with pytest.raises(DataError) as info:
        list(itertools.islice(factory(streams, [1.0, 1.0], batch_size=1), 50))
    message = str(info.value)
    assert "activation source" in message and repr(HOOK) in message and "shape" in message


def test_mismatched_dtypes_suggest_casting():
    streams = [TaggedStream(0), TaggedStream(1, dtype=torch.float16)]
    with pytest.raises(DataError, match="dtype"):
        list(itertools.islice(factory(streams, [1.0, 1.0], batch_size=1), 50))
    batches = list(itertools.islice(factory(streams, [1.0, 1.0], batch_size=1, dtype="float32"), 50))
    assert {b[HOOK].dtype for b in batches} == {torch.float32}


def test_inconsistent_leading_lengths_in_a_chunk():
    class Bad(TaggedStream):
        def chunk(self, i):
            out = super().chunk(i)
            out["tokens"] = out["tokens"][:-1]
            return out

    with pytest.raises(DataError, match="activation source 0.*'tokens'"):
        list(factory([Bad(0, n_chunks=2)]))


def test_sequences_layout_with_a_per_token_source():
    with pytest.raises(DataError, match="activation source 0.*sequences"):
        list(factory([TaggedStream(0, n_chunks=2)], layout="sequences"))
    # the synthetic source already refuses at build time
    c = cfg(layout="sequences")
    with pytest.raises(DataError, match="context_size"):
        build_activation_stream(c, SourceContext(hook_points=("synthetic.hook_in",)), build_synthetic_source)


def test_source_missing_a_needed_hook_point():
    with pytest.raises(DataError, match="blocks.0.hook_resid_post"):
        build_activation_stream(cfg(), SourceContext(hook_points=("blocks.0.hook_resid_post",)),
                                build_synthetic_source)


def test_constructor_checks_sources_and_weights():
    with pytest.raises(PluginError, match="resumable"):
        factory([[{"hook": torch.zeros(1, D)}]])
    with pytest.raises(ValueError, match="weights"):
        factory([TaggedStream(0)], [1.0, 2.0])
    with pytest.raises(ValueError, match="weight of source 0"):
        factory([TaggedStream(0)], [0.0])


# ---------------------------------------------------------------------- build_activation_stream


def test_build_activation_stream_passes_weights_layout_and_context():
    seen = []

    def build_source(source_config, context):
        seen.append(context)
        return SyntheticSource(source_config, context)

    sources = [SyntheticSourceConfig(d_model=D, n_features=8, mean_active=1.0, weight=3.0, context_size=2),
               SyntheticSourceConfig(d_model=D, n_features=8, mean_active=1.0, seed=4, context_size=2)]
    c = cfg(sources=sources, layout="sequences")
    stream = build_activation_stream(c, SourceContext(hook_points=("synthetic.hook_in",), seed=9), build_source)
    assert stream.weights == [3.0, 1.0]
    assert [ctx.layout for ctx in seen] == ["sequences", "sequences"]
    assert stream.sources[0].ground_truth.seed == 9 and stream.sources[1].ground_truth.seed == 4
    assert next(iter(stream))["synthetic.hook_in"].shape == (4, 2, D)


class _ChunkedRows:
    """The same 60 rows (ids 0..59) cut into chunks of a given size; resumable."""

    def __init__(self, chunk: int):
        self.chunk, self.position = chunk, 0

    def __iter__(self):
        while self.position * self.chunk < 60:
            start = self.position * self.chunk
            ids = torch.arange(start, min(start + self.chunk, 60))
            self.position += 1
            yield {"h": ids.double()[:, None].repeat(1, 2), "mask": torch.ones(len(ids), dtype=torch.bool)}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@pytest.mark.parametrize("shuffle_buffer", [0, 16, 25])
def test_batches_do_not_depend_on_how_a_source_cuts_its_chunks(shuffle_buffer):
    # a cached stream (big chunks) and a live one (small chunks) must give the same batches
    streams = []
    for chunk in (1, 7, 60):
        cfg = ActivationsConfig(sources=[SyntheticSourceConfig(d_model=2, n_features=4, mean_active=1.0)],
                                batch_size=8, shuffle_buffer=shuffle_buffer, seed=3)
        streams.append([b["h"][:, 0].tolist() for b in ActivationFactory(cfg, [_ChunkedRows(chunk)], [1.0])])
    assert streams[0] == streams[1] == streams[2]
    rows = sum(streams[0], [])
    assert len(rows) == 56 and len(set(rows)) == 56 and set(rows) <= {float(i) for i in range(60)}


def test_prefetching_gives_the_same_batches_and_exact_state(tmp_path):
    from lmsae.activations.prefetch import PrefetchingStream

    def make():
        cfg = ActivationsConfig(sources=[SyntheticSourceConfig(d_model=2, n_features=4, mean_active=1.0)],
                                batch_size=8, shuffle_buffer=16, seed=3)
        return ActivationFactory(cfg, [_ChunkedRows(7)], [1.0])

    reference = [b["h"] for b in make()]
    pf = PrefetchingStream(make(), depth=3)
    it = iter(pf)
    head = [next(it)["h"] for _ in range(3)]
    state = save_and_load(pf.state_dict(), tmp_path / "s")  # taken while the thread has read ahead
    fresh = PrefetchingStream(make(), depth=1)
    fresh.load_state_dict(state)
    rest = [b["h"] for b in fresh]
    assert all(torch.equal(a, b) for a, b in zip(head + rest, reference, strict=True))


def test_prefetching_surfaces_errors_in_the_consumer():
    from lmsae.activations.prefetch import PrefetchingStream

    class Broken:
        def __iter__(self):
            yield {"h": torch.zeros(2, 2)}
            raise DataError("chunk 1 is corrupt")

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    it = iter(PrefetchingStream(Broken(), depth=2))
    next(it)
    with pytest.raises(DataError, match="chunk 1 is corrupt"):
        next(it)
