"""Tests for lmsae.nn.activations against explicit-loop references."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmsae.nn.activations import (
    BatchTopK,
    JumpReLU,
    ReLU,
    TopK,
    apply_with_decoder_norm_gating,
    auxk_select,
    build_activation,
    jumprelu,
    jumprelu_l0_step,
)

F64 = torch.float64


def _indices(shape):
    return itertools.product(*(range(s) for s in shape))


# ----------------------------------------------------------------------------- JumpReLU


def _jumprelu_reference(h, theta, eps, g):
    """Loop reference of the forward value and rectangle-kernel gradients (wrt h and θ)."""
    out = torch.zeros_like(h)
    grad_h = torch.zeros_like(h)
    grad_theta = torch.zeros_like(theta)
    p = theta.ndim
    for idx in _indices(h.shape):
        fidx = idx[len(idx) - p :]
        hv, tv, gv = float(h[idx]), float(theta[fidx]), float(g[idx])
        if hv > tv:
            out[idx] = hv
            grad_h[idx] = gv
        if abs(hv - tv) < eps / 2 and hv > 0:
            grad_theta[fidx] += gv * (-tv / eps)
    return out, grad_h, grad_theta


@pytest.mark.parametrize(
    "h_shape,param_shape",
    [((6, 5), (5,)), ((3, 4, 5), (5,)), ((4, 3, 5), (3, 5))],
)
def test_jumprelu_forward_and_grads_match_loop(h_shape, param_shape):
    torch.manual_seed(0)
    eps = 0.4
    # θ small compared with ε/2 so the kernel window also covers non-positive h, exercising
    # the [h > 0] factor.
    act = JumpReLU(param_shape, init_threshold=0.15, bandwidth=eps, dtype=F64)
    with torch.no_grad():
        act.log_threshold.add_(0.3 * torch.randn(param_shape, dtype=F64))
    theta = act.threshold.detach()
    # Pre-activations concentrated around θ so many fall inside the kernel window, plus some
    # negative values to exercise the [h > 0] factor.
    h = (theta + 0.3 * torch.randn(h_shape, dtype=F64)).requires_grad_(True)
    g = torch.randn(h_shape, dtype=F64)

    out = act(h)
    grad_h, grad_log = torch.autograd.grad((out * g).sum(), [h, act.log_threshold])

    ref_out, ref_gh, ref_gtheta = _jumprelu_reference(h.detach(), theta, eps, g)
    torch.testing.assert_close(out.detach(), ref_out)
    torch.testing.assert_close(grad_h, ref_gh)
    # Chain rule through θ = exp(log θ).
    torch.testing.assert_close(grad_log, ref_gtheta * theta)
    # The window was exercised, including non-positive h that must not move θ.
    assert (ref_gtheta != 0).any()
    in_window = (h.detach() - theta).abs() < eps / 2
    assert (in_window & (h.detach() <= 0)).any() and (in_window & (h.detach() > 0)).any()


def test_functional_jumprelu_scalar_threshold():
    h = torch.tensor([[0.1, 0.5, 0.9], [1.5, -2.0, 0.3]], dtype=F64)
    torch.testing.assert_close(jumprelu(h, 0.4, 0.1), torch.where(h > 0.4, h, 0.0))


def test_jumprelu_l0_step_grad_matches_loop():
    torch.manual_seed(1)
    eps = 0.3
    theta = (0.5 + 0.1 * torch.rand(4, dtype=F64)).requires_grad_(True)
    h = (0.5 + 0.4 * torch.randn(7, 4, dtype=F64)).requires_grad_(True)
    g = torch.randn(7, 4, dtype=F64)
    step = jumprelu_l0_step(h, theta, eps)
    (grad_theta,) = torch.autograd.grad((step * g).sum(), [theta])
    ref_step = torch.zeros(7, 4, dtype=F64)
    ref = torch.zeros(4, dtype=F64)
    hd, td = h.detach(), theta.detach()
    for b, i in _indices((7, 4)):
        ref_step[b, i] = float(hd[b, i] > td[i])
        if abs(float(hd[b, i]) - float(td[i])) < eps / 2:
            ref[i] += float(g[b, i]) * (-1.0 / eps)
    torch.testing.assert_close(step.detach(), ref_step)
    torch.testing.assert_close(grad_theta, ref)


def test_rescale_threshold_exact():
    act = JumpReLU((2, 3), init_threshold=0.25, bandwidth=0.1, dtype=F64)
    before = act.threshold.detach().clone()
    act.rescale_threshold(2.0)
    torch.testing.assert_close(act.threshold.detach(), before * 2.0)
    factor = torch.tensor([0.5, 1.0, 4.0], dtype=F64)
    act.rescale_threshold(factor)
    torch.testing.assert_close(act.threshold.detach(), before * 2.0 * factor)
    assert act.log_threshold.grad is None
    with pytest.raises(ValueError, match="> 0"):
        act.rescale_threshold(0.0)


def test_jumprelu_validation():
    with pytest.raises(ValueError, match="init_threshold"):
        JumpReLU(3, init_threshold=0.0, bandwidth=0.1)
    with pytest.raises(ValueError, match="bandwidth"):
        JumpReLU(3, init_threshold=0.1, bandwidth=0.0)
    assert "bandwidth=0.1" in repr(JumpReLU(3, init_threshold=0.1, bandwidth=0.1))


def _train_threshold(lam: float, steps: int = 200):
    """Adam on log θ for loss = ‖jumprelu(h) − h‖² + λ·L0, on fixed random data."""
    torch.manual_seed(0)
    d = 16
    h = torch.randn(256, d).abs()
    act = JumpReLU(d, init_threshold=0.5, bandwidth=0.2)
    opt = torch.optim.Adam(act.parameters(), lr=0.02)
    for _ in range(steps):
        out = act(h)
        recon = (out - h).square().sum(-1).mean()
        l0 = act.step(h).sum(-1).mean()
        loss = recon + lam * l0
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final_l0 = (act(h) > 0).float().sum(-1).mean().item()
    return act.threshold.detach(), final_l0


def test_jumprelu_learns_threshold_and_l0_tracks_lambda():
    theta_small, l0_small = _train_threshold(lam=0.01)
    theta_large, l0_large = _train_threshold(lam=1.0)
    init = torch.full_like(theta_small, 0.5)
    # The threshold moves by a meaningful amount in both runs, in opposite directions.
    assert (theta_small - init).abs().mean() > 0.1
    assert (theta_large - init).abs().mean() > 0.1
    assert theta_large.mean() > theta_small.mean()
    assert l0_large < l0_small - 1.0


# --------------------------------------------------------------------------------- TopK


def _topk_reference(h, k):
    out = torch.zeros_like(h)
    rows = h.reshape(-1, h.shape[-1])
    flat_out = out.view(-1, h.shape[-1])
    for r in range(rows.shape[0]):
        row = torch.relu(rows[r])
        order = sorted(range(row.numel()), key=lambda i: -float(row[i]))
        for i in order[:k]:
            flat_out[r, i] = row[i]
    return out


@pytest.mark.parametrize("shape", [(6, 10), (2, 3, 10), (4, 10)])
def test_topk_matches_sorted_reference(shape):
    torch.manual_seed(0)
    h = torch.randn(shape, dtype=F64)
    act = TopK(3)
    torch.testing.assert_close(act(h), _topk_reference(h, 3))


def test_topk_relu_first_and_grad_only_at_kept():
    torch.manual_seed(0)
    h = torch.randn(5, 8, dtype=F64)
    h[0] = -torch.rand(8, dtype=F64)  # all negative: nothing may survive
    h.requires_grad_(True)
    out = TopK(4)(h)
    assert (out >= 0).all()
    assert (out[0] == 0).all()
    g = torch.randn(5, 8, dtype=F64)
    (grad,) = torch.autograd.grad((out * g).sum(), h)
    kept = out != 0
    torch.testing.assert_close(grad, torch.where(kept, g, 0.0))


def test_topk_k_validation_and_mutation():
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 0"):
        TopK(0)
    act = TopK(2)
    act.k = 5
    assert act.k == 5 and "k=5" in repr(act)
    with pytest.raises(ValueError, match="k must be"):
        act.k = -1
    with pytest.raises(ValueError, match="k must be"):
        BatchTopK(0)
    # k larger than the feature count keeps everything positive.
    h = torch.randn(3, 4)
    torch.testing.assert_close(TopK(10)(h), torch.relu(h))


# ---------------------------------------------------------------------------- BatchTopK


def _batchtopk_reference(h, k, mask=None):
    d = h.shape[-1]
    rows = h.reshape(-1, d)
    valid = [True] * rows.shape[0] if mask is None else [bool(v) for v in mask.reshape(-1)]
    entries = [
        (float(torch.relu(rows[r, i])), r, i)
        for r in range(rows.shape[0])
        if valid[r]
        for i in range(d)
    ]
    entries.sort(key=lambda e: -e[0])
    out = torch.zeros_like(rows)
    for v, r, i in entries[: k * sum(valid)]:
        out[r, i] = v
    return out.reshape(h.shape)


@pytest.mark.parametrize("shape", [(6, 10), (3, 4, 10)])
def test_batchtopk_matches_flatten_sort_reference(shape):
    torch.manual_seed(0)
    h = torch.randn(shape, dtype=F64)
    out = BatchTopK(3)(h)
    torch.testing.assert_close(out, _batchtopk_reference(h, 3))
    n_tokens = h.numel() // shape[-1]
    assert int((out != 0).sum()) == 3 * n_tokens


def test_batchtopk_with_mask_on_batch_context():
    torch.manual_seed(0)
    h = torch.randn(3, 4, 12, dtype=F64)
    # Make masked tokens very large: they must still be excluded.
    mask = torch.rand(3, 4) > 0.4
    h = torch.where(mask.unsqueeze(-1), h, h.abs() + 10)
    out = BatchTopK(2)(h, mask=mask)
    torch.testing.assert_close(out, _batchtopk_reference(h, 2, mask))
    assert (out[~mask] == 0).all()
    assert int((out != 0).sum()) == 2 * int(mask.sum())


def test_batchtopk_gradient_only_to_kept():
    torch.manual_seed(0)
    h = torch.randn(4, 6, dtype=F64, requires_grad=True)
    mask = torch.tensor([True, False, True, True])
    out = BatchTopK(2)(h, mask=mask)
    g = torch.randn(4, 6, dtype=F64)
    (grad,) = torch.autograd.grad((out * g).sum(), h)
    torch.testing.assert_close(grad, torch.where(out != 0, g, 0.0))


def test_batchtopk_all_masked_gives_zeros():
    h = torch.randn(2, 3, 5)
    out = BatchTopK(2)(h, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert (out == 0).all()


# ------------------------------------------------------------------------------- gating


def test_gating_equals_manual_for_relu_and_jumprelu():
    torch.manual_seed(0)
    h = torch.randn(5, 2, 6, dtype=F64)
    n = torch.rand(2, 6, dtype=F64) + 0.2
    torch.testing.assert_close(apply_with_decoder_norm_gating(ReLU(), h, n), torch.relu(h * n) / n)
    act = JumpReLU(6, init_threshold=0.3, bandwidth=0.1, dtype=F64)
    got = apply_with_decoder_norm_gating(act, h, n)
    manual = torch.where(h * n > 0.3, h * n, 0.0) / n
    torch.testing.assert_close(got, manual)
    # Per-element check: output is either h (unscaled) or 0.
    assert torch.all((got == 0) | torch.isclose(got, h))


def test_gating_topk_selects_on_scaled_preacts():
    h = torch.tensor([[3.0, 2.0, 1.0]], dtype=F64)
    n = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    out = apply_with_decoder_norm_gating(TopK(1), h, n)
    # h·n = [0.3, 2, 10] -> feature 2 wins (not feature 0, the largest raw h); value unscaled.
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 1.0]], dtype=F64))
    torch.manual_seed(0)
    h = torch.randn(4, 8, dtype=F64)
    n = torch.rand(8, dtype=F64) + 0.1
    torch.testing.assert_close(
        apply_with_decoder_norm_gating(TopK(3), h, n), _topk_reference(h * n, 3) / n
    )


def test_gating_batchtopk_mask_and_zero_norm():
    torch.manual_seed(0)
    h = torch.randn(3, 4, 6, dtype=F64)
    n = torch.rand(6, dtype=F64) + 0.1
    n[2] = 0.0
    mask = torch.rand(3, 4) > 0.3
    out = apply_with_decoder_norm_gating(BatchTopK(2), h, n, mask=mask)
    assert torch.isfinite(out).all()
    assert (out[..., 2] == 0).all()
    assert (out[~mask] == 0).all()


# ------------------------------------------------------------------------------ factory


def test_build_activation():
    assert isinstance(build_activation("relu"), ReLU)
    assert build_activation("topk", k=4).k == 4
    assert isinstance(build_activation("BatchTopK", k=2), BatchTopK)
    act = build_activation("jumprelu", shape=(5,), init_threshold=0.1, bandwidth=0.05)
    assert isinstance(act, JumpReLU) and act.log_threshold.shape == (5,)
    with pytest.raises(ValueError, match="relu, jumprelu, topk, batchtopk"):
        build_activation("gelu")
    with pytest.raises(ValueError, match="init_threshold"):
        build_activation("jumprelu", shape=(5,), bandwidth=0.05)
    with pytest.raises(ValueError, match="requires k"):
        build_activation("topk")


# --------------------------------------------------------------------------------- AuxK


def test_auxk_select_only_dead_at_most_k():
    torch.manual_seed(0)
    h = torch.randn(6, 3, 10, dtype=F64, requires_grad=True)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[1, 4, 5, 8]] = True
    out = auxk_select(h, dead, k_aux=3)
    assert (out[..., ~dead] == 0).all()
    assert ((out != 0).sum(-1) <= 3).all()
    # Loop reference: per row, top-3 of relu(h) restricted to dead features.
    ref = torch.zeros_like(h)
    for idx in _indices(h.shape[:-1]):
        vals = [(float(torch.relu(h.detach()[idx][i])), i) for i in range(10) if dead[i]]
        vals.sort(key=lambda e: -e[0])
        for v, i in vals[:3]:
            ref[idx + (i,)] = v
    torch.testing.assert_close(out.detach(), ref.detach())
    g = torch.randn_like(h)
    (grad,) = torch.autograd.grad((out * g).sum(), h)
    torch.testing.assert_close(grad, torch.where(out != 0, g, 0.0))


def test_auxk_select_few_dead_and_none_dead():
    h = torch.randn(4, 6)
    dead = torch.zeros(6, dtype=torch.bool)
    assert (auxk_select(h, dead, 3) == 0).all()
    dead[2] = True
    out = auxk_select(h, dead, 3)
    assert ((out != 0).sum(-1) <= 1).all()
    torch.testing.assert_close(out[:, 2], torch.relu(h[:, 2]))
    # Per-layer dead masks.
    h2 = torch.randn(5, 2, 6)
    dead2 = torch.zeros(2, 6, dtype=torch.bool)
    dead2[0, 1] = True
    out2 = auxk_select(h2, dead2, 2)
    assert (out2[:, 1] == 0).all()
    assert (out2[:, 0, [0, 2, 3, 4, 5]] == 0).all()
