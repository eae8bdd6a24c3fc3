"""Schedules for training hyper-parameters: learning rate, TopK ``k`` and loss coefficients.

Every schedule is a pure function of the optimiser step. Steps are 0-based: step ``0`` is the
first optimiser update, step ``total_steps - 1`` the last. Durations (``warmup_steps``,
``cooldown_steps``...) are counts of steps; :func:`resolve_steps` turns a config value that may
be a fraction of the run into such a count.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Literal

import torch

__all__ = [
    "LR_SCHEDULES",
    "K_SCHEDULES",
    "coefficient_at_step",
    "k_at_step",
    "lr_multiplier",
    "make_lr_scheduler",
    "resolve_steps",
]

LR_SCHEDULES: tuple[str, ...] = (
    "constant",
    "constant_with_warmup",
    "linear_decay",
    "cosine",
    "exponential",
)
"""Names accepted by :func:`lr_multiplier` and :func:`make_lr_scheduler`."""

K_SCHEDULES: tuple[str, ...] = ("linear", "exponential")
"""Values accepted for ``kind`` by :func:`k_at_step`."""


def _is_int(value: object) -> bool:
    # bool is an Integral in Python, but ``warmup: true`` in a config is a mistake, not 1 step.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def resolve_steps(value: int | float, total_steps: int, name: str) -> int:
    """Turn a duration from a config into a number of steps.

    Args:
        value: an ``int`` >= 0 is a number of steps and is returned unchanged (it may exceed
            ``total_steps``); a ``float`` in ``[0, 1]`` is a fraction of ``total_steps``,
            rounded down.
        total_steps: number of optimiser steps in the run (>= 0).
        name: the config field, used in error messages.

    Returns:
        The duration in steps (>= 0).

    Raises:
        ValueError: ``value`` is negative, a float above 1, NaN, a bool or not a number;
            or ``total_steps`` is not a non-negative int.
    """
    if not _is_int(total_steps) or total_steps < 0:
        raise ValueError(f"{name}: total_steps must be a non-negative integer, got {total_steps!r}")
    if _is_int(value):
        if value < 0:
            raise ValueError(f"{name}: a number of steps must be >= 0, got {value!r}")
        return int(value)
    if _is_real(value):
        fraction = float(value)
        # ``not (0 <= x <= 1)`` also rejects NaN.
        if not (0.0 <= fraction <= 1.0):
            raise ValueError(
                f"{name}: a fraction of the total steps must be in [0, 1], got {value!r}"
            )
        return math.floor(fraction * total_steps)
    raise ValueError(
        f"{name}: expected a number of steps (int) or a fraction of the run (float in [0, 1]), "
        f"got {value!r}"
    )


def _check_step(step: int, name: str = "step") -> None:
    if not _is_int(step) or step < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {step!r}")


def _check_count(value: int, name: str) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _warmup_ramp(step: int, warmup_steps: int) -> float:
    """Linear warm-up factor: ``(step + 1) / warmup`` for ``step < warmup``, else 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def lr_multiplier(
    name: str,
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    end_ratio: float = 0.0,
) -> float:
    """Factor applied to the base learning rate at optimiser ``step`` (0-based).

    Schedules (``W`` = ``warmup_steps``, ``C`` = ``cooldown_steps``, ``T`` = ``total_steps``,
    ``r`` = ``end_ratio``); all but ``constant`` start with the linear warm-up
    ``(step + 1) / W`` for ``step < W``:

    - ``constant``: always 1 (warm-up and cool-down are ignored).
    - ``constant_with_warmup``: ``min(warm-up, 1, cool-down)`` where the cool-down over the last
      ``C`` steps is ``r + (1 - r) * max(T - step, 1) / C`` (1 before that window).
    - ``linear_decay``: linear from 1 at ``step = W`` to ``r`` at ``step = T - 1``.
    - ``cosine``: half a cosine from 1 at ``step = W`` to ``r`` at ``step = T - 1``.
    - ``exponential``: ``r ** ((step - W) / (T - W))``.

    ``cooldown_steps`` only affects ``constant_with_warmup``. Steps past the end of the run keep
    the final value. ``W = 0`` and ``C = 0`` mean no warm-up / no cool-down.

    Raises:
        ValueError: unknown ``name`` (the message lists :data:`LR_SCHEDULES`), negative step or
            duration, or ``end_ratio`` outside ``[0, 1]``.
    """
    if name not in LR_SCHEDULES:
        raise ValueError(
            f"unknown learning-rate schedule {name!r}; valid names: {', '.join(LR_SCHEDULES)}"
        )
    _check_step(step)
    _check_count(total_steps, "total_steps")
    _check_count(warmup_steps, "warmup_steps")
    _check_count(cooldown_steps, "cooldown_steps")
    if not _is_real(end_ratio) or not (0.0 <= float(end_ratio) <= 1.0):
        raise ValueError(f"end_ratio must be in [0, 1], got {end_ratio!r}")
    r = float(end_ratio)
    T, W, C = int(total_steps), int(warmup_steps), int(cooldown_steps)

    if name == "constant":
        return 1.0
    if step < W:
        ramp = _warmup_ramp(step, W)
        if name != "constant_with_warmup" or C == 0:
            return ramp
        # A cool-down window may overlap the warm-up in very short runs; the smaller factor wins.
    else:
        ramp = 1.0

    if name == "constant_with_warmup":
        cooldown = 1.0
        if C > 0 and step >= T - C:
            # max(., 1) keeps the last step (and any step past the end) at r + (1 - r) / C
            # instead of reaching 0 or going negative.
            cooldown = r + (1.0 - r) * max(T - step, 1) / C
        return min(ramp, 1.0, cooldown)

    # Decaying schedules: ``step >= W`` from here.
    if name == "linear_decay":
        span = T - 1 - W
        if span <= 0:
            return 1.0
        progress = min(1.0, (step - W) / span)
        return 1.0 + (r - 1.0) * progress
    if name == "cosine":
        span = T - 1 - W
        if span <= 0:
            return 1.0
        progress = min(1.0, (step - W) / span)
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # exponential
    span = T - W
    if span <= 0:
        return 1.0
    progress = min(1.0, (step - W) / span)
    return r**progress


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    end_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A :class:`~torch.optim.lr_scheduler.LambdaLR` following :func:`lr_multiplier`.

    Call ``scheduler.step()`` once after each ``optimizer.step()``: right after construction the
    learning rate is ``base_lr * lr_multiplier(name, 0, ...)`` (the rate of step 0), and after
    ``n`` calls it is the rate of step ``n``.

    Raises:
        ValueError: as :func:`lr_multiplier` (checked here, before any training step).
    """
    # Validate everything once up front so a bad config fails at construction time.
    lr_multiplier(
        name,
        0,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        cooldown_steps=cooldown_steps,
        end_ratio=end_ratio,
    )
    # A partial (not a lambda) so the function is a plain module-level callable; its state is
    # not needed to resume because it is rebuilt from the config.
    fn: Callable[[int], float] = functools.partial(
        lr_multiplier,
        name,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        cooldown_steps=cooldown_steps,
        end_ratio=end_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def k_at_step(
    step: int,
    *,
    top_k: int,
    initial_k: int | None,
    warmup_steps: int,
    cold_boot_steps: int = 0,
    kind: Literal["linear", "exponential"] = "linear",
    exponential_factor: float = 3.0,
) -> int:
    """Number of active latents ``k`` of a TopK dictionary at optimiser ``step`` (0-based).

    Training may start with a larger ``initial_k`` (denser codes, fewer dead latents) and anneal
    it to the target ``top_k``:

    - cold boot: for ``step < cold_boot_steps`` k is ``initial_k`` (``top_k`` if that is None);
    - then with progress ``p = min(1, (step - cold_boot_steps) / warmup_steps)``:
      ``linear``: ``initial_k + (top_k - initial_k) * p``;
      ``exponential``: ``initial_k - (initial_k - top_k) * (1 - exp(-a p)) / (1 - exp(-a))``
      with ``a = exponential_factor`` (larger ``a`` drops faster early on);
    - the result is rounded up and never below ``top_k``.

    Without a schedule (``initial_k`` is None or ``warmup_steps`` is 0) k is ``top_k`` after
    the cold boot.

    Raises:
        ValueError: ``initial_k < top_k``, ``top_k < 1``, negative step or duration, unknown
            ``kind``, or ``exponential_factor <= 0`` (with the exponential kind).
    """
    _check_step(step)
    if not _is_int(top_k) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if initial_k is not None:
        if not _is_int(initial_k):
            raise ValueError(f"initial_k must be an integer or None, got {initial_k!r}")
        if initial_k < top_k:
            raise ValueError(f"initial_k ({initial_k}) must be >= top_k ({top_k})")
    _check_count(warmup_steps, "warmup_steps")
    _check_count(cold_boot_steps, "cold_boot_steps")
    if kind not in K_SCHEDULES:
        raise ValueError(f"unknown k schedule {kind!r}; valid kinds: {', '.join(K_SCHEDULES)}")
    if kind == "exponential" and (not _is_real(exponential_factor) or not exponential_factor > 0):
        raise ValueError(f"exponential_factor must be > 0, got {exponential_factor!r}")

    if step < cold_boot_steps:
        return int(initial_k) if initial_k is not None else int(top_k)
    if initial_k is None or warmup_steps == 0:
        return int(top_k)

    elapsed = step - cold_boot_steps
    if elapsed >= warmup_steps:
        return int(top_k)
    drop = initial_k - top_k
    if kind == "linear":
        # Exact integer arithmetic: ceil(initial - drop * e / W) = initial - floor(drop * e / W).
        # Float arithmetic could land a hair above an integer and round up by one.
        return max(int(top_k), int(initial_k - (drop * elapsed) // warmup_steps))
    a = float(exponential_factor)
    p = elapsed / warmup_steps
    k = initial_k - drop * (-math.expm1(-a * p)) / (-math.expm1(-a))
    return max(int(top_k), math.ceil(k))


def coefficient_at_step(step: int, *, coefficient: float, warmup_steps: int) -> float:
    """A loss coefficient (e.g. the sparsity penalty) ramped up linearly over ``warmup_steps``.

    Returns ``coefficient * min(1, (step + 1) / warmup_steps)``; ``warmup_steps = 0`` gives the
    full coefficient from step 0.
    """
    _check_step(step)
    _check_count(warmup_steps, "warmup_steps")
    if not _is_real(coefficient):
        raise ValueError(f"coefficient must be a number, got {coefficient!r}")
    if warmup_steps == 0:
        return float(coefficient)
    return float(coefficient) * min(1.0, (step + 1) / warmup_steps)
