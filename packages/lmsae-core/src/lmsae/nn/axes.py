"""Named tensor axes for dictionary tensors.

Every dictionary tensor travels with a tuple of axis names, one per dimension, for example

* feature activations: ``("batch", "sae")``, ``("batch", "context", "sae")``,
  ``("batch", "layers", "sae")``, ``("batch", "heads", "sae")``;
* reconstructions and labels: ``("batch", "d_model")``, ``("batch", "context", "d_model")``,
  ``("batch", "layers", "d_model")``.

The *token axes* are ``"batch"`` and ``"context"`` (whichever are present). A *token mask* has
exactly the shape of the token axes, in the order they appear in ``axes``; it is either bool or
a non-negative float weight (usually 0/1). Masked-out tokens (mask 0) never contribute to a mean,
a sum or a count, even when the tensor holds NaN or inf there (padding garbage).

The helpers here are plain functions on ``(tensor, axes)`` pairs; functions that reduce axes
return the reduced tensor together with the names of the axes that remain.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lmsae.errors import ShapeError

__all__ = [
    "TOKEN_AXES",
    "Axes",
    "axis_index",
    "check_axes",
    "check_token_mask",
    "feature_param_view",
    "flatten_tokens",
    "masked_token_mean",
    "non_token_dims",
    "sum_over",
    "token_dims",
    "token_shape",
]

#: Axis names that index tokens; a token mask covers exactly these (when present).
TOKEN_AXES: tuple[str, ...] = ("batch", "context")

Axes = Sequence[str]


def axis_index(axes: Axes, name: str) -> int:
    """Position of axis ``name`` in ``axes``; raises :class:`ShapeError` if it is absent."""
    try:
        return tuple(axes).index(name)
    except ValueError:
        raise ShapeError(f"axis {name!r} not found in axes {tuple(axes)}") from None


def token_dims(axes: Axes) -> tuple[int, ...]:
    """Positions of the token axes (``"batch"``, ``"context"``) present in ``axes``, in order."""
    return tuple(i for i, a in enumerate(axes) if a in TOKEN_AXES)


def non_token_dims(axes: Axes) -> tuple[int, ...]:
    """Positions of every axis that is not a token axis, in order."""
    return tuple(i for i, a in enumerate(axes) if a not in TOKEN_AXES)


def check_axes(tensor: Tensor, axes: Axes, name: str = "tensor") -> None:
    """Raise :class:`ShapeError` naming ``name`` if ``tensor`` does not have one dim per axis."""
    if len(set(axes)) != len(tuple(axes)):
        raise ShapeError(f"{name}: axis names must be unique, got {tuple(axes)}")
    if tensor.ndim != len(axes):
        raise ShapeError(
            f"{name} has shape {tuple(tensor.shape)} ({tensor.ndim} dims) but axes "
            f"{tuple(axes)} name {len(axes)} dims"
        )


def token_shape(tensor: Tensor, axes: Axes) -> tuple[int, ...]:
    """Sizes of the token axes of ``tensor`` (the shape a token mask must have)."""
    return tuple(tensor.shape[d] for d in token_dims(axes))


def check_token_mask(mask: Tensor | None, tensor: Tensor, axes: Axes, name: str = "tensor") -> None:
    """Raise :class:`ShapeError` if ``mask`` is not ``None`` and not shaped like the token axes."""
    if mask is None:
        return
    expected = token_shape(tensor, axes)
    if tuple(mask.shape) != expected:
        tok = tuple(a for a in axes if a in TOKEN_AXES)
        raise ShapeError(
            f"token mask for {name} has shape {tuple(mask.shape)} but the token axes {tok} of "
            f"{name} (shape {tuple(tensor.shape)}, axes {tuple(axes)}) have shape {expected}"
        )


def _mask_view(mask: Tensor, tensor: Tensor, axes: Axes, dtype: torch.dtype) -> Tensor:
    """Reshape a token mask so it broadcasts against ``tensor`` (size 1 on non-token axes)."""
    view = [tensor.shape[i] if a in TOKEN_AXES else 1 for i, a in enumerate(axes)]
    return mask.to(dtype=dtype).reshape(view)


def masked_token_mean(
    tensor: Tensor, axes: Axes, mask: Tensor | None = None
) -> tuple[Tensor, tuple[str, ...]]:
    """Mean of ``tensor`` over its token axes, weighted by an optional token ``mask``.

    With a mask the result is ``sum(t * mask) / sum(mask)`` over the token axes, the mask being
    broadcast over the non-token axes. If the mask sums to 0 the result is zeros (never NaN).
    Without a mask it is the plain mean over the token axes. A tensor without token axes is
    returned unchanged.

    Returns ``(mean, remaining_axes)``; ``mean`` has the shape of the non-token axes.
    """
    check_axes(tensor, axes)
    check_token_mask(mask, tensor, axes)
    dims = token_dims(axes)
    remaining = tuple(a for a in axes if a not in TOKEN_AXES)
    if not dims:
        return tensor, remaining
    if mask is None:
        return tensor.mean(dim=dims), remaining
    weight = _mask_view(mask, tensor, axes, tensor.dtype)
    # ``where`` rather than a bare product so NaN/inf at masked-out positions cannot leak in
    # (0 * inf = NaN), neither in the forward value nor in the gradient.
    weighted = torch.where(weight != 0, tensor * weight, torch.zeros_like(tensor))
    numerator = weighted.sum(dim=dims)
    denominator = weight.sum()
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    mean = torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))
    return mean, remaining


def sum_over(tensor: Tensor, axes: Axes, names: Iterable[str]) -> tuple[Tensor, tuple[str, ...]]:
    """Sum ``tensor`` over the axes in ``names`` that are present (absent names are ignored).

    Returns ``(summed, remaining_axes)``.
    """
    check_axes(tensor, axes)
    wanted = set(names)
    dims = tuple(i for i, a in enumerate(axes) if a in wanted)
    remaining = tuple(a for a in axes if a not in wanted)
    if not dims:
        return tensor, remaining
    return tensor.sum(dim=dims), remaining


def flatten_tokens(tensor: Tensor, axes: Axes, mask: Tensor | None = None) -> Tensor:
    """Put all tokens on one leading axis and drop masked-out tokens.

    ``tensor`` with axes e.g. ``("batch", "context", "sae")`` becomes ``(n_tokens, sae)`` where
    ``n_tokens`` is the number of unmasked tokens (``batch * context`` without a mask). Non-token
    axes keep their order. Token axes may sit anywhere; they are moved to the front first.
    """
    check_axes(tensor, axes)
    check_token_mask(mask, tensor, axes)
    dims = token_dims(axes)
    if not dims:
        raise ShapeError(f"tensor with axes {tuple(axes)} has no token axis {TOKEN_AXES}")
    rest = non_token_dims(axes)
    moved = tensor.permute(*dims, *rest)
    flat = moved.reshape(-1, *(tensor.shape[d] for d in rest))
    if mask is None:
        return flat
    # The mask's dims are the token axes in ``axes`` order, i.e. the same order as ``dims``.
    keep = mask.reshape(-1) != 0
    if flat.device.type == "cpu" and bool(keep.all()):
        return flat  # nothing masked: no copy (on the CPU the check costs no device sync)
    return flat[keep]


def feature_param_view(param: Tensor, tensor: Tensor, axes: Axes, name: str = "parameter") -> Tensor:
    """View a per-feature parameter so it broadcasts against ``tensor``.

    ``param`` (a threshold, a decoder norm...) has the shape of the trailing non-token axes of
    ``tensor``, e.g. ``(d_sae,)`` or ``(layers, d_sae)`` for acts ``("batch", "layers", "sae")``.
    Missing leading non-token axes are broadcast, token axes get size 1, and sizes of 1 in
    ``param`` broadcast as usual. Raises :class:`ShapeError` naming ``name`` on a mismatch.
    """
    check_axes(tensor, axes)
    rest = non_token_dims(axes)
    if param.ndim > len(rest):
        raise ShapeError(
            f"{name} has shape {tuple(param.shape)} but the tensor (shape {tuple(tensor.shape)}, "
            f"axes {tuple(axes)}) has only {len(rest)} non-token axes"
        )
    aligned = rest[len(rest) - param.ndim :]
    view = [1] * tensor.ndim
    for d, size in zip(aligned, param.shape, strict=True):
        if size not in (1, tensor.shape[d]):
            raise ShapeError(
                f"{name} has shape {tuple(param.shape)}, which does not match the non-token axes "
                f"{tuple(axes[i] for i in rest)} of shape {tuple(tensor.shape[i] for i in rest)}"
            )
        view[d] = size
    return param.reshape(view)
