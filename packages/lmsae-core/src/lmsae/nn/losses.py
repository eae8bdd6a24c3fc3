"""Training losses for sparse dictionaries, as pure functions of named tensors.

Every loss takes ``axes`` (one name per dim, see :mod:`lmsae.nn.axes`) and an optional token
``mask`` (shape of the token axes, bool or 0/1 float) and returns a 0-d tensor. The common
pattern is: reduce each token to a scalar by summing over all its non-token axes (``d_model``,
``sae``, ``layers``, ``heads``...), then take the masked mean over tokens, so masked-out
(padding) tokens contribute nothing and the scale does not depend on how many tokens are masked.

Per-feature parameters (decoder norms, thresholds) have the shape of the trailing non-token
axes, e.g. ``(d_sae,)`` for acts ``("batch", "sae")`` or ``(layers, d_sae)`` for
``("batch", "layers", "sae")``; a shorter shape broadcasts over the leading non-token axes.

Also here: :class:`DeadFeatureTracker`, which counts tokens since each feature last fired.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from lmsae.errors import CheckpointError, ShapeError
from lmsae.nn.axes import (
    Axes,
    check_axes,
    check_token_mask,
    feature_param_view,
    masked_token_mean,
    non_token_dims,
    token_dims,
)

__all__ = [
    "SPARSITY_KINDS",
    "DeadFeatureTracker",
    "auxk_loss",
    "jumprelu_preact_loss",
    "reconstruction_loss",
    "sparsity_penalty",
]

#: Valid ``kind`` values of :func:`sparsity_penalty`.
SPARSITY_KINDS: tuple[str, ...] = ("power", "tanh", "tanh-quad")

# Floor for the AuxK normaliser: only matters when the residual is (numerically) zero.
_AUXK_NORM_EPS = 1e-12


def _per_token_sum(tensor: Tensor, axes: Axes) -> Tensor:
    """Sum over every non-token axis; the result has the shape of the token axes."""
    dims = non_token_dims(axes)
    return tensor.sum(dim=dims) if dims else tensor


def _token_axes(axes: Axes) -> tuple[str, ...]:
    return tuple(axes[d] for d in token_dims(axes))


def _mean_tokens(per_token: Tensor, axes: Axes, mask: Tensor | None) -> Tensor:
    """Masked mean of a per-token tensor (shape = token axes) -> 0-d tensor."""
    mean, _ = masked_token_mean(per_token, _token_axes(axes), mask)
    return mean


def _validate(tensor: Tensor, axes: Axes, mask: Tensor | None, name: str) -> None:
    check_axes(tensor, axes, name)
    check_token_mask(mask, tensor, axes, name)


def _weighted(feature_acts: Tensor, axes: Axes, decoder_norm: Tensor | None) -> Tensor:
    if decoder_norm is None:
        return feature_acts
    return feature_acts * feature_param_view(decoder_norm, feature_acts, axes, "decoder_norm")


def reconstruction_loss(
    reconstruction: Tensor, label: Tensor, axes: Axes, mask: Tensor | None = None
) -> Tensor:
    """Squared error summed over ``d_model`` (and ``layers``/``heads``), masked mean over tokens.

    ``reconstruction`` and ``label`` share the shape and ``axes``, e.g. ``("batch", "d_model")``
    or ``("batch", "context", "d_model")``. Returns a 0-d tensor (units: squared activation
    norm per token).
    """
    _validate(reconstruction, axes, mask, "reconstruction")
    if reconstruction.shape != label.shape:
        raise ShapeError(
            f"reconstruction has shape {tuple(reconstruction.shape)} but label has shape "
            f"{tuple(label.shape)}"
        )
    per_token = _per_token_sum((reconstruction - label).square(), axes)
    return _mean_tokens(per_token, axes, mask)


def sparsity_penalty(
    feature_acts: Tensor,
    axes: Axes,
    *,
    kind: str,
    decoder_norm: Tensor | None = None,
    p: float = 1.0,
    tanh_stretch: float = 4.0,
    frequency_scale: float = 0.01,
    mask: Tensor | None = None,
) -> Tensor:
    """Sparsity penalty on decoder-norm-weighted activations ``s = feature_acts · ‖W_D‖``.

    ``feature_acts`` has axes such as ``("batch", "sae")`` or ``("batch", "layers", "sae")``
    and should be non-negative; ``decoder_norm`` (``None`` = weight 1) has the shape of the
    trailing non-token axes. ``kind``:

    * ``"power"``: per token the L_p norm of ``s`` over all non-token axes
      (``(Σ|s|^p)^(1/p)``; p = 1 is the weighted L1), masked mean over tokens.
    * ``"tanh"``: per token ``Σ tanh(c·s)`` over the non-token axes (c = ``tanh_stretch``),
      masked mean over tokens — a smooth L0 proxy.
    * ``"tanh-quad"``: ``p̂ = masked mean over tokens of tanh(c·s)`` per feature (keeping the
      non-token axes), loss ``Σ p̂·(1 + p̂/frequency_scale)`` — penalises high-frequency
      features quadratically.

    Returns a 0-d tensor. Unknown ``kind`` raises :class:`ValueError`.
    """
    if kind not in SPARSITY_KINDS:
        raise ValueError(f"unknown sparsity kind {kind!r}; valid kinds: {', '.join(SPARSITY_KINDS)}")
    _validate(feature_acts, axes, mask, "feature_acts")
    s = _weighted(feature_acts, axes, decoder_norm)
    rest = non_token_dims(axes)
    if kind == "power":
        if not p > 0:
            raise ValueError(f"sparsity p must be > 0, got {p!r}")
        # vector_norm's backward is well defined (zero) at an all-zero token, unlike Σ|s|^p^(1/p).
        per_token = torch.linalg.vector_norm(s, ord=p, dim=rest) if rest else s.abs()
        return _mean_tokens(per_token, axes, mask)
    if not tanh_stretch > 0:
        raise ValueError(f"tanh_stretch must be > 0, got {tanh_stretch!r}")
    soft = torch.tanh(tanh_stretch * s)
    if kind == "tanh":
        return _mean_tokens(_per_token_sum(soft, axes), axes, mask)
    # tanh-quad
    if not (frequency_scale > 0 and math.isfinite(frequency_scale)):
        raise ValueError(f"frequency_scale must be a finite number > 0, got {frequency_scale!r}")
    freq, _ = masked_token_mean(soft, axes, mask)
    return (freq * (1 + freq / frequency_scale)).sum()


def jumprelu_preact_loss(
    gated_hidden_pre: Tensor,
    threshold: Tensor,
    axes: Axes,
    decoder_norm: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """JumpReLU pre-activation loss: per token ``Σ_i ReLU(θ_i − h_i)·‖W_D,i‖``, masked mean.

    Pulls pre-activations of features that are below their threshold towards it, so dead
    features can come back. ``threshold`` and ``decoder_norm`` (``None`` = weight 1) have the
    shape of the trailing non-token axes of ``gated_hidden_pre``.

    ``gated_hidden_pre`` must be the SAME pre-activation the threshold gates: with decoder-norm
    gating on, that is ``h·‖W_D‖`` (what the JumpReLU actually compares with θ), not the raw
    ``h``. (A reference implementation compared θ with the ungated value, mixing two scales; the
    loss then pushed features towards the wrong point.) Returns a 0-d tensor.
    """
    _validate(gated_hidden_pre, axes, mask, "gated_hidden_pre")
    theta = feature_param_view(threshold, gated_hidden_pre, axes, "threshold")
    gap = torch.relu(theta - gated_hidden_pre)
    per_token = _per_token_sum(_weighted(gap, axes, decoder_norm), axes)
    return _mean_tokens(per_token, axes, mask)


def auxk_loss(
    residual: Tensor,
    aux_reconstruction: Tensor | None,
    axes: Axes,
    mask: Tensor | None = None,
    normalize: bool = True,
) -> Tensor:
    """AuxK loss (Gao et al., "Scaling and evaluating sparse autoencoders").

    ``residual`` e = label − reconstruction (the caller detaches it); ``aux_reconstruction`` ê
    is the decode of the dead-feature activations (see
    :func:`lmsae.nn.activations.auxk_select`) WITHOUT the decoder bias; both have axes such as
    ``("batch", "d_model")`` or ``("batch", "layers", "d_model")``.

    Loss = masked mean over tokens of ``‖e − ê‖²`` (summed over every non-token axis). With
    ``normalize`` it is divided by the masked mean of ``‖e‖²`` (floored at a tiny epsilon), so
    the loss is scale-free: 1 means the dead features explain none of the residual. Returns a
    0-d zero tensor when ``aux_reconstruction`` is ``None`` (no dead features).
    """
    _validate(residual, axes, mask, "residual")
    if aux_reconstruction is None:
        return residual.new_zeros(())
    if aux_reconstruction.shape != residual.shape:
        raise ShapeError(
            f"aux_reconstruction has shape {tuple(aux_reconstruction.shape)} but residual has "
            f"shape {tuple(residual.shape)}"
        )
    loss = _mean_tokens(_per_token_sum((residual - aux_reconstruction).square(), axes), axes, mask)
    if not normalize:
        return loss
    scale = _mean_tokens(_per_token_sum(residual.square(), axes), axes, mask)
    return loss / scale.clamp_min(_AUXK_NORM_EPS)


class DeadFeatureTracker:
    """Counts, per feature, the tokens seen since the feature last fired.

    ``tokens_since_fired`` is an int64 tensor of ``shape`` (e.g. ``(d_sae,)`` or
    ``(n_layers, d_sae)``). Each :meth:`update` adds the batch's number of unmasked tokens to
    every feature and resets to 0 the features that fired (> 0) on at least one unmasked token.
    """

    def __init__(self, shape: int | Sequence[int], device: torch.device | str | None = None):
        self.shape: tuple[int, ...] = (shape,) if isinstance(shape, int) else tuple(shape)
        self.tokens_since_fired = torch.zeros(self.shape, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, feature_acts: Tensor, axes: Axes, mask: Tensor | None = None,
               reduce: Callable[[Tensor, int], tuple[Tensor, int]] | None = None) -> None:
        """Account for one batch of ``feature_acts`` (axes e.g. ``("batch", "layers", "sae")``).

        Token axes are reduced; other leading non-feature axes (layers, heads) are kept when
        they are part of ``shape`` and reduced ("fired anywhere") when they are not.
        """
        _validate(feature_acts, axes, mask, "feature_acts")
        tdims = token_dims(axes)
        fired = feature_acts.detach() > 0
        if mask is not None:
            live = mask != 0
            view = [feature_acts.shape[i] if i in tdims else 1 for i in range(feature_acts.ndim)]
            fired = fired & live.reshape(view)
            n_tokens = int(live.sum().item())
        else:
            n_tokens = math.prod(feature_acts.shape[d] for d in tdims)
        if tdims:
            fired = fired.any(dim=tdims)
        extra = fired.ndim - len(self.shape)
        if extra > 0:
            fired = fired.any(dim=tuple(range(extra)))
        if reduce is not None:
            # data parallelism: fired anywhere in the global batch, its tokens counted
            fired, n_tokens = reduce(fired, n_tokens)
        if tuple(fired.shape) != self.shape:
            raise ShapeError(
                f"feature_acts of shape {tuple(feature_acts.shape)} (axes {tuple(axes)}) do not "
                f"end with the tracked feature shape {self.shape}"
            )
        counts = self.tokens_since_fired
        if counts.device != fired.device:
            counts = counts.to(fired.device)
        counts = counts + n_tokens
        self.tokens_since_fired = counts.masked_fill(fired, 0)

    @torch.no_grad()
    def update_fired(self, fired: Tensor, n_tokens: int) -> None:
        """Account for a batch of ``n_tokens`` unmasked tokens in which the features where
        ``fired`` (bool, of ``shape``) fired, e.g. ``feature_count > 0`` of the batch statistics."""
        if tuple(fired.shape) != self.shape or fired.dtype != torch.bool:
            raise ShapeError(f"fired must be a bool tensor of shape {self.shape}, got {fired.dtype} "
                             f"{tuple(fired.shape)}")
        counts = self.tokens_since_fired
        if counts.device != fired.device:
            counts = counts.to(fired.device)
        self.tokens_since_fired = (counts + int(n_tokens)).masked_fill(fired, 0)

    @torch.no_grad()
    def update_sparse(self, indices: Tensor, values: Tensor, mask: Tensor | None = None) -> None:
        """:meth:`update` from sparse activations: ``indices``/``values`` ``(*tokens, k)`` of a
        single feature axis (as a fused TopK path returns them), ``mask`` of shape ``tokens``."""
        if len(self.shape) != 1:
            raise ShapeError(f"sparse updates need a single feature axis, the tracker has shape {self.shape}")
        k = indices.shape[-1]
        idx, val = indices.reshape(-1, k), values.detach().reshape(-1, k)
        live = val > 0
        if mask is not None:
            rows = mask.reshape(-1) != 0
            live = live & rows[:, None]
            n_tokens = int(rows.sum().item())
        else:
            n_tokens = idx.shape[0]
        fired = torch.zeros(self.shape, dtype=torch.bool, device=idx.device)
        fired[idx[live]] = True
        counts = self.tokens_since_fired
        if counts.device != fired.device:
            counts = counts.to(fired.device)
        self.tokens_since_fired = (counts + n_tokens).masked_fill(fired, 0)

    def dead_mask(self, threshold_tokens: int) -> Tensor:
        """Bool tensor of ``shape``: True where a feature has not fired for ``>= threshold_tokens``."""
        return self.tokens_since_fired >= threshold_tokens

    def state_dict(self) -> dict[str, Tensor]:
        """``{"tokens_since_fired": int64 tensor}`` (a copy)."""
        return {"tokens_since_fired": self.tokens_since_fired.detach().clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore from :meth:`state_dict`; raises :class:`CheckpointError` on a mismatch."""
        if "tokens_since_fired" not in state:
            raise CheckpointError("dead-feature tracker state lacks 'tokens_since_fired'")
        counts = torch.as_tensor(state["tokens_since_fired"])
        if tuple(counts.shape) != self.shape:
            raise CheckpointError(
                f"dead-feature tracker state has shape {tuple(counts.shape)}, expected {self.shape}"
            )
        self.tokens_since_fired = counts.to(
            dtype=torch.int64, device=self.tokens_since_fired.device
        ).clone()

    def __repr__(self) -> str:
        return f"DeadFeatureTracker(shape={self.shape})"
