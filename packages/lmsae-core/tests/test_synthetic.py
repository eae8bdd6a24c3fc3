"""Tests for lmsae.sources.synthetic: the seeded synthetic activation source and scoring helpers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmsae.errors import ShapeError
from lmsae.sources.synthetic import (
    SyntheticActivations,
    max_cosine_similarity,
    mean_max_cosine,
    recovery_fraction,
)

HOOK = "synthetic.hook_in"


def make(**overrides) -> SyntheticActivations:
    kwargs = dict(d_model=32, n_features=256, mean_active=6.0, batch_size=512, seed=0)
    kwargs.update(overrides)
    return SyntheticActivations(**kwargs)


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_ground_truth_and_batches():
    a, b = make(bias_scale=1.0, noise_std=0.1), make(bias_scale=1.0, noise_std=0.1)
    assert torch.equal(a.features_in, b.features_in)
    assert torch.equal(a.bias, b.bias)
    assert torch.equal(a.firing_probabilities, b.firing_probabilities)
    for x, y in zip(itertools.islice(a, 3), itertools.islice(b, 3)):
        assert_batches_equal(x, y)


def test_different_seed_gives_different_truth_and_batches():
    a, b = make(seed=0), make(seed=1)
    assert not torch.equal(a.features_in, b.features_in)
    assert not torch.equal(a.firing_probabilities, b.firing_probabilities)
    assert not torch.equal(a.batch(0)[HOOK], b.batch(0)[HOOK])


def test_consecutive_batches_differ():
    s = make()
    assert not torch.equal(s.batch(0)[HOOK], s.batch(1)[HOOK])


def test_ground_truth_components_use_independent_streams():
    # Turning on the bias or transcoder mode must not move the input dictionary.
    plain = make()
    other = make(bias_scale=2.0, hook_point_out="out", d_out=8)
    assert torch.equal(plain.features_in, other.features_in)
    assert torch.equal(plain.firing_probabilities, other.firing_probabilities)


def test_iter_from_matches_skipping_batches():
    s = make(n_batches=10)
    full = list(s)
    resumed = list(make(n_batches=10).iter_from(4))
    assert len(resumed) == 6
    for x, y in zip(full[4:], resumed):
        assert_batches_equal(x, y)


def test_iter_from_on_endless_stream_and_batch_method_agree():
    s = make()
    it = s.iter_from(7)
    assert_batches_equal(next(it), s.batch(7))
    assert_batches_equal(next(it), s.batch(8))


def test_position_advances_and_resumes():
    s = make(n_batches=5)
    it = iter(s)
    assert s.position == 0
    next(it)
    next(it)
    assert s.position == 2
    saved = s.position
    expected = next(it)
    resumed = make(n_batches=5)
    it2 = resumed.iter_from(saved)
    assert resumed.position == saved
    assert_batches_equal(next(it2), expected)
    assert resumed.position == saved + 1


def test_n_batches_stops_iteration():
    s = make(n_batches=3)
    assert len(list(s)) == 3
    assert s.position == 3
    assert list(s.iter_from(3)) == []
    # A second pass restarts from the beginning.
    assert len(list(s)) == 3


def test_endless_stream_keeps_going():
    s = make(batch_size=4)
    assert len(list(itertools.islice(s, 25))) == 25
    assert s.position == 25


def test_iter_from_past_end_and_batch_out_of_range_raise():
    s = make(n_batches=3)
    with pytest.raises(ValueError, match="position=4 is past the end"):
        s.iter_from(4)
    with pytest.raises(ValueError, match="position must be >= 0"):
        s.iter_from(-1)
    with pytest.raises(IndexError, match="n_batches=3"):
        s.batch(3)


# ---------------------------------------------------------------------- statistics


def test_firing_probabilities_are_calibrated():
    s = make()
    p = s.firing_probabilities
    assert p.shape == (256,)
    assert math.isclose(float(p.sum()), 6.0, rel_tol=1e-9)
    assert bool((p > 0).all()) and bool((p <= 1).all())


def test_probabilities_clip_at_one_and_keep_the_mean():
    # A steep Zipf tail with many active features forces clipping of the head.
    s = make(n_features=64, mean_active=20.0, zipf_exponent=2.0)
    p = s.firing_probabilities
    assert int((p == 1).sum()) > 1
    assert math.isclose(float(p.sum()), 20.0, rel_tol=1e-9)
    assert float(p.max()) <= 1.0


def test_mean_active_equal_to_n_features_fires_everything():
    s = make(n_features=16, mean_active=16, batch_size=8)
    _, codes = s.batch(0, return_codes=True)
    assert bool((codes > 0).all())


def test_empirical_active_count_matches_mean_active():
    s = make(batch_size=4096)
    counts = torch.cat([(s.batch(i, return_codes=True)[1] > 0).sum(1) for i in range(5)])
    assert abs(counts.double().mean().item() - 6.0) / 6.0 < 0.03


@pytest.mark.parametrize("firing", ["zipf", "uniform"])
def test_each_feature_fires_at_its_probability(firing):
    # Covers both the dense (frequent) and binomial (rare) sampling paths.
    s = make(d_model=8, n_features=512, mean_active=8.0, batch_size=4096, firing_distribution=firing)
    n_tokens = 10 * 4096
    fired = sum((s.batch(i, return_codes=True)[1] > 0).sum(0).double() for i in range(10))
    p = s.firing_probabilities
    inner = p < 1
    z = (fired / n_tokens - p)[inner] / torch.sqrt(p * (1 - p) / n_tokens)[inner]
    assert z.abs().max() < 5
    assert 0.8 < z.var() < 1.25
    assert bool((fired[~inner] == n_tokens).all())


def test_firing_is_heavy_tailed_and_shuffled():
    s = make(n_features=1000, mean_active=10.0)
    p = s.firing_probabilities
    top_decile = p.sort(descending=True).values[:100].mean()
    assert top_decile > 5 * p.median()
    # Frequency rank is shuffled over feature indices, not sorted.
    assert not torch.equal(p, p.sort(descending=True).values)
    uniform = make(firing_distribution="uniform").firing_probabilities
    assert torch.allclose(uniform, torch.full_like(uniform, 6.0 / 256))


@pytest.mark.parametrize("magnitude", ["lognormal", "exponential", "constant"])
def test_magnitudes_are_positive_with_the_requested_mean(magnitude):
    s = make(magnitude=magnitude, magnitude_scale=2.5, batch_size=2048)
    _, codes = s.batch(0, return_codes=True)
    active = codes[codes != 0]
    assert bool((codes >= 0).all())
    assert active.numel() > 5000
    assert abs(active.mean().item() - 2.5) / 2.5 < 0.06
    if magnitude == "constant":
        assert torch.all(active == 2.5)
    if magnitude == "lognormal":
        assert active.max() > 10 * active.median()  # heavy tail


# ---------------------------------------------------------------------- structure


def test_ground_truth_directions_are_unit_norm():
    s = make(hook_point_out="out", d_out=12, bias_scale=3.0)
    assert s.features_in.shape == (256, 32)
    assert s.features_out.shape == (256, 12)
    assert torch.allclose(s.features_in.norm(dim=1), torch.ones(256))
    assert torch.allclose(s.features_out.norm(dim=1), torch.ones(256))
    assert math.isclose(s.bias.norm().item(), 3.0, rel_tol=1e-5)
    assert math.isclose(s.bias_out.norm().item(), 3.0, rel_tol=1e-5)
    assert not torch.allclose(s.features_in[:, :12], s.features_out)


def test_sae_mode_has_no_output_side():
    s = make()
    assert s.features_out is None and s.bias_out is None and s.d_out is None
    assert torch.equal(s.bias, torch.zeros(32))
    assert set(s.batch(0)) == {HOOK, "mask", "tokens"}


def test_batch_layout():
    s = make(batch_size=16)
    b = s.batch(0)
    assert b[HOOK].shape == (16, 32) and b[HOOK].dtype == torch.float32
    assert b["mask"].shape == (16,) and b["mask"].dtype == torch.bool and bool(b["mask"].all())
    assert b["tokens"].shape == (16,) and b["tokens"].dtype == torch.int64


def test_x_is_codes_times_features_plus_bias():
    s = make(bias_scale=1.5)
    b, codes = s.batch(3, return_codes=True)
    assert codes.shape == (512, 256)
    torch.testing.assert_close(b[HOOK], codes @ s.features_in + s.bias, atol=1e-5, rtol=1e-5)


def test_transcoder_labels_share_the_code():
    s = make(hook_point_out="blocks.0.hook_mlp_out", d_out=48, bias_scale=0.5)
    b, codes = s.batch(0, return_codes=True)
    y = b["blocks.0.hook_mlp_out"]
    assert y.shape == (512, 48)
    torch.testing.assert_close(b[HOOK], codes @ s.features_in + s.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, codes @ s.features_out + s.bias_out, atol=1e-5, rtol=1e-5)


def test_d_out_defaults_to_d_model():
    s = make(hook_point_out="out")
    assert s.d_out == 32 and s.batch(0)["out"].shape == (512, 32)


def test_noise_is_added_to_inputs_only():
    s = make(noise_std=0.3, hook_point_out="out", batch_size=2048)
    b, codes = s.batch(0, return_codes=True)
    residual = b[HOOK] - (codes @ s.features_in + s.bias)
    assert abs(residual.std().item() - 0.3) < 0.01
    torch.testing.assert_close(b["out"], codes @ s.features_out + s.bias_out, atol=1e-5, rtol=1e-5)
    # The clean part of x is the same as without noise.
    clean, clean_codes = make(hook_point_out="out", batch_size=2048).batch(0, return_codes=True)
    assert torch.equal(codes, clean_codes)


def test_tokens_are_strongest_active_feature_or_minus_one():
    s = make(mean_active=0.7, batch_size=1024)
    b, codes = s.batch(0, return_codes=True)
    none = ~(codes > 0).any(dim=1)
    assert none.any()  # the test needs tokens with no active feature
    expected = torch.where(none, -1, codes.argmax(dim=1))
    assert torch.equal(b["tokens"], expected)


def test_tokens_break_ties_towards_lowest_index():
    s = make(magnitude="constant", batch_size=64)
    b, codes = s.batch(0, return_codes=True)
    active = codes > 0
    first = active.int().argmax(dim=1)
    assert torch.equal(b["tokens"], torch.where(active.any(dim=1), first, -1))


def test_context_size_shapes():
    s = make(batch_size=4, context_size=10, hook_point_out="out", d_out=7)
    b, codes = s.batch(0, return_codes=True)
    assert b[HOOK].shape == (4, 10, 32)
    assert b["out"].shape == (4, 10, 7)
    assert b["mask"].shape == (4, 10) and bool(b["mask"].all())
    assert b["tokens"].shape == (4, 10)
    assert codes.shape == (4, 10, 256)
    torch.testing.assert_close(b[HOOK], codes @ s.features_in + s.bias, atol=1e-5, rtol=1e-5)
    assert s.tokens_per_batch == 40


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtype_is_respected(dtype):
    s = make(dtype=dtype, hook_point_out="out", batch_size=64)
    b, codes = s.batch(0, return_codes=True)
    assert b[HOOK].dtype == dtype and b["out"].dtype == dtype and codes.dtype == dtype
    reference = make(hook_point_out="out", batch_size=64).batch(0)
    tol = 1e-5 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(b[HOOK].float(), reference[HOOK], atol=tol, rtol=tol)


def test_float64_ground_truth_is_float64():
    s = make(dtype=torch.float64)
    assert s.features_in.dtype == torch.float64
    b, codes = s.batch(0, return_codes=True)
    torch.testing.assert_close(b[HOOK], codes @ s.features_in + s.bias)


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 0}, "d_model must be positive, got 0"),
        ({"n_features": -3}, "n_features must be positive"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"batch_size": 2.5}, "batch_size must be an int"),
        ({"d_model": True}, "d_model must be an int"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"mean_active": 0}, "mean_active must be positive"),
        ({"mean_active": 300}, "mean_active=300.0 is infeasible"),
        ({"mean_active": float("nan")}, "mean_active must be a finite number"),
        ({"magnitude": "gamma"}, "magnitude must be one of"),
        ({"firing_distribution": "powerlaw"}, "firing_distribution must be one of"),
        ({"magnitude_scale": 0}, "magnitude_scale must be positive"),
        ({"zipf_exponent": -1}, "zipf_exponent must be non-negative"),
        ({"noise_std": -0.1}, "noise_std must be non-negative"),
        ({"bias_scale": -1}, "bias_scale must be non-negative"),
        ({"n_batches": 0}, "n_batches must be positive"),
        ({"context_size": 0}, "context_size must be positive"),
        ({"d_out": 8}, "d_out is only valid in transcoder mode"),
        ({"hook_point_out": "out", "d_out": 0}, "d_out must be positive"),
        ({"hook_point_out": HOOK}, "hook_point_out must differ from hook_point"),
        ({"hook_point": "mask"}, "hook_point must not be one of the reserved"),
        ({"hook_point_out": "tokens"}, "hook_point_out must not be one of the reserved"),
        ({"hook_point": ""}, "hook_point must be a non-empty string"),
        ({"dtype": torch.int32}, "dtype must be a floating-point torch.dtype"),
    ],
)
def test_validation_errors_name_the_argument(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        make(**overrides)


# ---------------------------------------------------------------------- scoring


def naive_max_cosine(learned: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    out = []
    for t in truth:
        best = -math.inf
        for row in learned:
            denom = t.norm() * row.norm()
            cos = 0.0 if denom == 0 else float(t @ row / denom)
            best = max(best, cos)
        out.append(best)
    return torch.tensor(out)


def test_max_cosine_matches_naive_double_loop():
    g = torch.Generator().manual_seed(0)
    learned = torch.randn(13, 6, generator=g)
    learned[4] = 0  # zero rows must not produce NaN
    truth = torch.randn(9, 6, generator=g)
    truth[2] = 0
    got = max_cosine_similarity(learned, truth)
    assert got.shape == (9,)
    torch.testing.assert_close(got, naive_max_cosine(learned, truth), atol=1e-6, rtol=1e-6)
    assert got[2] == 0


def test_max_cosine_is_signed():
    truth = torch.eye(4)
    assert torch.allclose(max_cosine_similarity(-truth, truth), torch.zeros(4))
    assert torch.allclose(max_cosine_similarity(torch.cat([-truth, 0.5 * truth]), truth), torch.ones(4))


def test_max_cosine_chunks_like_unchunked(monkeypatch):
    import lmsae.sources.synthetic as synthetic

    g = torch.Generator().manual_seed(1)
    learned, truth = torch.randn(50, 8, generator=g), torch.randn(37, 8, generator=g)
    expected = max_cosine_similarity(learned, truth)
    monkeypatch.setattr(synthetic, "_SIMILARITY_CHUNK_ELEMENTS", 100)
    torch.testing.assert_close(max_cosine_similarity(learned, truth), expected)


def test_max_cosine_shape_errors():
    with pytest.raises(ShapeError, match="same width"):
        max_cosine_similarity(torch.ones(3, 4), torch.ones(3, 5))
    with pytest.raises(ShapeError, match="learned must be 2-D"):
        max_cosine_similarity(torch.ones(4), torch.ones(3, 4))
    with pytest.raises(ShapeError, match="at least one row"):
        max_cosine_similarity(torch.ones(0, 4), torch.ones(3, 4))
    assert max_cosine_similarity(torch.ones(2, 4), torch.ones(0, 4)).shape == (0,)


def test_recovery_of_truth_itself_is_one():
    s = make()
    assert recovery_fraction(s.features_in, s.features_in) == 1.0
    assert math.isclose(mean_max_cosine(s.features_in, s.features_in), 1.0, rel_tol=1e-6)


def test_recovery_of_random_matrix_is_about_zero():
    s = make(d_model=64)
    random = torch.randn(512, 64, generator=torch.Generator().manual_seed(5))
    assert recovery_fraction(random, s.features_in) < 0.01
    assert mean_max_cosine(random, s.features_in) < 0.6


def test_recovery_of_sign_flipped_truth_is_zero():
    s = make()
    assert recovery_fraction(-s.features_in, s.features_in) == 0.0


def test_permuted_and_noised_copy_recovers():
    s = make(d_model=64)
    g = torch.Generator().manual_seed(3)
    learned = s.features_in[torch.randperm(256, generator=g)] * 3.0
    learned = learned + 0.01 * torch.randn(learned.shape, generator=g)
    extra = torch.randn(100, 64, generator=g)  # dead weight: extra latents must not hurt
    learned = torch.cat([learned, extra])
    assert recovery_fraction(learned, s.features_in) >= 0.99
    assert mean_max_cosine(learned, s.features_in) > 0.99


def test_recovery_filters_by_firing_probability():
    s = make()
    p = s.firing_probabilities
    frequent = p >= p.median()
    # Learned = only the frequent half of the truth.
    learned = s.features_in[frequent]
    assert math.isclose(recovery_fraction(learned, s.features_in), frequent.double().mean().item())
    cutoff = float(p.median())
    assert recovery_fraction(learned, s.features_in, min_probability=cutoff, probabilities=p) == 1.0
    assert math.isclose(
        mean_max_cosine(learned, s.features_in, min_probability=cutoff, probabilities=p), 1.0, rel_tol=1e-6
    )


def test_recovery_argument_errors():
    s = make()
    with pytest.raises(ValueError, match="min_probability needs probabilities"):
        recovery_fraction(s.features_in, s.features_in, min_probability=0.1)
    with pytest.raises(ValueError, match="probabilities is only used with min_probability"):
        recovery_fraction(s.features_in, s.features_in, probabilities=s.firing_probabilities)
    with pytest.raises(ValueError, match="min_probability excludes all"):
        recovery_fraction(s.features_in, s.features_in, min_probability=2.0, probabilities=s.firing_probabilities)
    with pytest.raises(ShapeError, match="probabilities must have shape"):
        recovery_fraction(s.features_in, s.features_in, min_probability=0.1, probabilities=torch.ones(3))
    with pytest.raises(ValueError, match="threshold must be a number"):
        recovery_fraction(s.features_in, s.features_in, threshold=1.5)
