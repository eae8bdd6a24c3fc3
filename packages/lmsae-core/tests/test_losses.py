"""Tests for lmsae.nn.losses against explicit-loop references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmsae.errors import CheckpointError, ShapeError
from lmsae.nn.losses import (
    DeadFeatureTracker,
    auxk_loss,
    jumprelu_preact_loss,
    reconstruction_loss,
    sparsity_penalty,
)

F64 = torch.float64
TOKEN = ("batch", "context")

# (axes of feature acts, shape, axes of reconstructions, shape)
CASES = [
    (("batch", "sae"), (6, 5), ("batch", "d_model"), (6, 4)),
    (("batch", "context", "sae"), (3, 4, 5), ("batch", "context", "d_model"), (3, 4, 4)),
    (("batch", "layers", "sae"), (6, 2, 5), ("batch", "layers", "d_model"), (6, 2, 4)),
]
IDS = ["batch", "batch-context", "batch-layers"]


def _token_shape(axes, shape):
    return tuple(s for a, s in zip(axes, shape) if a in TOKEN)


def _tokens(axes, shape):
    """All token index tuples (over the token axes, which lead in every case here)."""
    return list(itertools.product(*(range(s) for s in _token_shape(axes, shape))))


def _make_mask(axes, shape, kind):
    if kind == "none":
        return None
    m = torch.rand(_token_shape(axes, shape)) > 0.4
    m.view(-1)[0] = True
    return m if kind == "bool" else m.double()


def _loop_mean(per_token_fn, axes, shape, mask):
    """Masked mean over tokens of a per-token scalar computed by ``per_token_fn(token_idx)``."""
    num, den = 0.0, 0.0
    for idx in _tokens(axes, shape):
        w = 1.0 if mask is None else float(mask[idx])
        if w:
            num += w * per_token_fn(idx)
        den += w
    return num / den if den else 0.0


def _feature_items(t):
    """Flatten the non-token part of one token's slice into a list of floats."""
    return [float(v) for v in t.reshape(-1)]


MASKS = ["none", "bool", "float"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_reconstruction_loss_matches_loop(case, mask_kind):
    torch.manual_seed(0)
    _, _, axes, shape = case
    rec = torch.randn(shape, dtype=F64)
    lab = torch.randn(shape, dtype=F64)
    mask = _make_mask(axes, shape, mask_kind)
    got = reconstruction_loss(rec, lab, axes, mask)
    assert got.ndim == 0

    def per_token(idx):
        return sum((a - b) ** 2 for a, b in zip(_feature_items(rec[idx]), _feature_items(lab[idx])))

    assert math.isclose(float(got), _loop_mean(per_token, axes, shape, mask), rel_tol=1e-12)


def test_reconstruction_loss_shape_errors():
    with pytest.raises(ShapeError, match="reconstruction"):
        reconstruction_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), ("batch", "d_model"))
    with pytest.raises(ShapeError, match="label"):
        reconstruction_loss(torch.zeros(2, 3), torch.zeros(2, 4), ("batch", "d_model"))


def test_reconstruction_loss_zero_mask_is_zero():
    got = reconstruction_loss(
        torch.randn(2, 3, 4), torch.randn(2, 3, 4), ("batch", "context", "d_model"), torch.zeros(2, 3)
    )
    assert float(got) == 0.0


def _decoder_norm(axes, shape, per_layer):
    n_feat = shape[-1]
    if per_layer and "layers" in axes:
        return torch.rand(shape[axes.index("layers")], n_feat, dtype=F64) + 0.5
    return torch.rand(n_feat, dtype=F64) + 0.5


def _norm_at(norm, axes, shape, idx_rest):
    """Decoder norm for the non-token index ``idx_rest`` (aligned to trailing axes)."""
    if norm is None:
        return 1.0
    return float(norm[idx_rest[len(idx_rest) - norm.ndim :]])


def _rest_indices(axes, shape):
    return list(itertools.product(*(range(s) for a, s in zip(axes, shape) if a not in TOKEN)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("kind", ["power", "tanh", "tanh-quad"])
@pytest.mark.parametrize("norm_kind", ["none", "features", "per_layer"])
def test_sparsity_penalty_matches_loop(case, mask_kind, kind, norm_kind):
    torch.manual_seed(0)
    axes, shape, _, _ = case
    acts = torch.relu(torch.randn(shape, dtype=F64))
    mask = _make_mask(axes, shape, mask_kind)
    norm = None if norm_kind == "none" else _decoder_norm(axes, shape, norm_kind == "per_layer")
    p, c, fs = 1.5, 3.0, 0.05
    got = sparsity_penalty(
        acts, axes, kind=kind, decoder_norm=norm, p=p, tanh_stretch=c, frequency_scale=fs, mask=mask
    )
    assert got.ndim == 0
    rest = _rest_indices(axes, shape)

    def s(idx, r):
        return float(acts[idx + r]) * _norm_at(norm, axes, shape, r)

    if kind == "power":
        ref = _loop_mean(lambda idx: sum(abs(s(idx, r)) ** p for r in rest) ** (1 / p), axes, shape, mask)
    elif kind == "tanh":
        ref = _loop_mean(lambda idx: sum(math.tanh(c * s(idx, r)) for r in rest), axes, shape, mask)
    else:
        ref = 0.0
        for r in rest:
            freq = _loop_mean(lambda idx, r=r: math.tanh(c * s(idx, r)), axes, shape, mask)
            ref += freq * (1 + freq / fs)
    assert math.isclose(float(got), ref, rel_tol=1e-10)


def test_sparsity_power_p1_is_weighted_l1_and_grad_finite_at_zero():
    acts = torch.zeros(3, 4, dtype=F64, requires_grad=True)
    got = sparsity_penalty(acts, ("batch", "sae"), kind="power", p=2.0)
    (g,) = torch.autograd.grad(got, acts)
    assert float(got.detach()) == 0.0 and torch.isfinite(g).all()
    acts = torch.rand(3, 4, dtype=F64)
    norm = torch.rand(4, dtype=F64)
    got = sparsity_penalty(acts, ("batch", "sae"), kind="power", decoder_norm=norm)
    torch.testing.assert_close(got, (acts * norm).sum(-1).mean())


def test_sparsity_unknown_kind_and_bad_norm():
    with pytest.raises(ValueError, match="power, tanh, tanh-quad"):
        sparsity_penalty(torch.zeros(2, 3), ("batch", "sae"), kind="l0")
    with pytest.raises(ShapeError, match="decoder_norm"):
        sparsity_penalty(torch.zeros(2, 3), ("batch", "sae"), kind="tanh", decoder_norm=torch.ones(4))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("with_norm", [False, True])
def test_jumprelu_preact_loss_matches_loop(case, mask_kind, with_norm):
    torch.manual_seed(0)
    axes, shape, _, _ = case
    h = torch.randn(shape, dtype=F64)
    theta = torch.rand(shape[-1], dtype=F64) + 0.1
    if "layers" in axes:
        theta = torch.rand(shape[1], shape[-1], dtype=F64) + 0.1
    norm = _decoder_norm(axes, shape, True) if with_norm else None
    mask = _make_mask(axes, shape, mask_kind)
    got = jumprelu_preact_loss(h, theta, axes, decoder_norm=norm, mask=mask)
    assert got.ndim == 0
    rest = _rest_indices(axes, shape)

    def per_token(idx):
        total = 0.0
        for r in rest:
            th = float(theta[r[len(r) - theta.ndim :]])
            total += max(th - float(h[idx + r]), 0.0) * _norm_at(norm, axes, shape, r)
        return total

    assert math.isclose(float(got), _loop_mean(per_token, axes, shape, mask), rel_tol=1e-12)


def test_jumprelu_preact_loss_grad_reaches_threshold():
    theta = torch.tensor([0.5, 0.5], dtype=F64, requires_grad=True)
    h = torch.tensor([[0.2, 0.9], [0.4, 0.1]], dtype=F64)
    loss = jumprelu_preact_loss(h, theta, ("batch", "sae"))
    (g,) = torch.autograd.grad(loss, theta)
    # Below-threshold entries: (0,0), (1,0), (1,1) -> d/dθ = count / n_tokens.
    torch.testing.assert_close(g, torch.tensor([1.0, 0.5], dtype=F64))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("normalize", [False, True])
def test_auxk_loss_matches_loop(case, mask_kind, normalize):
    torch.manual_seed(0)
    _, _, axes, shape = case
    e = torch.randn(shape, dtype=F64)
    e_hat = torch.randn(shape, dtype=F64)
    mask = _make_mask(axes, shape, mask_kind)
    got = auxk_loss(e, e_hat, axes, mask=mask, normalize=normalize)
    assert got.ndim == 0
    num = _loop_mean(
        lambda idx: sum((a - b) ** 2 for a, b in zip(_feature_items(e[idx]), _feature_items(e_hat[idx]))),
        axes,
        shape,
        mask,
    )
    if normalize:
        num /= _loop_mean(lambda idx: sum(a * a for a in _feature_items(e[idx])), axes, shape, mask)
    assert math.isclose(float(got), num, rel_tol=1e-12)


def test_auxk_loss_none_and_zero_residual():
    e = torch.randn(4, 3)
    got = auxk_loss(e, None, ("batch", "d_model"))
    assert got.ndim == 0 and float(got) == 0.0
    zero = torch.zeros(4, 3)
    assert torch.isfinite(auxk_loss(zero, torch.randn(4, 3), ("batch", "d_model")))
    # A perfect aux reconstruction gives 0; a zero one gives 1 when normalised.
    assert float(auxk_loss(e, e.clone(), ("batch", "d_model"))) == 0.0
    assert math.isclose(float(auxk_loss(e, torch.zeros_like(e), ("batch", "d_model"))), 1.0, rel_tol=1e-6)


# ----------------------------------------------------------------------- DeadFeatureTracker


def _tracker_reference(batches, shape):
    """Loop reference: counts per feature over a list of (acts, axes, mask)."""
    counts = {r: 0 for r in itertools.product(*(range(s) for s in shape))}
    for acts, axes, mask in batches:
        toks = _tokens(axes, acts.shape)
        live = [t for t in toks if mask is None or bool(mask[t])]
        rest_axes = [a for a in axes if a not in TOKEN]
        for r in counts:
            counts[r] += len(live)
        for t in live:
            for full in itertools.product(*(range(acts.shape[len(t) + i]) for i in range(len(rest_axes)))):
                if float(acts[t + full]) > 0:
                    counts[full[len(full) - len(shape) :]] = 0
    out = torch.zeros(shape, dtype=torch.int64)
    for r, v in counts.items():
        out[r] = v
    return out


def _sparse_acts(shape, p=0.08):
    return torch.relu(torch.randn(shape)) * (torch.rand(shape) < p)


@pytest.mark.parametrize(
    "axes,acts_shape,track_shape",
    [
        (("batch", "sae"), (8, 12), (12,)),
        (("batch", "context", "sae"), (3, 4, 12), (12,)),
        (("batch", "layers", "sae"), (6, 3, 12), (3, 12)),  # per-layer tracking
        (("batch", "layers", "sae"), (6, 3, 12), (12,)),  # layers reduced
    ],
)
@pytest.mark.parametrize("with_mask", [False, True])
def test_dead_feature_tracker_matches_loop(axes, acts_shape, track_shape, with_mask):
    torch.manual_seed(0)
    tracker = DeadFeatureTracker(track_shape)
    batches = []
    for _ in range(4):
        acts = _sparse_acts(acts_shape)
        mask = (torch.rand(_token_shape(axes, acts_shape)) > 0.3) if with_mask else None
        tracker.update(acts, axes, mask)
        batches.append((acts, axes, mask))
        assert torch.equal(tracker.tokens_since_fired, _tracker_reference(batches, track_shape))
    assert tracker.tokens_since_fired.dtype == torch.int64
    dead = tracker.dead_mask(10)
    assert torch.equal(dead, tracker.tokens_since_fired >= 10)


def test_dead_feature_tracker_mask_excludes_firing():
    tracker = DeadFeatureTracker(3)
    acts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    tracker.update(acts, ("batch", "sae"), torch.tensor([True, False, True]))
    # Feature 1 fired only on a masked token: it stays unfired; 2 unmasked tokens counted.
    assert tracker.tokens_since_fired.tolist() == [0, 2, 2]


def test_dead_feature_tracker_state_roundtrip_and_errors():
    torch.manual_seed(0)
    tracker = DeadFeatureTracker((2, 5))
    tracker.update(_sparse_acts((7, 2, 5), 0.3), ("batch", "layers", "sae"))
    state = tracker.state_dict()
    other = DeadFeatureTracker((2, 5))
    other.load_state_dict(state)
    assert torch.equal(other.tokens_since_fired, tracker.tokens_since_fired)
    state["tokens_since_fired"].fill_(99)  # a copy: the tracker is unaffected
    assert not torch.equal(tracker.tokens_since_fired, state["tokens_since_fired"])
    with pytest.raises(CheckpointError):
        other.load_state_dict({"tokens_since_fired": torch.zeros(5, dtype=torch.int64)})
    with pytest.raises(CheckpointError):
        other.load_state_dict({})
    with pytest.raises(ShapeError):
        tracker.update(torch.zeros(4, 6), ("batch", "sae"))
