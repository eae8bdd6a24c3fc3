"""Sparse activation functions for dictionaries.

All modules take pre-activations ``h`` whose LAST dim is the feature axis (``d_sae``); any
leading dims are tokens or other per-token axes (layers, heads). Each module's
``forward(h, mask=None)`` accepts a token mask with the shape of ``h``'s leading dims; per-token
functions (ReLU, JumpReLU, TopK) ignore it — masked positions are still computed, the losses
discard them — while :class:`BatchTopK` excludes masked tokens from its joint selection.

JumpReLU uses straight-through estimators with a rectangle kernel of width ``bandwidth`` (ε):
the pseudo-derivative of the step ``H(h - θ)`` wrt θ is ``-(1/ε)·[|h - θ| < ε/2]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmsae.errors import ShapeError


def _parallel():  # the distributed forward context (imported late: lmsae.distributed imports configs)
    from lmsae.distributed.parallel import current

    return current()


def global_kth_value(values: Tensor, k: int, group, dim: int = -1) -> Tensor:
    from lmsae.distributed.collectives import global_kth_value as kth

    return kth(values, k, group, dim)


def all_reduce(tensor: Tensor, group, op: str = "sum") -> Tensor:
    from lmsae.distributed.collectives import all_reduce as reduce

    return reduce(tensor, group, op)

__all__ = [
    "ACTIVATION_NAMES",
    "BatchTopK",
    "JumpReLU",
    "ReLU",
    "TopK",
    "apply_with_decoder_norm_gating",
    "auxk_select",
    "build_activation",
    "jumprelu",
    "jumprelu_l0_step",
]

ACTIVATION_NAMES: tuple[str, ...] = ("relu", "jumprelu", "topk", "batchtopk")


# --------------------------------------------------------------------------------- helpers


def _check_k(k: object, what: str, minimum: int = 1) -> int:
    # bool is an int subclass; ``k=True`` is almost certainly a config mistake.
    if isinstance(k, bool) or not isinstance(k, int) or k < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {k!r}")
    return k


def _check_bandwidth(bandwidth: float) -> float:
    bandwidth = float(bandwidth)
    if not (bandwidth > 0 and math.isfinite(bandwidth)):
        raise ValueError(f"JumpReLU bandwidth must be a finite number > 0, got {bandwidth!r}")
    return bandwidth


def _sum_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Undo broadcasting: sum ``grad`` down to ``shape`` (leading dims, then size-1 dims)."""
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(dim=tuple(range(extra)))
    keep = tuple(i for i, s in enumerate(shape) if s == 1 and grad.shape[i] != 1)
    if keep:
        grad = grad.sum(dim=keep, keepdim=True)
    return grad.reshape(shape)


def _as_threshold(threshold: Tensor | float, h: Tensor) -> Tensor:
    if isinstance(threshold, Tensor):
        return threshold
    return torch.tensor(float(threshold), dtype=h.dtype, device=h.device)


def _check_feature_param(param: Tensor, h: Tensor, name: str) -> None:
    """``param`` must broadcast onto the trailing dims of ``h`` without enlarging it."""
    try:
        out = torch.broadcast_shapes(param.shape, h.shape)
    except RuntimeError:
        out = None
    if out != h.shape:
        raise ShapeError(
            f"{name} has shape {tuple(param.shape)}, which does not broadcast onto the "
            f"pre-activations of shape {tuple(h.shape)} (feature axis last)"
        )


def _check_mask(mask: Tensor | None, h: Tensor) -> None:
    if mask is not None and tuple(mask.shape) != tuple(h.shape[:-1]):
        raise ShapeError(
            f"token mask has shape {tuple(mask.shape)} but the pre-activations of shape "
            f"{tuple(h.shape)} have leading (token) shape {tuple(h.shape[:-1])}"
        )


# --------------------------------------------------------------------------- JumpReLU core


class _JumpReLUFunction(torch.autograd.Function):
    """``h·[h > θ]`` with a straight-through rectangle-kernel gradient to θ."""

    @staticmethod
    def forward(ctx, h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return torch.where(h > threshold, h, torch.zeros_like(h))

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        h, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_h = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.where(h > threshold, grad_out, torch.zeros_like(grad_out))
        if ctx.needs_input_grad[1]:
            # d/dθ [h·H(h-θ)] ≈ -(θ/ε)·K((h-θ)/ε) with K the unit rectangle; the [h > 0] factor
            # keeps features with non-positive pre-activations from pulling on the threshold.
            window = ((h - threshold).abs() < eps / 2) & (h > 0)
            local = grad_out * (-threshold / eps)
            grad_theta = torch.where(window, local, torch.zeros_like(local))
            grad_theta = _sum_to_shape(grad_theta, threshold.shape).to(threshold.dtype)
        return grad_h, grad_theta, None


class _JumpReLUStepFunction(torch.autograd.Function):
    """Heaviside step ``[h > θ]`` with a rectangle-kernel gradient to θ (none to h)."""

    @staticmethod
    def forward(ctx, h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return (h > threshold).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        h, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = None
        if ctx.needs_input_grad[1]:
            window = (h - threshold).abs() < eps / 2
            local = grad_out * (-1.0 / eps)
            grad_theta = torch.where(window, local, torch.zeros_like(local))
            grad_theta = _sum_to_shape(grad_theta, threshold.shape).to(threshold.dtype)
        # The step is flat almost everywhere in h: the L0 penalty trains only the threshold.
        return None, grad_theta, None


def jumprelu(h: Tensor, threshold: Tensor | float, bandwidth: float) -> Tensor:
    """Functional JumpReLU: ``h·[h > θ]``, same shape as ``h``.

    ``threshold`` (θ, > 0) broadcasts onto the trailing dims of ``h`` (e.g. ``(d_sae,)`` or
    ``(n_layers, d_sae)``). Gradients: wrt ``h`` it is ``g·[h > θ]``; wrt θ it is the sum over
    the broadcast (token) dims of ``g·(-θ/ε)·[|h-θ| < ε/2]·[h > 0]``, ε = ``bandwidth``.
    """
    bandwidth = _check_bandwidth(bandwidth)
    threshold = _as_threshold(threshold, h)
    _check_feature_param(threshold, h, "JumpReLU threshold")
    return _JumpReLUFunction.apply(h, threshold, bandwidth)


def jumprelu_l0_step(h: Tensor, threshold: Tensor | float, bandwidth: float) -> Tensor:
    """Step ``[h > θ]`` (float, same shape and dtype as ``h``) for an L0 penalty.

    Gradient wrt θ: ``-(1/ε)·[|h-θ| < ε/2]`` summed over the broadcast dims; no gradient to ``h``.
    Summing the result over the feature axis gives the per-token L0.
    """
    bandwidth = _check_bandwidth(bandwidth)
    threshold = _as_threshold(threshold, h)
    _check_feature_param(threshold, h, "JumpReLU threshold")
    return _JumpReLUStepFunction.apply(h, threshold, bandwidth)


# --------------------------------------------------------------------------------- modules


class ReLU(nn.Module):
    """Plain ReLU; the token mask is ignored."""

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """``max(h, 0)``, same shape as ``h``."""
        return torch.relu(h)

    def extra_repr(self) -> str:
        return ""


class JumpReLU(nn.Module):
    """JumpReLU ``h·[h > θ]`` with a learnable per-feature threshold θ = exp(log_threshold).

    Args:
        shape: shape of the threshold, broadcast onto the trailing dims of the
            pre-activations, e.g. ``(d_sae,)`` or ``(n_layers, d_sae)`` (an int means ``(n,)``).
        init_threshold: initial θ, > 0 (same units as the pre-activations).
        bandwidth: ε, the width of the rectangle kernel of the straight-through estimator.
    """

    def __init__(
        self,
        shape: int | Sequence[int],
        init_threshold: float,
        bandwidth: float,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"JumpReLU shape must be positive integers, got {shape!r}")
        init_threshold = float(init_threshold)
        if not (init_threshold > 0 and math.isfinite(init_threshold)):
            raise ValueError(f"JumpReLU init_threshold must be a finite number > 0, got {init_threshold!r}")
        self.shape = shape
        self.bandwidth = _check_bandwidth(bandwidth)
        self.log_threshold = nn.Parameter(
            torch.full(shape, math.log(init_threshold), dtype=dtype, device=device)
        )

    @property
    def threshold(self) -> Tensor:
        """θ = exp(log_threshold), shape ``self.shape`` (differentiable)."""
        return self.log_threshold.exp()

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """JumpReLU of ``h`` (``(..., *shape)``); the token mask is ignored."""
        return jumprelu(h, self.threshold, self.bandwidth)

    def step(self, h: Tensor) -> Tensor:
        """``[h > θ]`` with the L0 straight-through gradient (see :func:`jumprelu_l0_step`)."""
        return jumprelu_l0_step(h, self.threshold, self.bandwidth)

    @torch.no_grad()
    def rescale_threshold(self, factor: float | Tensor) -> None:
        """Multiply θ by ``factor`` (> 0; a scalar or a tensor broadcastable to ``shape``).

        Done in log space, without gradient tracking (e.g. after rescaling the encoder).
        """
        factor_t = torch.as_tensor(factor, dtype=self.log_threshold.dtype, device=self.log_threshold.device)
        if not bool((factor_t > 0).all()):
            raise ValueError("JumpReLU.rescale_threshold: factor must be > 0 everywhere")
        try:
            ok = torch.broadcast_shapes(factor_t.shape, self.log_threshold.shape) == self.log_threshold.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ShapeError(
                f"rescale factor of shape {tuple(factor_t.shape)} does not broadcast to the "
                f"threshold shape {self.shape}"
            )
        self.log_threshold.add_(factor_t.log())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bandwidth={self.bandwidth}"


class TopK(nn.Module):
    """ReLU, then keep the ``k`` largest entries of each row (last dim); zero the rest.

    ``k`` is a mutable attribute (a trainer may schedule it); it is validated on assignment.
    If ``k`` exceeds the number of features, every (ReLU'd) entry is kept. Gradient flows only
    to the kept entries. The token mask is ignored.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        self._k = _check_k(value, "TopK k")

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """Top-k of ``relu(h)`` along the last dim; same shape as ``h``.

        Under feature parallelism (:func:`lmsae.distributed.parallel.current`) the last dim is
        this process's shard and the selection is the global one (exact)."""
        acts = torch.relu(h)
        ctx = _parallel()
        if ctx is not None and ctx.feature_group is not None:
            k = min(self._k, h.shape[-1] * ctx.feature_shards)
            kth = global_kth_value(acts, k, ctx.feature_group)
            return torch.where((acts >= kth) & (acts > 0), acts, torch.zeros_like(acts))
        k = min(self._k, h.shape[-1])
        values, indices = acts.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(acts).scatter(-1, indices, values)

    def extra_repr(self) -> str:
        return f"k={self._k}"


class BatchTopK(nn.Module):
    """ReLU, then keep the ``k · n_tokens`` largest entries over tokens × features jointly.

    All leading dims of ``h`` are tokens. With a token ``mask`` (shape ``h.shape[:-1]``) masked
    tokens are excluded: their outputs are zero and ``n_tokens`` counts unmasked tokens only.
    Gradient flows only to the kept entries. ``k`` is a mutable, validated attribute.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        self._k = _check_k(value, "BatchTopK k")

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """Batch top-k of ``relu(h)``; same shape as ``h``."""
        _check_mask(mask, h)
        acts = torch.relu(h)
        flat = acts.reshape(-1)
        if mask is None:
            n_tokens = math.prod(h.shape[:-1])
        else:
            keep = (mask != 0).unsqueeze(-1).expand_as(acts).reshape(-1)
            # Masked entries become 0 so they can only be "selected" as zeros, which change
            # nothing and receive no gradient (the ``where`` blocks it).
            flat = torch.where(keep, flat, torch.zeros_like(flat))
            n_tokens = int((mask != 0).sum().item())
        ctx = _parallel()
        if ctx is not None and ctx.batch_group is not None:
            # tokens split over data ranks, features over model ranks: one global selection
            counts = torch.tensor([float(n_tokens), float(flat.numel())], dtype=torch.float64, device=flat.device)
            n_global, size_global = (int(v) for v in all_reduce(counts, ctx.data_group).tolist())
            size_global *= ctx.feature_shards
            total = min(self._k * n_global, size_global)
            if total == 0:
                return torch.zeros_like(acts)
            kth = global_kth_value(flat, total, ctx.batch_group, dim=0)
            return torch.where((flat >= kth) & (flat > 0), flat, torch.zeros_like(flat)).reshape(h.shape)
        total = min(self._k * n_tokens, flat.numel())
        if total == 0:
            return torch.zeros_like(acts)
        values, indices = flat.topk(total, sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).reshape(h.shape)

    def extra_repr(self) -> str:
        return f"k={self._k}"


# ------------------------------------------------------------------------- gating & factory


def apply_with_decoder_norm_gating(
    act_module: nn.Module, h: Tensor, decoder_norm: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Apply ``act_module`` to decoder-norm-scaled pre-activations and unscale the result.

    Output ``act(h·n) / n`` with ``n = decoder_norm`` broadcast onto the trailing dims of ``h``
    (shape e.g. ``(d_sae,)`` or ``(n_layers, d_sae)``). Selection (TopK) and thresholds
    (JumpReLU) therefore act on ``h·n`` — each feature's contribution to the reconstruction
    norm — while the returned activations stay on the unscaled scale of ``h``. ``n`` is
    clamped to a tiny epsilon so a zero-norm decoder row cannot divide by zero.
    """
    _check_feature_param(decoder_norm, h, "decoder_norm")
    eps = max(1e-8, torch.finfo(h.dtype).tiny) if h.dtype.is_floating_point else 1e-8
    norm = decoder_norm.clamp_min(eps)
    return act_module(h * norm, mask=mask) / norm


def build_activation(
    name: str,
    *,
    k: int | None = None,
    shape: int | Sequence[int] | None = None,
    init_threshold: float | None = None,
    bandwidth: float | None = None,
) -> nn.Module:
    """Build an activation module by name: ``"relu"``, ``"jumprelu"``, ``"topk"``, ``"batchtopk"``.

    ``topk``/``batchtopk`` need ``k``; ``jumprelu`` needs ``shape``, ``init_threshold`` and
    ``bandwidth``. Raises :class:`ValueError` for an unknown name or a missing argument.
    """
    key = name.lower() if isinstance(name, str) else name
    if key == "relu":
        return ReLU()
    if key in ("topk", "batchtopk"):
        if k is None:
            raise ValueError(f"activation {name!r} requires k")
        return TopK(k) if key == "topk" else BatchTopK(k)
    if key == "jumprelu":
        missing = [
            arg
            for arg, value in (("shape", shape), ("init_threshold", init_threshold), ("bandwidth", bandwidth))
            if value is None
        ]
        if missing:
            raise ValueError(f"activation 'jumprelu' requires {', '.join(missing)}")
        return JumpReLU(shape, init_threshold, bandwidth)  # type: ignore[arg-type]
    raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(ACTIVATION_NAMES)}")


# ------------------------------------------------------------------------------------ AuxK


def auxk_select(hidden_pre: Tensor, dead_mask: Tensor, k_aux: int) -> Tensor:
    """Sparse activations of dead features only, for the AuxK loss.

    ReLU ``hidden_pre`` (``(..., d_sae)``), zero every feature that is not dead (``dead_mask``:
    bool, broadcastable onto the trailing dims, e.g. ``(d_sae,)`` or ``(n_layers, d_sae)``) and
    keep the top ``min(k_aux, n_dead)`` entries per row. Gradient flows only to kept entries.
    Returns zeros (no gradient) when no feature is dead or ``k_aux == 0``.
    """
    k_aux = _check_k(k_aux, "auxk_select k_aux", minimum=0)
    if dead_mask.dtype != torch.bool:
        raise TypeError(f"dead_mask must be a bool tensor, got dtype {dead_mask.dtype}")
    _check_feature_param(dead_mask, hidden_pre, "dead_mask")
    dead = dead_mask.to(hidden_pre.device)
    ctx = _parallel()
    if ctx is not None and ctx.feature_group is not None:
        # features split over model ranks: the global top k_aux of the dead features per row
        n_dead = dead.expand(hidden_pre.shape[-dead.ndim:]).sum(dim=-1).to(torch.int64)
        max_dead = int(all_reduce(n_dead, ctx.feature_group).max())
        k = min(k_aux, max_dead, hidden_pre.shape[-1] * ctx.feature_shards)
        if k == 0:
            return torch.zeros_like(hidden_pre)
        acts = torch.where(dead, torch.relu(hidden_pre), torch.zeros_like(hidden_pre))
        kth = global_kth_value(acts, k, ctx.feature_group)
        return torch.where((acts >= kth) & (acts > 0), acts, torch.zeros_like(acts))
    max_dead = int(dead.sum(dim=-1).max().item()) if dead.ndim else int(dead.item()) * hidden_pre.shape[-1]
    k = min(k_aux, max_dead, hidden_pre.shape[-1])
    if k == 0:
        return torch.zeros_like(hidden_pre)
    acts = torch.relu(hidden_pre)
    # Non-dead entries are zeroed through ``where``: if a row has fewer than k dead features
    # they may be picked, but only as zeros that contribute nothing and get no gradient.
    acts = torch.where(dead, acts, torch.zeros_like(acts))
    values, indices = acts.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(acts).scatter(-1, indices, values)
