"""Tests for lmsae.nn.axes against explicit-loop references."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmsae.errors import ShapeError
from lmsae.nn.axes import (
    TOKEN_AXES,
    axis_index,
    check_axes,
    feature_param_view,
    flatten_tokens,
    masked_token_mean,
    sum_over,
    token_dims,
)


def _loop_masked_mean(t: torch.Tensor, axes, mask):
    """Reference: iterate over every token index, accumulate weight * value."""
    tdims = [i for i, a in enumerate(axes) if a in TOKEN_AXES]
    rest_shape = [t.shape[i] for i in range(t.ndim) if i not in tdims]
    num = torch.zeros(rest_shape, dtype=t.dtype)
    den = 0.0
    for idx in itertools.product(*(range(t.shape[d]) for d in tdims)):
        w = 1.0 if mask is None else float(mask[idx])
        sel = [slice(None)] * t.ndim
        for d, i in zip(tdims, idx):
            sel[d] = i
        if w != 0:
            num += w * t[tuple(sel)]
        den += w
    return num / den if den > 0 else torch.zeros_like(num)


def test_axis_index_and_token_dims():
    axes = ("batch", "context", "sae")
    assert axis_index(axes, "sae") == 2
    assert token_dims(axes) == (0, 1)
    assert token_dims(("batch", "layers", "sae")) == (0,)
    assert token_dims(("sae",)) == ()
    with pytest.raises(ShapeError, match="'heads'"):
        axis_index(axes, "heads")


def test_check_axes_names_the_tensor():
    with pytest.raises(ShapeError, match="feature_acts"):
        check_axes(torch.zeros(2, 3, 4), ("batch", "sae"), "feature_acts")
    check_axes(torch.zeros(2, 3), ("batch", "sae"), "feature_acts")


@pytest.mark.parametrize(
    "axes,shape",
    [
        (("batch", "sae"), (5, 3)),
        (("batch", "context", "sae"), (3, 4, 2)),
        (("batch", "layers", "sae"), (4, 2, 3)),
        (("layers", "batch", "context", "d_model"), (2, 3, 2, 3)),
    ],
)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_masked_token_mean_matches_loop(axes, shape, mask_kind):
    torch.manual_seed(0)
    t = torch.randn(shape, dtype=torch.float64)
    tshape = tuple(shape[i] for i, a in enumerate(axes) if a in TOKEN_AXES)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(tshape) > 0.4
        mask.view(-1)[0] = True
    elif mask_kind == "float":
        mask = (torch.rand(tshape) > 0.4).double()
        mask.view(-1)[0] = 1.0
    got, remaining = masked_token_mean(t, axes, mask)
    assert remaining == tuple(a for a in axes if a not in TOKEN_AXES)
    torch.testing.assert_close(got, _loop_masked_mean(t, axes, mask))


def test_masked_token_mean_zero_mask_gives_zero_and_finite_grad():
    t = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    got, _ = masked_token_mean(t, ("batch", "context", "sae"), mask)
    assert torch.equal(got, torch.zeros(5, dtype=torch.float64))
    (g,) = torch.autograd.grad(got.sum(), t)
    assert torch.isfinite(g).all() and (g == 0).all()


def test_masked_token_mean_ignores_nan_at_masked_positions():
    t = torch.randn(4, 3, dtype=torch.float64)
    t[1] = float("nan")
    t[2] = float("inf")
    mask = torch.tensor([True, False, False, True])
    got, _ = masked_token_mean(t, ("batch", "sae"), mask)
    torch.testing.assert_close(got, (t[0] + t[3]) / 2)


def test_mask_shape_error():
    with pytest.raises(ShapeError, match="token mask"):
        masked_token_mean(torch.zeros(2, 3, 4), ("batch", "context", "sae"), torch.ones(2, 4))


def test_sum_over_ignores_absent_names():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 4)
    got, rem = sum_over(t, ("batch", "layers", "d_model"), ("d_model", "layers", "heads"))
    assert rem == ("batch",)
    torch.testing.assert_close(got, t.sum(dim=(1, 2)))
    same, rem2 = sum_over(t, ("batch", "layers", "d_model"), ("heads",))
    assert same is t and rem2 == ("batch", "layers", "d_model")


@pytest.mark.parametrize("with_mask", [False, True])
def test_flatten_tokens_matches_loop(with_mask):
    torch.manual_seed(0)
    axes = ("batch", "layers", "context", "sae")
    t = torch.randn(3, 2, 4, 5)
    mask = (torch.rand(3, 4) > 0.5) if with_mask else None
    got = flatten_tokens(t, axes, mask)
    rows = [
        t[b, :, c, :]
        for b in range(3)
        for c in range(4)
        if mask is None or bool(mask[b, c])
    ]
    expected = torch.stack(rows) if rows else torch.empty(0, 2, 5)
    assert torch.equal(got, expected)


def test_flatten_tokens_requires_token_axis():
    with pytest.raises(ShapeError, match="no token axis"):
        flatten_tokens(torch.zeros(3), ("sae",))


def test_feature_param_view_broadcasts_and_checks():
    acts = torch.randn(4, 2, 3)
    axes = ("batch", "layers", "sae")
    norm = torch.rand(3)
    torch.testing.assert_close(acts * feature_param_view(norm, acts, axes), acts * norm)
    norm2 = torch.rand(2, 3)
    torch.testing.assert_close(acts * feature_param_view(norm2, acts, axes), acts * norm2)
    with pytest.raises(ShapeError, match="decoder_norm"):
        feature_param_view(torch.rand(4), acts, axes, "decoder_norm")
    with pytest.raises(ShapeError, match="decoder_norm"):
        feature_param_view(torch.rand(1, 2, 3), acts, axes, "decoder_norm")
