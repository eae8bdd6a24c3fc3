"""Schedules: checked against the regression values of the reference system and naive formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lmsae.training.schedules import (
    LR_SCHEDULES,
    coefficient_at_step,
    k_at_step,
    lr_multiplier,
    make_lr_scheduler,
    resolve_steps,
)

# --------------------------------------------------------------------------------------------
# resolve_steps


@pytest.mark.parametrize(
    ("value", "total", "expected"),
    [(0, 100, 0), (7, 100, 7), (250, 100, 250), (0.0, 100, 0), (0.1, 976, 97), (0.2, 976, 195),
     (1.0, 976, 976), (0.999, 10, 9)],
)
def test_resolve_steps(value, total, expected):
    assert resolve_steps(value, total, "warmup_steps") == expected


@pytest.mark.parametrize("value", [-1, -0.1, 1.5, True, False, float("nan"), "10", None])
def test_resolve_steps_rejects_bad_values_and_names_the_field(value):
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        resolve_steps(value, 100, "lr_warmup_steps")


# --------------------------------------------------------------------------------------------
# lr_multiplier


def _cwt(step, total=976, warmup=100, cooldown=195, end_ratio=1 / 32):
    return lr_multiplier(
        "constant_with_warmup",
        step,
        total_steps=total,
        warmup_steps=warmup,
        cooldown_steps=cooldown,
        end_ratio=end_ratio,
    )


def test_constant_with_warmup_regression_values_of_reference_system():
    lr = 0.02
    # Values recorded from the reference system (printed to 4 significant digits).
    assert _cwt(799) == pytest.approx(0.9106, rel=1e-4)
    assert lr * _cwt(799) == pytest.approx(0.018212, rel=1e-4)
    # 0.001321 is the reference lr rounded to 4 significant digits; the exact value is
    # 0.02 * (1/32 + 31/32 * 7/195) = 0.00132051..., so compare at the printed precision.
    assert round(lr * _cwt(969), 6) == 0.001321
    assert lr * _cwt(969) == pytest.approx(0.02 * (1 / 32 + (31 / 32) * 7 / 195), rel=1e-12)
    assert _cwt(969) == pytest.approx(0.06605, rel=5e-4)


def _naive_cwt(step, total, warmup, cooldown, r):
    warm = (step + 1) / warmup if step < warmup else 1.0
    cool = r + (1 - r) * max(total - step, 1) / cooldown if cooldown and step >= total - cooldown else 1.0
    return min(warm, 1.0, cool)


def test_constant_with_warmup_shape():
    total, warmup, cooldown, r = 976, 100, 195, 1 / 32
    values = [_cwt(s) for s in range(total)]
    for s, v in enumerate(values):
        assert v == pytest.approx(_naive_cwt(s, total, warmup, cooldown, r), abs=1e-12)
    assert values[0] == pytest.approx(1 / 100)
    assert values[99] == 1.0
    assert all(v == 1.0 for v in values[100 : total - cooldown + 1])
    tail = values[total - cooldown :]
    assert all(a > b for a, b in zip(tail, tail[1:], strict=False))  # strictly decreasing
    assert values[-1] == pytest.approx(r + (1 - r) / cooldown)
    # Past the end the factor stays at its last value rather than dropping to 0 or below.
    assert _cwt(total + 10) == pytest.approx(values[-1])


@pytest.mark.parametrize("name", LR_SCHEDULES)
@pytest.mark.parametrize("total", [1, 2, 10])
def test_zero_warmup_and_cooldown_do_not_crash(name, total):
    for step in range(total + 2):
        v = lr_multiplier(name, step, total_steps=total, warmup_steps=0, cooldown_steps=0, end_ratio=0.1)
        assert 0.0 <= v <= 1.0 and math.isfinite(v)
    # Step 0 of every schedule without warm-up is the full learning rate.
    assert lr_multiplier(name, 0, total_steps=total, warmup_steps=0, cooldown_steps=0, end_ratio=0.1) == 1.0


@pytest.mark.parametrize("name", LR_SCHEDULES)
def test_warmup_and_cooldown_longer_than_run(name):
    for step in range(6):
        v = lr_multiplier(name, step, total_steps=5, warmup_steps=50, cooldown_steps=50, end_ratio=0.5)
        assert 0.0 < v <= 1.0


def test_constant_ignores_warmup_and_cooldown():
    for step in range(20):
        assert lr_multiplier("constant", step, total_steps=20, warmup_steps=10, cooldown_steps=5, end_ratio=0.0) == 1.0


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear_decay", "cosine", "exponential"])
def test_linear_warmup(name):
    for step in range(8):
        v = lr_multiplier(name, step, total_steps=100, warmup_steps=8, cooldown_steps=0, end_ratio=0.1)
        assert v == pytest.approx((step + 1) / 8)


def test_linear_decay():
    total, warmup, r = 50, 10, 0.2
    for step in range(10, total):
        expected = 1 + (r - 1) * (step - warmup) / (total - 1 - warmup)
        got = lr_multiplier("linear_decay", step, total_steps=total, warmup_steps=warmup, end_ratio=r)
        assert got == pytest.approx(expected)
    assert lr_multiplier("linear_decay", 10, total_steps=total, warmup_steps=warmup, end_ratio=r) == 1.0
    last = lr_multiplier("linear_decay", total - 1, total_steps=total, warmup_steps=warmup, end_ratio=r)
    assert last == pytest.approx(r)
    # No room to decay: stays at 1.
    assert lr_multiplier("linear_decay", 10, total_steps=11, warmup_steps=10, end_ratio=r) == 1.0


def test_cosine():
    total, warmup, r = 42, 1, 0.1  # 40 decay steps: an exact midpoint
    for step in range(warmup, total):
        p = (step - warmup) / (total - 1 - warmup)
        expected = r + (1 - r) * (1 + math.cos(math.pi * p)) / 2
        got = lr_multiplier("cosine", step, total_steps=total, warmup_steps=warmup, end_ratio=r)
        assert got == pytest.approx(expected)
    mid = warmup + (total - 1 - warmup) // 2
    halfway = lr_multiplier("cosine", mid, total_steps=total, warmup_steps=warmup, end_ratio=r)
    assert halfway == pytest.approx((1 + r) / 2)
    assert lr_multiplier("cosine", total - 1, total_steps=total, warmup_steps=warmup, end_ratio=r) == pytest.approx(r)


def test_exponential():
    total, warmup, r = 30, 5, 0.01
    for step in range(warmup, total):
        expected = r ** ((step - warmup) / (total - warmup))
        got = lr_multiplier("exponential", step, total_steps=total, warmup_steps=warmup, end_ratio=r)
        assert got == pytest.approx(expected)
    # T == W: no division by zero.
    assert lr_multiplier("exponential", 5, total_steps=5, warmup_steps=5, end_ratio=r) == 1.0


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="cosine") as info:
        lr_multiplier("warmup_cosine", 0, total_steps=10, warmup_steps=0, cooldown_steps=0, end_ratio=0.0)
    for name in LR_SCHEDULES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"warmup_steps": -1}, {"cooldown_steps": -1}, {"end_ratio": 1.5}, {"end_ratio": -0.1}, {"total_steps": -1}],
)
def test_lr_multiplier_rejects_bad_arguments(kwargs):
    args = {"total_steps": 10, "warmup_steps": 0, "cooldown_steps": 0, "end_ratio": 0.0} | kwargs
    with pytest.raises(ValueError):
        lr_multiplier("cosine", 0, **args)


def test_make_lr_scheduler_follows_lr_multiplier():
    total, warmup, cooldown, r, lr = 976, 100, 195, 1 / 32, 0.02
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param], lr=lr)
    sched = make_lr_scheduler(
        opt, "constant_with_warmup", total_steps=total, warmup_steps=warmup, cooldown_steps=cooldown, end_ratio=r
    )
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for step in (0, 50, 99, 500, 799, 969, 975):
        assert seen[step] == pytest.approx(lr * _cwt(step), rel=1e-12)
    assert seen[799] == pytest.approx(0.018212, rel=1e-4)


def test_make_lr_scheduler_validates_eagerly():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="valid names"):
        make_lr_scheduler(opt, "nope", total_steps=10, warmup_steps=0, cooldown_steps=0, end_ratio=0.0)


# --------------------------------------------------------------------------------------------
# k_at_step


def _naive_k(step, top_k, initial_k, warmup, cold=0, kind="linear", a=3.0):
    if step < cold:
        return initial_k if initial_k is not None else top_k
    if initial_k is None or warmup == 0:
        return top_k
    p = min(1.0, (step - cold) / warmup)
    if kind == "linear":
        k = initial_k + (top_k - initial_k) * p
    else:
        k = initial_k - (initial_k - top_k) * (1 - math.exp(-a * p)) / (1 - math.exp(-a))
    return max(top_k, math.ceil(k - 1e-9))


@pytest.mark.parametrize("kind", ["linear", "exponential"])
@pytest.mark.parametrize(("top_k", "initial_k", "warmup", "cold"), [(32, 256, 100, 0), (20, 100, 37, 5), (7, 7, 10, 2)])
def test_k_schedule_matches_naive_formula(kind, top_k, initial_k, warmup, cold):
    ks = [
        k_at_step(s, top_k=top_k, initial_k=initial_k, warmup_steps=warmup, cold_boot_steps=cold, kind=kind)
        for s in range(cold + warmup + 20)
    ]
    assert ks == [_naive_k(s, top_k, initial_k, warmup, cold, kind) for s in range(len(ks))]
    assert ks[0] == initial_k
    assert ks[-1] == top_k
    assert all(a >= b for a, b in zip(ks, ks[1:], strict=False))  # never increases


def test_k_linear_is_exact_at_integer_points():
    # 100 -> 20 over 10 steps: k drops by exactly 8 per step; float rounding must not add one.
    ks = [k_at_step(s, top_k=20, initial_k=100, warmup_steps=10) for s in range(11)]
    assert ks == [100, 92, 84, 76, 68, 60, 52, 44, 36, 28, 20]


def test_k_exponential_drops_faster_than_linear():
    lin = k_at_step(10, top_k=32, initial_k=512, warmup_steps=100, kind="linear")
    exp = k_at_step(10, top_k=32, initial_k=512, warmup_steps=100, kind="exponential", exponential_factor=5.0)
    assert exp < lin


def test_k_without_schedule():
    assert [k_at_step(s, top_k=32, initial_k=None, warmup_steps=100) for s in range(3)] == [32, 32, 32]
    assert [k_at_step(s, top_k=32, initial_k=64, warmup_steps=0) for s in range(3)] == [32, 32, 32]
    # Cold boot still holds initial_k even without an annealing schedule.
    ks = [k_at_step(s, top_k=32, initial_k=64, warmup_steps=0, cold_boot_steps=2) for s in range(4)]
    assert ks == [64, 64, 32, 32]
    ks = [k_at_step(s, top_k=32, initial_k=None, warmup_steps=0, cold_boot_steps=2) for s in range(4)]
    assert ks == [32, 32, 32, 32]


def test_k_cold_boot_then_anneal():
    ks = [k_at_step(s, top_k=10, initial_k=50, warmup_steps=4, cold_boot_steps=3) for s in range(9)]
    assert ks == [50, 50, 50, 50, 40, 30, 20, 10, 10]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_k": 16},
        {"top_k": 0},
        {"warmup_steps": -1},
        {"cold_boot_steps": -1},
        {"kind": "cosine"},
        {"kind": "exponential", "exponential_factor": 0.0},
    ],
)
def test_k_rejects_bad_arguments(kwargs):
    args = {"top_k": 32, "initial_k": 64, "warmup_steps": 10} | kwargs
    with pytest.raises(ValueError):
        k_at_step(0, **args)


# --------------------------------------------------------------------------------------------
# coefficient_at_step


def test_coefficient_ramp():
    got = [coefficient_at_step(s, coefficient=2.0, warmup_steps=4) for s in range(6)]
    assert got == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert coefficient_at_step(0, coefficient=3.0, warmup_steps=0) == 3.0
    with pytest.raises(ValueError):
        coefficient_at_step(0, coefficient=1.0, warmup_steps=-1)
