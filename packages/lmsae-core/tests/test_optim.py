"""SparseAdam against a naive per-element loop and torch.optim.Adam; SignSGDScheduleFree against
a naive per-element loop, its eval/train swap and exact resume; gradient clipping."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from lmsae.nn import _kernels

from lmsae.training.optim import (
    OPTIMIZERS,
    SignSGDScheduleFree,
    SparseAdam,
    build_optimizer,
    clip_grad_norm_,
    global_grad_norm,
)


class NaiveSparseAdam:
    """Reference: per-element Python loop in float64 over plain lists."""

    def __init__(self, values, lr, betas, eps, weight_decay):
        self.x = [float(v) for v in values]
        self.m = [0.0] * len(self.x)
        self.v = [0.0] * len(self.x)
        self.n = [0] * len(self.x)
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay

    def step(self, grads):
        for i, g in enumerate(grads):
            g = float(g)
            if g == 0.0:
                continue
            g = g + self.wd * self.x[i]
            self.n[i] += 1
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat = self.m[i] / (1 - self.b1 ** self.n[i])
            v_hat = self.v[i] / (1 - self.b2 ** self.n[i])
            self.x[i] -= self.lr * m_hat / (math.sqrt(v_hat) + self.eps)


def _sparse_grad(shape, density, generator):
    g = torch.randn(shape, generator=generator, dtype=torch.float64)
    keep = torch.rand(shape, generator=generator) < density
    return g * keep


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sparse_adam_matches_naive_per_element_loop(weight_decay):
    gen = torch.Generator().manual_seed(0)
    shape = (6, 5)
    param = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
    opt = SparseAdam([param], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    ref = NaiveSparseAdam(param.detach().flatten().tolist(), 0.01, (0.8, 0.95), 1e-6, weight_decay)
    untouched_row = 2  # this row never receives a gradient
    for _ in range(25):
        g = _sparse_grad(shape, 0.3, gen)
        g[untouched_row] = 0
        param.grad = g.clone()
        opt.step()
        ref.step(g.flatten().tolist())
    assert torch.allclose(param.detach().flatten(), torch.tensor(ref.x, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    state = opt.state[param]
    assert state["step"].flatten().tolist() == ref.n
    assert torch.allclose(state["exp_avg"].flatten(), torch.tensor(ref.m, dtype=torch.float64), atol=1e-14)
    # The row without gradient kept its value, moments and count exactly.
    assert torch.all(state["step"][untouched_row] == 0)
    assert torch.all(state["exp_avg"][untouched_row] == 0)
    assert 0 < state["step"].max() < 25


def test_zero_gradient_elements_are_frozen_even_with_momentum_and_weight_decay():
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opt = SparseAdam([param], lr=0.1, weight_decay=0.5)
    param.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    after_first = param.detach().clone()
    m_first = opt.state[param]["exp_avg"].clone()
    param.grad = torch.tensor([0.0, 1.0, 0.0])
    opt.step()
    assert param[0] == after_first[0] and param[2] == after_first[2]
    assert param[1] != after_first[1]
    assert opt.state[param]["exp_avg"][0] == m_first[0]
    assert opt.state[param]["step"].tolist() == [1, 2, 1]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sparse_adam_equals_adam_with_dense_gradients(weight_decay):
    gen = torch.Generator().manual_seed(1)
    shapes = [(8, 4), (4,)]
    a_params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    s_params = [torch.nn.Parameter(p.detach().clone()) for p in a_params]
    adam = torch.optim.Adam(a_params, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    sparse = SparseAdam(s_params, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    for _ in range(40):
        for pa, ps in zip(a_params, s_params, strict=True):
            g = torch.randn(pa.shape, generator=gen)
            g[g == 0] = 1.0  # every element nonzero
            pa.grad, ps.grad = g.clone(), g.clone()
        adam.step()
        sparse.step()
    for pa, ps in zip(a_params, s_params, strict=True):
        torch.testing.assert_close(ps, pa, rtol=1e-6, atol=1e-7)
        assert torch.all(sparse.state[ps]["step"] == 40)


def test_sparse_adam_skips_params_without_grad_and_follows_group_lr():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = SparseAdam([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert b not in opt.state or not opt.state[b]
    assert torch.allclose(a.detach(), torch.full((3,), 0.9))
    b.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3))  # lr 0 in its group


def test_sparse_adam_all_zero_grad_is_a_no_op():
    p = torch.nn.Parameter(torch.randn(4))
    before = p.detach().clone()
    opt = SparseAdam([p], lr=0.1)
    p.grad = torch.zeros(4)
    opt.step()
    assert torch.equal(p.detach(), before)


def test_sparse_adam_closure_and_bad_hyperparameters():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = SparseAdam([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(1.0)
    for kwargs in ({"lr": -1.0}, {"betas": (1.0, 0.9)}, {"eps": -1.0}, {"weight_decay": -0.1}):
        with pytest.raises(ValueError):
            SparseAdam([torch.nn.Parameter(torch.zeros(1))], **({"lr": 0.1} | kwargs))


# --------------------------------------------------------------------------------------------
# Gradient norm and clipping


def _params_with_grads(gen, dtype=torch.float32):
    params = []
    for shape in [(5, 3), (7,), (2, 2, 2)]:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = torch.randn(shape, generator=gen).to(dtype)
        params.append(p)
    params.append(torch.nn.Parameter(torch.zeros(3)))  # grad None: skipped
    return params


def test_global_grad_norm_is_the_l2_norm_of_all_grads():
    gen = torch.Generator().manual_seed(0)
    params = _params_with_grads(gen)
    expected = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None))
    norm = global_grad_norm(params)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    assert norm.item() == pytest.approx(expected, rel=1e-6)


def test_global_grad_norm_accumulates_low_precision_grads_in_fp32():
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    p.grad = torch.full((4096,), 300.0, dtype=torch.bfloat16)  # squares overflow nothing in fp32
    assert global_grad_norm([p]).item() == pytest.approx(300.0 * 64, rel=1e-6)


def test_global_grad_norm_without_grads():
    assert global_grad_norm([torch.nn.Parameter(torch.zeros(2))]).item() == 0.0
    assert global_grad_norm([]).item() == 0.0


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    gen = torch.Generator().manual_seed(3)
    ours = _params_with_grads(gen)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs, strict=True):
        if a.grad is not None:
            b.grad = a.grad.clone()
    norm = clip_grad_norm_(ours, max_norm)
    ref = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(norm, ref, rtol=1e-6, atol=0)
    for a, b in zip(ours, theirs, strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    clipped = global_grad_norm(ours).item()
    assert clipped <= max_norm * (1 + 1e-5)


def test_clip_grad_norm_below_threshold_or_disabled_leaves_grads_bit_identical():
    gen = torch.Generator().manual_seed(4)
    params = _params_with_grads(gen)
    before = [p.grad.clone() for p in params if p.grad is not None]
    norm = clip_grad_norm_(params, 1e6)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, [p for p in params if p.grad is not None], strict=True))
    assert clip_grad_norm_(params, 0.0).item() == pytest.approx(norm.item())
    assert clip_grad_norm_(params, -1.0).item() == pytest.approx(norm.item())
    assert all(torch.equal(a, p.grad) for a, p in zip(before, [p for p in params if p.grad is not None], strict=True))


def test_clip_grad_norm_reduce_fn_sees_squared_norm():
    """Two 'ranks' each hold half of the gradients; the reduction sums their squared norms."""
    gen = torch.Generator().manual_seed(5)
    full = _params_with_grads(gen)[:3]
    rank0, rank1 = full[:2], full[2:]
    sq0 = global_grad_norm(rank0).item() ** 2
    sq1 = global_grad_norm(rank1).square()
    seen = []

    def all_reduce_sum(sq):
        seen.append(sq.clone())
        return sq + sq1

    expected = global_grad_norm(full)
    norm = clip_grad_norm_(rank0, 0.1, reduce_fn=all_reduce_sum)
    assert seen[0].item() == pytest.approx(sq0, rel=1e-6)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    # Scaled with the global factor, not the local one.
    assert global_grad_norm(rank0).item() == pytest.approx(
        math.sqrt(seen[0].item()) * 0.1 / (expected.item() + 1e-6), rel=1e-5
    )

    def in_place(sq):  # like torch.distributed.all_reduce: mutates, returns None
        sq.mul_(4.0)

    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([3.0])
    assert clip_grad_norm_([p], 0.0, reduce_fn=in_place).item() == pytest.approx(6.0)


def test_build_optimizer():
    p = [torch.nn.Parameter(torch.zeros(2))]
    adam = build_optimizer("adam", p, lr=1e-3, betas=(0.9, 0.99))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.9, 0.99)
    sparse = build_optimizer("sparse_adam", [{"params": p, "lr": 5e-4}], lr=1e-3, betas=(0.9, 0.99))
    assert isinstance(sparse, SparseAdam) and sparse.param_groups[0]["lr"] == 5e-4
    with pytest.raises(ValueError) as info:
        build_optimizer("sgd", p, lr=1e-3, betas=(0.9, 0.99))
    assert all(name in str(info.value) for name in OPTIMIZERS)


def test_build_signsgd_schedulefree():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer("signsgd_schedulefree", [{"params": p, "lr": 5e-4}], lr=1e-3, betas=(0.95, 0.999),
                          weight_decay=0.01)
    assert isinstance(opt, SignSGDScheduleFree)
    group = opt.param_groups[0]
    assert group["lr"] == 5e-4 and group["beta"] == 0.95 and group["weight_decay"] == 0.01
    assert "signsgd_schedulefree" in OPTIMIZERS


# --------------------------------------------------------------------------------------------
# Sign-SGD with schedule-free averaging


class NaiveSignSGDScheduleFree:
    """Reference: the recurrences of the docstring, per element, in float64 Python floats."""

    def __init__(self, values, beta, weight_decay, weight_lr_power):
        self.z = [float(v) for v in values]
        self.x = list(self.z)
        self.y = list(self.z)
        self.beta, self.wd, self.power = beta, weight_decay, weight_lr_power
        self.weight_sum = 0.0
        self.lr_max = 0.0

    def step(self, grads, lr):
        self.lr_max = max(self.lr_max, lr)
        weight = self.lr_max ** self.power
        self.weight_sum += weight
        c = weight / self.weight_sum if self.weight_sum > 0 else 0.0
        for i, g in enumerate(grads):
            g = float(g)
            sign = (g > 0) - (g < 0)
            self.z[i] = self.z[i] - lr * self.wd * self.y[i] - lr * sign
            self.x[i] = (1 - c) * self.x[i] + c * self.z[i]
            self.y[i] = (1 - self.beta) * self.z[i] + self.beta * self.x[i]


def _lrs(n):
    # a warmup from 0, a plateau and a decay: exercises the lr_max weighting
    return [0.0, 0.01, 0.02, 0.03] + [0.03] * (n - 8) + [0.02, 0.01, 0.005, 0.001]


@pytest.mark.parametrize(("beta", "weight_decay", "power"), [(0.9, 0.0, 2.0), (0.5, 0.1, 2.0), (0.0, 0.0, 0.0)])
def test_signsgd_schedulefree_matches_naive_per_element_loop(beta, weight_decay, power, sf_path):
    gen = torch.Generator().manual_seed(0)
    shape = (6, 5)
    param = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
    opt = SignSGDScheduleFree([param], lr=0.0, beta=beta, weight_decay=weight_decay, weight_lr_power=power)
    ref = NaiveSignSGDScheduleFree(param.detach().flatten().tolist(), beta, weight_decay, power)
    for lr in _lrs(20):
        g = _sparse_grad(shape, 0.4, gen)  # exact zeros: sign 0, z stays, x and y still move
        opt.param_groups[0]["lr"] = lr
        param.grad = g.clone()
        opt.step()
        ref.step(g.flatten().tolist(), lr)
        assert torch.allclose(param.detach().flatten(), torch.tensor(ref.y, dtype=torch.float64), rtol=0, atol=1e-12)
    state = opt.state[param]
    assert torch.allclose(state["z"].flatten(), torch.tensor(ref.z, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(state["x"].flatten(), torch.tensor(ref.x, dtype=torch.float64), rtol=0, atol=1e-12)
    assert opt.param_groups[0]["step"] == 20
    assert opt.param_groups[0]["weight_sum"] == pytest.approx(ref.weight_sum, rel=1e-15)
    opt.eval()
    assert torch.allclose(param.detach().flatten(), torch.tensor(ref.x, dtype=torch.float64), rtol=0, atol=1e-12)


def test_signsgd_schedulefree_uniform_average_with_constant_lr(sf_path):
    """Constant lr: c_{t+1} = 1/t, so x is the plain mean of the iterates z_2..z_{T+1}."""
    p = torch.nn.Parameter(torch.tensor([0.0, 1.0], dtype=torch.float64))
    opt = SignSGDScheduleFree([p], lr=0.1, beta=0.9)
    zs = []
    for _ in range(7):
        p.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
        opt.step()
        zs.append(opt.state[p]["z"].clone())
    torch.testing.assert_close(opt.state[p]["x"], torch.stack(zs).mean(0), rtol=0, atol=1e-14)
    torch.testing.assert_close(opt.state[p]["z"], torch.tensor([-0.7, 1.7], dtype=torch.float64), rtol=0, atol=1e-14)


def test_signsgd_schedulefree_eval_train_swap_is_exact(sf_path):
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    untouched = torch.nn.Parameter(torch.randn(2, generator=gen))  # never gets a gradient
    untouched_before = untouched.detach().clone()
    opt = SignSGDScheduleFree([p, untouched], lr=0.05, beta=0.9)
    for _ in range(5):
        p.grad = torch.randn(4, 3, generator=gen)
        opt.step()
    y = p.detach().clone()
    assert opt.train_mode
    opt.eval()
    assert not opt.train_mode
    assert torch.equal(p.detach(), opt.state[p]["x"])
    assert not torch.equal(p.detach(), y)
    opt.eval()  # idempotent
    assert torch.equal(p.detach(), opt.state[p]["x"])
    p.grad = torch.ones(4, 3)
    with pytest.raises(RuntimeError, match="train"):
        opt.step()
    opt.train()
    assert torch.equal(p.detach(), y)  # bit for bit
    opt.train()  # idempotent
    assert torch.equal(p.detach(), y)
    assert torch.equal(untouched.detach(), untouched_before)


def _sf_run(param, opt, grads, lrs):
    for g, lr in zip(grads, lrs, strict=True):
        opt.param_groups[0]["lr"] = lr
        param.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("save_in_eval_mode", [True, False])
def test_signsgd_schedulefree_exact_resume_through_flat_state(save_in_eval_mode, sf_path):
    from lmsae.training.state_io import optimizer_state_from_flat, optimizer_state_to_flat

    gen = torch.Generator().manual_seed(2)
    init = torch.randn(5, 4, generator=gen)
    grads = [_sparse_grad((5, 4), 0.5, gen).float() for _ in range(20)]
    lrs = _lrs(20)

    # uninterrupted run, with an eval/train round trip at step 10 as a trainer would do
    p = torch.nn.Parameter(init.clone())
    opt = SignSGDScheduleFree([p], lr=0.0, beta=0.9, weight_decay=0.01)
    _sf_run(p, opt, grads[:10], lrs[:10])
    if save_in_eval_mode:
        opt.eval()
    saved_weights = p.detach().clone()
    tensors, meta = optimizer_state_to_flat(opt)
    meta = json.loads(json.dumps(meta))  # through JSON as in a checkpoint
    opt.train()
    _sf_run(p, opt, grads[10:], lrs[10:])
    opt.eval()

    # resumed run: a fresh optimiser over the saved weights
    q = torch.nn.Parameter(saved_weights.clone())
    opt2 = SignSGDScheduleFree([q], lr=0.0, beta=0.9, weight_decay=0.01)
    opt2.load_state_dict(optimizer_state_from_flat(tensors, meta))
    assert opt2.train_mode is (not save_in_eval_mode)
    assert opt2.param_groups[0]["step"] == 10
    opt2.train()
    _sf_run(q, opt2, grads[10:], lrs[10:])
    opt2.eval()
    assert torch.equal(q.detach(), p.detach())
    assert torch.equal(opt2.state[q]["z"], opt.state[p]["z"])
    assert opt2.param_groups[0]["weight_sum"] == opt.param_groups[0]["weight_sum"]


def test_signsgd_schedulefree_follows_group_lr_and_skips_params_without_grad(sf_path):
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = SignSGDScheduleFree([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=0.1, beta=0.0)
    a.grad = torch.ones(3)
    opt.step()
    assert b not in opt.state or not opt.state[b]
    torch.testing.assert_close(a.detach(), torch.full((3,), 0.9))  # beta 0: y = z
    b.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3))  # lr 0 in its group (weight 0: x stays)


def test_signsgd_schedulefree_trains_a_least_squares_problem(sf_path):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(64, 8, generator=gen)
    target = torch.randn(8, generator=gen)
    w = torch.nn.Parameter(torch.zeros(8))
    opt = SignSGDScheduleFree([w], lr=0.01, beta=0.9)
    for _ in range(400):
        opt.zero_grad()
        ((a @ w - a @ target) ** 2).mean().backward()
        opt.step()
    opt.eval()
    assert torch.linalg.vector_norm(w.detach() - target) < 0.05 * torch.linalg.vector_norm(target)


def test_signsgd_schedulefree_bad_hyperparameters_and_closure():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = SignSGDScheduleFree([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(1.0)
    for kwargs in ({"lr": -1.0}, {"beta": 1.0}, {"beta": -0.1}, {"weight_decay": -0.1}, {"weight_lr_power": -1.0}):
        with pytest.raises(ValueError):
            SignSGDScheduleFree([torch.nn.Parameter(torch.zeros(1))], **({"lr": 0.1} | kwargs))


@pytest.fixture(params=["compiled", "torch"])
def sf_path(request):
    """The schedule-free update with the one-pass compiled kernel and with the PyTorch ops."""
    if request.param == "compiled":
        assert _kernels.available(), _kernels.unavailable_reason()
        yield request.param
    else:
        with _kernels.disabled():
            yield request.param


def test_signsgd_schedulefree_compiled_step_equals_torch_ops():
    g = torch.Generator().manual_seed(3)
    init = torch.randn(50, 7, dtype=torch.float64, generator=g)
    grads = [torch.randn(50, 7, dtype=torch.float64, generator=g) for _ in range(5)]
    grads[2][0, 0] = 0.0
    out = {}
    for path in ("compiled", "torch"):
        p = torch.nn.Parameter(init.clone())
        opt = SignSGDScheduleFree([p], lr=0.01, beta=0.9, weight_decay=0.01)
        ctx = _kernels.disabled() if path == "torch" else contextlib.nullcontext()
        with ctx:
            for grad in grads:
                p.grad = grad.clone()
                opt.step()
            opt.eval()
        out[path] = (p.detach().clone(), opt.state[p]["z"].clone())
    torch.testing.assert_close(out["compiled"][0], out["torch"][0], atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(out["compiled"][1], out["torch"][1], atol=1e-14, rtol=1e-12)
