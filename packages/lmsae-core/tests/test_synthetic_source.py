"""Tests for lmsae.sources.synthetic_source: the ``synthetic`` source behind the stream protocol."""

from __future__ import annotations

import itertools

import attrs
import pytest
import torch

from lmsae.activations.protocol import ActivationStream, SourceContext
from lmsae.config.fields import FieldValueError, field_doc
from lmsae.errors import CheckpointError, ConfigError, DataError
from lmsae.sources.synthetic import SyntheticActivations
from lmsae.sources.synthetic_source import SyntheticSource, SyntheticSourceConfig, build_synthetic_source

HOOK = "synthetic.hook_in"
OUT = "synthetic.hook_out"


def config(**overrides) -> SyntheticSourceConfig:
    kwargs = dict(d_model=8, n_features=64, mean_active=3.0, batch_size=16, seed=0)
    kwargs.update(overrides)
    return SyntheticSourceConfig(**kwargs)


def context(hook_points=(HOOK,), **overrides) -> SourceContext:
    return SourceContext(hook_points=tuple(hook_points), **overrides)


def assert_chunks_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------- config


def test_config_tag_weight_and_docs():
    c = config()
    assert SyntheticSourceConfig.name == "synthetic"
    assert c.weight == 1.0
    fields = attrs.fields(SyntheticSourceConfig)
    assert field_doc(fields.weight).startswith("Relative sampling weight when several sources are mixed")
    assert all(field_doc(f) for f in fields)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(weight=0.0), "weight"),
        (dict(weight=-1.0), "weight"),
        (dict(d_model=0), "d_model"),
        (dict(batch_size=0), "batch_size"),
        (dict(seed=-1), "seed"),
        (dict(mean_active=100.0), "mean_active"),
        (dict(d_out=4), "d_out"),
        (dict(hook_point_out=HOOK), "hook_point_out"),
        (dict(hook_point="mask"), "hook_point"),
        (dict(hook_point=""), "hook_point"),
        (dict(magnitude="gaussian"), "magnitude"),
        (dict(firing_distribution="zipfian"), "firing_distribution"),
        (dict(noise_std=-0.1), "noise_std"),
        (dict(n_batches=0), "n_batches"),
        (dict(context_size=0), "context_size"),
    ],
)
def test_config_validation(overrides, field):
    with pytest.raises(FieldValueError) as info:
        config(**overrides)
    assert info.value.field == field


# ---------------------------------------------------------------------- chunks


def test_is_an_activation_stream_and_matches_ground_truth():
    source = build_synthetic_source(config(), context())
    assert isinstance(source, SyntheticSource)
    assert isinstance(source, ActivationStream)
    chunks = list(itertools.islice(source, 3))
    truth = SyntheticActivations(d_model=8, n_features=64, mean_active=3.0, batch_size=16, seed=0)
    for i, chunk in enumerate(chunks):
        assert_chunks_equal(chunk, truth.batch(i))
    assert chunks[0][HOOK].shape == (16, 8)
    assert source.position == 3
    assert source.ground_truth.features_in.shape == (64, 8)


def test_unset_seed_uses_the_context_seed():
    a = SyntheticSource(config(seed=None), context(seed=7))
    b = SyntheticSource(config(seed=7), context(seed=0))
    assert torch.equal(a.ground_truth.features_in, b.ground_truth.features_in)
    assert_chunks_equal(next(iter(a)), next(iter(b)))
    with pytest.raises(ConfigError, match="seed"):
        SyntheticSource(config(seed=None), context(seed=-1))


def test_tokens_layout_flattens_sequences():
    source = SyntheticSource(config(context_size=5, batch_size=4), context(layout="tokens"))
    chunk = next(iter(source))
    raw = source.ground_truth.batch(0)
    assert chunk[HOOK].shape == (20, 8)
    assert chunk["mask"].shape == (20,) and chunk["tokens"].shape == (20,)
    assert torch.equal(chunk[HOOK], raw[HOOK].reshape(20, 8))
    assert torch.equal(chunk["tokens"], raw["tokens"].reshape(20))
    # row b*T + t is token t of sequence b
    assert torch.equal(chunk[HOOK][2 * 5 + 3], raw[HOOK][2, 3])


def test_sequences_layout_keeps_sequences():
    source = SyntheticSource(config(context_size=5, batch_size=4), context(layout="sequences"))
    chunk = next(iter(source))
    assert chunk[HOOK].shape == (4, 5, 8)
    assert chunk["mask"].shape == (4, 5)


def test_sequences_layout_needs_context_size():
    with pytest.raises(DataError, match="context_size"):
        SyntheticSource(config(), context(layout="sequences"))


def test_missing_hook_point_is_named_with_what_is_provided():
    with pytest.raises(DataError) as info:
        SyntheticSource(config(), context(hook_points=(HOOK, "blocks.3.hook_resid_post")))
    message = str(info.value)
    assert "'blocks.3.hook_resid_post'" in message and repr(HOOK) in message and "hook_point_out" in message
    with pytest.raises(DataError, match=OUT):
        SyntheticSource(config(), context(hook_points=(HOOK, OUT)))


def test_transcoder_hooks_and_only_requested_keys():
    both = SyntheticSource(config(hook_point_out=OUT, d_out=6), context(hook_points=(HOOK, OUT)))
    chunk = next(iter(both))
    assert set(chunk) == {HOOK, OUT, "mask", "tokens"}
    assert chunk[OUT].shape == (16, 6)
    only_in = SyntheticSource(config(hook_point_out=OUT, d_out=6), context(hook_points=(HOOK,)))
    assert set(next(iter(only_in))) == {HOOK, "mask", "tokens"}
    # no hook points asked for: everything provided
    assert set(next(iter(SyntheticSource(config(hook_point_out=OUT), context(hook_points=()))))) == {
        HOOK, OUT, "mask", "tokens"}


def test_finite_stream_ends():
    source = SyntheticSource(config(n_batches=3), context())
    assert len(list(source)) == 3
    assert list(source) == []
    assert source.state_dict() == {"position": 3}


def test_state_round_trip_resumes_exactly():
    reference = list(itertools.islice(SyntheticSource(config(noise_std=0.1), context()), 6))
    source = SyntheticSource(config(noise_std=0.1), context())
    it = iter(source)
    for _ in range(4):
        next(it)
    state = source.state_dict()
    assert state == {"position": 4}
    fresh = SyntheticSource(config(noise_std=0.1), context())
    fresh.load_state_dict(state)
    resumed = list(itertools.islice(fresh, 2))
    for a, b in zip(resumed, reference[4:], strict=True):
        assert_chunks_equal(a, b)
    # iterating again continues rather than restarting
    assert_chunks_equal(next(iter(source)), reference[4])


def test_load_state_dict_rejects_bad_states():
    source = SyntheticSource(config(n_batches=3), context())
    for bad in ({}, {"position": -1}, {"position": 1.5}, {"position": True}, {"position": 4}):
        with pytest.raises(CheckpointError):
            source.load_state_dict(bad)
    source.load_state_dict({"position": 3})
    assert list(source) == []


def test_data_parallel_shards_are_disjoint_and_cover_the_stream():
    single = list(SyntheticSource(config(n_batches=5), context()))
    rank0 = list(SyntheticSource(config(n_batches=5), context(shard=(0, 2))))
    rank1 = list(SyntheticSource(config(n_batches=5), context(shard=(1, 2))))
    assert len(rank0) == 3 and len(rank1) == 2
    for i, chunk in enumerate(single):
        assert_chunks_equal(chunk, (rank0, rank1)[i % 2][i // 2])
