"""The fast TopK SAE path (lmsae.nn.fused) equals the plain autograd path."""

from __future__ import annotations

import pytest
import torch

from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder
from lmsae.nn import _kernels
from lmsae.nn.activations import TopK, auxk_select
from lmsae.nn.fused import auxk_sae_forward, sparse_batch_statistics, topk_sae_forward, topk_select
from lmsae.training.metrics import batch_statistics

PARAMS = ("W_E", "b_E", "W_D", "b_D")


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def kernel_path(request):
    """Every test runs with the compiled CPU kernels (numba) and with the pure-PyTorch path."""
    if request.param == "compiled":
        if not _kernels.available():
            pytest.fail(f"the numba kernels should be available in the test environment: "
                        f"{_kernels.unavailable_reason()}")
        yield request.param
    else:
        with _kernels.disabled():
            yield request.param


def _model(d=12, f=48, k=5, dtype=torch.float64, seed=0, **kw) -> SparseAutoEncoder:
    cfg = SAEConfig(hook_point_in="blocks.0.hook_resid_post", d_model=d, d_sae=f, act_fn=kw.pop("act_fn", "topk"),
                    top_k=k, **kw)
    model = SparseAutoEncoder(cfg).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.5)
    return model


def _grads(model: SparseAutoEncoder, loss: torch.Tensor, extra=()) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if n in PARAMS]
    tensors = [p for _, p in named] + list(extra)
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    out = {n: g for (n, _), g in zip(named, grads[:len(named)], strict=True)}
    for i, g in enumerate(grads[len(named):]):
        out[f"extra{i}"] = g
    return out


def _dense(indices: torch.Tensor, values: torch.Tensor, f: int) -> torch.Tensor:
    return torch.zeros(*indices.shape[:-1], f, dtype=values.dtype).scatter(-1, indices, values)


def _compare(model, x, *, atol, rtol, value_weight=0.0, x_grad=False):
    """Plain path vs fused path: recon, activations and every gradient of one loss."""
    g = torch.Generator().manual_seed(1)
    f = model.config.n_features
    target = torch.randn(*x.shape[:-1], model.config.output_width, generator=g, dtype=x.dtype)
    vw = torch.rand(f, generator=g, dtype=x.dtype) * value_weight

    xp = x.clone().requires_grad_(x_grad)
    acts = model.activate(model.encode_pre(xp))
    recon = model.decode(acts)
    loss = (recon - target).square().sum() + (acts * vw).sum()
    ref = _grads(model, loss, [xp] if x_grad else [])

    xf = x.clone().requires_grad_(x_grad)
    buffers: dict = {}
    out = model.fused_topk_forward(xf, buffers)
    assert out is not None
    recon_f, idx, vals = out
    assert idx.dtype == torch.int64 and idx.shape == vals.shape == (*x.shape[:-1], min(model.activation.k, f))
    dense = _dense(idx, vals, f)
    loss_f = (recon_f - target).square().sum() + (vals * vw[idx]).sum()
    got = _grads(model, loss_f, [xf] if x_grad else [])

    torch.testing.assert_close(recon_f, recon, atol=atol, rtol=rtol)
    torch.testing.assert_close(dense, acts.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(loss_f, loss, atol=atol, rtol=rtol)
    assert set(got) == set(ref)
    for name in ref:
        if ref[name] is None:
            assert got[name] is None, name
            continue
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], ref[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    assert buffers["pre"].shape == (x.reshape(-1, x.shape[-1]).shape[0], f)


@pytest.mark.parametrize("opts", [
    {},
    {"apply_decoder_bias_to_input": True},
    {"use_decoder_bias": False},
    {"hook_point_out": "blocks.0.hook_mlp_out", "d_out": 7},
    {"hook_point_out": "blocks.0.hook_mlp_out", "apply_decoder_bias_to_input": True},
])
def test_equal_to_plain_path_float64(opts):
    model = _model(**opts)
    x = torch.randn(37, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _compare(model, x, atol=1e-12, rtol=1e-12, value_weight=0.3)


def test_two_stage_selection_and_token_dims_float64():
    # d_sae large enough for the two-stage selection; (batch, context) leading dims
    model = _model(d=8, f=2048, k=4, apply_decoder_bias_to_input=True)
    x = torch.randn(3, 11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _compare(model, x, atol=1e-12, rtol=1e-12, value_weight=0.2, x_grad=True)


def test_input_gradient_float64():
    model = _model(apply_decoder_bias_to_input=True)
    x = torch.randn(20, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _compare(model, x, atol=1e-12, rtol=1e-12, x_grad=True)


def test_equal_to_plain_path_float32():
    model = _model(d=32, f=1024, k=8, dtype=torch.float32, apply_decoder_bias_to_input=True)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    _compare(model, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [48, 60])
def test_k_at_least_d_sae(k):
    model = _model(k=k)
    x = torch.randn(9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    _compare(model, x, atol=1e-12, rtol=1e-12)


def test_ties_and_rows_with_fewer_than_k_positive():
    model = _model(k=6)
    with torch.no_grad():
        model.b_E.copy_(-3.0 - torch.rand(48, dtype=torch.float64))  # most pre-activations negative
    x = torch.randn(25, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x[::3] = 0.0  # whole rows tied at b_E (all negative): activations are all zero
    with torch.no_grad():
        pre = model.encode_pre(x)
    assert ((pre > 0).sum(-1) < 6).any()
    _compare(model, x, atol=1e-12, rtol=1e-12, value_weight=0.5)
    # exact zeros: the value-0 entries get no gradient, like ReLU's zeros
    with torch.no_grad():
        model.b_E.zero_()
    x = torch.zeros(4, 12, dtype=torch.float64)
    _compare(model, x, atol=1e-12, rtol=1e-12, value_weight=0.5)


def test_scheduled_k_and_buffer_reuse():
    model = _model(d=8, f=2048, k=16, dtype=torch.float32)
    buffers: dict = {}
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(8))
    model.fused_topk_forward(x, buffers)
    pre = buffers["pre"]
    ptr = pre.data_ptr()
    model.activation.k = 3
    recon, idx, _ = model.fused_topk_forward(x + 1, buffers)
    assert idx.shape == (32, 3) and buffers["pre"].data_ptr() == ptr
    torch.testing.assert_close(buffers["pre"], model.encode_pre(x + 1).detach())
    torch.testing.assert_close(recon, model.decode(model.activate(model.encode_pre(x + 1))).detach())


@pytest.mark.parametrize("opts", [
    {"act_fn": "relu"}, {"act_fn": "jumprelu"}, {"act_fn": "batchtopk"},
    {"decoder_norm_gating": True}, {"use_glu_encoder": True},
])
def test_not_applicable_returns_none(opts):
    model = _model(**opts)
    assert model.fused_topk_forward(torch.randn(3, 12, dtype=torch.float64), {}) is None


def test_not_applicable_for_other_dtype():
    model = _model()
    assert model.fused_topk_forward(torch.randn(3, 12, dtype=torch.float32), {}) is None


@pytest.mark.parametrize("method", ["auto", "compiled", "topk", "two_stage", "two_stage_numpy"])
@pytest.mark.parametrize("f", [64, 4096])
def test_topk_select_matches_topk_activation(f, method):
    g = torch.Generator().manual_seed(9)
    pre = torch.randn(600, f, generator=g) - 1.5  # >= 512 rows: numpy selection on several threads
    pre[:5] = 0.0  # rows of ties
    values, indices = topk_select(pre, 32, method=method)
    assert values.shape == indices.shape == (600, 32)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # distinct features per token
    torch.testing.assert_close(_dense(indices, values, f), TopK(32)(pre), atol=0, rtol=0)


def test_topk_select_float64_two_stage():
    pre = torch.randn(40, 2048, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    for method in ("two_stage", "two_stage_numpy", "compiled"):
        values, indices = topk_select(pre, 8, method=method)
        torch.testing.assert_close(_dense(indices, values, 2048), TopK(8)(pre), atol=0, rtol=0)


def test_auxk_equals_plain_path():
    model = _model(d=10, f=40, k=4, apply_decoder_bias_to_input=True)
    x = torch.randn(30, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    residual = torch.randn(30, 10, dtype=torch.float64)

    pre = model.encode_pre(x)
    aux = model.decode_linear(auxk_select(pre, dead, 6))
    ref = _grads(model, (aux - residual).square().sum())

    buffers: dict = {}
    model.fused_topk_forward(x, buffers)
    out = auxk_sae_forward(x, model.W_E, model.b_E, model.W_D, buffers["pre"], dead, 6, input_bias=model.b_D)
    assert out is not None
    aux_f, _, _ = out
    torch.testing.assert_close(aux_f, aux.detach(), atol=1e-12, rtol=1e-12)
    got = _grads(model, (aux_f - residual).square().sum())
    for name in PARAMS:
        if ref[name] is None:
            assert got[name] is None or not got[name].any()
        else:
            torch.testing.assert_close(got[name], ref[name], atol=1e-12, rtol=1e-12)
    assert auxk_sae_forward(x, model.W_E, model.b_E, model.W_D, buffers["pre"], torch.zeros(40, dtype=torch.bool),
                            6) is None


@pytest.mark.parametrize("masked", [False, True])
def test_sparse_batch_statistics_equal_dense(masked, kernel_path):
    g = torch.Generator().manual_seed(11)
    f, k = 64, 5
    pre = torch.randn(4, 9, f, generator=g) - 1.0
    values, indices = topk_select(pre.reshape(-1, f), k)
    values, indices = values.reshape(4, 9, k), indices.reshape(4, 9, k)
    dense = _dense(indices, values, f)
    recon = torch.randn(4, 9, 6, generator=g)
    label = torch.randn(4, 9, 6, generator=g)
    label[0, :2] = 0.0  # tokens whose label is exactly 0 have no L2 ratio (it used to explode)
    mask = (torch.rand(4, 9, generator=g) > 0.3) if masked else None
    # reference: the dense statistics of the same float32 data computed in float64; the compiled
    # path accumulates in float64 (close to it), the torch path reduces tokens in float32 first
    ref = batch_statistics(dense.double(), ("batch", "context", "sae"), recon.double(), label.double(),
                           ("batch", "context", "d_model"), mask)
    got = sparse_batch_statistics(indices, values, recon, label, mask, f)
    tol = 1e-12 if kernel_path == "compiled" else 1e-6
    kept = (mask if mask is not None else torch.ones(4, 9, dtype=torch.bool)).clone()
    assert float(got["l2_ratio_tokens"]) == float(kept.sum() - kept[0, :2].sum())
    assert float(got["l2_ratio"]) < 10 * float(got["l2_ratio_tokens"])  # no 1e30-sized terms
    assert set(got) == set(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape, key
        torch.testing.assert_close(got[key], ref[key], atol=tol, rtol=tol, msg=lambda m, n=key: f"{n}: {m}")


def test_functional_api_without_buffers():
    g = torch.Generator().manual_seed(12)
    W_E = torch.randn(6, 30, generator=g, dtype=torch.float64, requires_grad=True)
    b_E = torch.randn(30, generator=g, dtype=torch.float64, requires_grad=True)
    W_D = torch.randn(30, 6, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    recon, idx, vals = topk_sae_forward(x, W_E, b_E, W_D, None, 3)
    acts = TopK(3)(x @ W_E + b_E)
    torch.testing.assert_close(recon, acts @ W_D)
    assert not idx.requires_grad and vals.requires_grad


def _check_select(pre: torch.Tensor, k: int, method: str = "compiled") -> None:
    values, indices = topk_select(pre, k, method=method)
    kk = min(k, pre.shape[1])
    assert values.shape == indices.shape == (pre.shape[0], kk)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # distinct features per token
    ref_values = torch.topk(pre, kk, dim=1).values.relu()
    # the same multiset of values as torch.topk (ties may pick other columns of equal value)
    torch.testing.assert_close(values.sort(-1).values, ref_values.sort(-1).values, atol=0, rtol=0, equal_nan=True)
    # and the values sit at the columns reported
    torch.testing.assert_close(values, torch.gather(pre, 1, indices).relu(), atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("f,k", [(4096, 32), (999, 7), (1000, 7), (64, 64), (50, 1), (2048, 300), (512, 1)])
def test_compiled_selection_edge_cases(f, k):
    g = torch.Generator().manual_seed(14)
    pre = torch.randn(70, f, generator=g)
    pre[0] = 1.0  # one value everywhere: every entry is a candidate
    pre[1] = -2.0
    pre[2, : f // 2] = 3.0  # many ties at the top
    pre[3] = float("-inf")
    pre[3, ::7] = 0.5
    pre[4, 5] = float("inf")
    pre[5] = torch.randn(f, generator=g).exp() * 1e30  # heavy tail, huge values
    pre[6] = torch.randn(f, generator=g) * 1e-30
    pre[7] = torch.arange(f, dtype=torch.float32)  # sorted: the top is at the end
    pre[8] = -torch.arange(f, dtype=torch.float32)
    _check_select(pre, k)
    _check_select(pre.double(), k)


def test_compiled_selection_rows_with_nan_match_torch_topk():
    g = torch.Generator().manual_seed(15)
    pre = torch.randn(40, 4096, generator=g)
    pre[3, 17] = float("nan")
    pre[9] = float("nan")
    values, indices = topk_select(pre, 16, method="compiled")
    ref_v, ref_i = torch.topk(pre, 16, dim=1, sorted=False)
    # NaN rows: NaN counts as the largest, as in torch.topk (the plain TopK)
    assert set(indices[3].tolist()) == set(ref_i[3].tolist()) and 17 in indices[3].tolist()
    assert torch.isnan(values[3]).sum() == 1 and torch.isnan(values[9]).all()
    others = [r for r in range(40) if r not in (3, 9)]
    torch.testing.assert_close(values[others].sort(-1).values, ref_v[others].relu().sort(-1).values)


def test_kernels_switch_off():
    pre = torch.randn(8, 256)
    with _kernels.disabled():
        assert not _kernels.available()
        assert "switched off" in _kernels.unavailable_reason()
        values, indices = topk_select(pre, 4)  # "auto" falls back to a torch/numpy selection
    assert _kernels.available() == (_kernels.unavailable_reason() is None)
    torch.testing.assert_close(_dense(indices, values, 256), TopK(4)(pre), atol=0, rtol=0)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "weights", "all_masked"])
def test_squared_error_loss_equals_reconstruction_loss(mask_kind):
    from lmsae.nn.fused import squared_error_loss
    from lmsae.nn.losses import reconstruction_loss

    g = torch.Generator().manual_seed(16)
    recon = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    label = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    mask = {"none": None, "bool": torch.rand(3, 7, generator=g) > 0.4,
            "weights": torch.rand(3, 7, generator=g, dtype=torch.float64) * (torch.rand(3, 7, generator=g) > 0.3),
            "all_masked": torch.zeros(3, 7, dtype=torch.bool)}[mask_kind]
    axes = ("batch", "context", "d_model")
    r1 = recon.clone().requires_grad_(True)
    r2 = recon.clone().requires_grad_(True)
    ref = reconstruction_loss(r1, label, axes, mask)
    got = squared_error_loss(r2, label, mask)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    ref.backward()
    got.backward()
    torch.testing.assert_close(r2.grad, r1.grad, atol=1e-12, rtol=1e-12)
    if mask is not None:
        # garbage (NaN) at masked-out tokens stays out of the loss and of the gradient
        dirty = label.clone()
        dirty[~(mask != 0)] = float("nan")
        r3 = recon.clone().requires_grad_(True)
        loss = squared_error_loss(r3, dirty, mask)
        torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
        loss.backward()
        torch.testing.assert_close(r3.grad, r1.grad, atol=1e-12, rtol=1e-12)


def test_squared_error_loss_shape_errors():
    from lmsae.errors import ShapeError
    from lmsae.nn.fused import squared_error_loss

    with pytest.raises(ShapeError, match="label has shape"):
        squared_error_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ShapeError, match="mask has shape"):
        squared_error_loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(5, dtype=torch.bool))


@pytest.mark.parametrize("method", ["auto", "compiled", "topk", "two_stage_numpy"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_topk_select_adds_the_bias_in_place(method, contiguous):
    g = torch.Generator().manual_seed(17)
    raw = torch.randn(300, 2048, generator=g)
    bias = torch.randn(2048, generator=g)
    pre = raw.clone() if contiguous else raw.t().contiguous().t()
    values, indices = topk_select(pre, 16, method=method, add_bias=bias)
    torch.testing.assert_close(pre, raw + bias, atol=0, rtol=0)  # pre now holds the pre-activations
    torch.testing.assert_close(_dense(indices, values, 2048), TopK(16)(raw + bias), atol=0, rtol=0)
