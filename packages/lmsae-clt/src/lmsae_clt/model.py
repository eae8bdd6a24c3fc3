"""The cross-layer transcoder (CLT).

L layers; layer i reads ``x_i = hook_points_in[i]`` and has F = ``d_sae`` features; each feature
of layer i writes to every layer j >= i (d = d_model, o = d_out)::

    h_i = x_i W_E[i] + b_E[i]                               (pre-activations, (..., L, F))
    f   = act(h)                or act(h·n) / n with decoder-norm gating
    y_j = sum_{i <= j} f_i W_D[i->j] + b_D[j]               (predictions, (..., L, o))
    n_i = sqrt( sum_{j >= i} c_j² ||W_D[i->j]||² )          (combined decoder norm, (L, F))

Parameters (names are stable: they are the safetensors keys and the sharding-rule keys):

- ``W_E`` (L, d, F), ``b_E`` (L, F);
- ``W_D.<j>`` (j+1, F, o) for each target layer j: row ``W_D.<j>[i, f]`` is the decoder of
  feature f of source layer i into layer j (the reference's layout: per target, every source
  i <= j is one dense block, so decoding a target is one matrix product);
- ``b_D`` (L, o), one decoder bias per target layer;
- ``activation.log_threshold`` (L, F) with ``act_fn = "jumprelu"``.

Buffer ``target_norm_factors`` (L,) holds c_j: the factor that converts target j's decoder rows
into the units decoder norms are measured in. It is 1 during training; folding multiplies it by
the output scale of layer j, so that the combined norm — hence the gate, the decoder-norm
penalty and the JumpReLU thresholds — stays exactly what the dictionary was trained with.

Folding convention: the pre-activations h are left unchanged (``W_E[i] ← s_in[i]·W_E[i]``) and
each target's decoder and bias absorb ``1/s_out[j]``. Because h does not change, every selection
(including the across-layer TopK variants, which compare layers with different input scales)
and every threshold survives folding exactly, with or without gating.

Features are indexed layer-major for analysis: global index ``i·F + f`` is feature f of layer i
(:meth:`CrossLayerTranscoder.analysis_activations`, :meth:`~CrossLayerTranscoder.decoder_directions`).
Feature parallelism (``[distributed] model = k``): shard i holds features ``[i F/k, (i+1) F/k)``
of every layer with their encoders and decoders (:func:`clt_sharding_rules`) and is itself a CLT
of ``d_sae / k`` features per layer (:func:`clt_shard_config`). Its encoder, activation (the
selections of :mod:`lmsae_clt.activations` are global across the shards) and decoder compute
exactly its features' share; the partial predictions are summed across shards, with ``b_D``
added by the first shard only (:meth:`~CrossLayerTranscoder.decode` there,
:meth:`~CrossLayerTranscoder.decode_linear` elsewhere). The combined decoder norm of a feature
reads only its own decoders, so it is local too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmsae.dictionary.base import SparseDictionary
from lmsae.errors import DataError, LmsaeError, ShapeError, ShardingError
from lmsae.nn.activations import JumpReLU, apply_with_decoder_norm_gating
from lmsae.nn.axes import flatten_tokens
from lmsae.records import ArchitectureSpec
from lmsae_clt.activations import build_clt_activation
from lmsae_clt.config import ACROSS_LAYER_ACT_FNS, CLTConfig

__all__ = [
    "CLT_SPEC",
    "CrossLayerTranscoder",
    "clt_analysis_extras",
    "clt_example_config",
    "clt_shard_config",
    "clt_sharding_rules",
]


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with a zero (not NaN/inf) gradient where ``x == 0`` (a feature whose decoders are all zero)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


class CrossLayerTranscoder(SparseDictionary):
    """Cross-layer transcoder (module docstring). Axes: input ``(layers, d_model)``, features
    ``(layers, sae)``, output ``(layers, d_model)`` after the token axes."""

    input_dims = ("layers", "d_model")
    feature_dims = ("layers", "sae")
    output_dims = ("layers", "d_model")

    config: CLTConfig

    def __init__(self, config: CLTConfig):
        super().__init__(config)
        n_layers, d, f, o = config.n_layers, config.d_model, config.n_features, config.output_width
        self.W_E = nn.Parameter(torch.empty(n_layers, d, f))
        self.b_E = nn.Parameter(torch.empty(n_layers, f))
        self.W_D = nn.ParameterList([nn.Parameter(torch.empty(j + 1, f, o)) for j in range(n_layers)])
        self.b_D = nn.Parameter(torch.empty(n_layers, o))
        self.register_buffer("target_norm_factors", torch.ones(n_layers), persistent=True)
        self.activation = build_clt_activation(config)
        self.reset_parameters()

    # --- what the dictionary reads and predicts -------------------------------------------------

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def n_features(self) -> int:
        """Features as analysis sees them: ``L · d_sae``, indexed layer-major (``i·d_sae + f``).

        (``config.n_features`` is the per-layer count ``d_sae``, the last axis of the feature tensors.)
        """
        return self.config.n_layers * self.config.n_features

    def prepare_input(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """The input hook points stacked on a layers axis: ``(tokens..., L, d_model)``."""
        return torch.stack([_get(batch, h) for h in self.config.hooks_in], dim=-2), {}

    def prepare_label(self, batch: Mapping[str, Any]) -> Tensor:
        """The output hook points stacked on a layers axis: ``(tokens..., L, d_out)``."""
        return torch.stack([_get(batch, h) for h in self.config.hooks_out], dim=-2)

    def hook_dims(self) -> dict[str, int]:
        dims = {h: self.config.d_model for h in self.config.hooks_in}
        for h in self.config.hooks_out:
            dims.setdefault(h, self.config.output_width)
        return dims

    # --- maths ------------------------------------------------------------------------------------

    def encode_pre(self, x: Tensor, **extras: Any) -> Tensor:
        """Pre-activations ``(tokens..., L, F)`` of inputs ``(tokens..., L, d_model)``."""
        if x.shape[-2:] != self.W_E.shape[:2]:
            raise ShapeError(f"CLT input must end with (layers, d_model) = {tuple(self.W_E.shape[:2])}, "
                             f"got shape {tuple(x.shape)}")
        return torch.einsum("...ld,ldf->...lf", x, self.W_E) + self.b_E

    def activate(self, hidden_pre: Tensor, mask: Tensor | None = None) -> Tensor:
        """Feature activations ``(tokens..., L, F)``; gated by the live combined decoder norm when configured.

        The gate is not detached: ``act(h·n)/n`` has zero derivative wrt n wherever it is defined
        (every activation here is positively homogeneous where it passes h through).
        """
        if self.config.decoder_norm_gating:
            return apply_with_decoder_norm_gating(self.activation, hidden_pre, self.decoder_norm(), mask)
        return self.activation(hidden_pre, mask=mask)

    def decode(self, feature_acts: Tensor, **extras: Any) -> Tensor:
        """Predictions ``(tokens..., L, o)``: :meth:`decode_sparse` when fewer than
        ``sparse_decode_density`` of the activations are non-zero, else :meth:`decode_dense`.

        A JumpReLU CLT being trained always decodes densely: its threshold's straight-through
        gradient reads the loss gradient at inactive features (just below θ), which the sparse
        path does not compute (see :meth:`decode_sparse`).
        """
        return self._decode(feature_acts, bias=True)

    def decode_linear(self, feature_acts: Tensor, **extras: Any) -> Tensor:
        """:meth:`decode` without the output bias ``b_D``: ``y_j = sum_{i <= j} f_i W_D[i->j]``
        (the same dense or sparse path as :meth:`decode`)."""
        return self._decode(feature_acts, bias=False)

    def _decode(self, feature_acts: Tensor, bias: bool) -> Tensor:
        threshold = self.config.sparse_decode_density
        needs_dense_grad = (self.config.act_fn == "jumprelu" and torch.is_grad_enabled()
                            and feature_acts.requires_grad)
        if threshold > 0 and feature_acts.numel() > 0 and not needs_dense_grad:
            density = float(torch.count_nonzero(feature_acts.detach())) / feature_acts.numel()
            if density < threshold:
                return self.decode_sparse(feature_acts, bias=bias)
        return self.decode_dense(feature_acts, bias=bias)

    def _check_acts(self, feature_acts: Tensor) -> None:
        if feature_acts.ndim < 3 or feature_acts.shape[-2:] != self.b_E.shape:
            raise ShapeError(f"CLT feature activations must end with (layers, d_sae) = {tuple(self.b_E.shape)}, "
                             f"got shape {tuple(feature_acts.shape)}")

    def decode_dense(self, feature_acts: Tensor, bias: bool = True) -> Tensor:
        """Predictions from dense activations: for each target j one product of
        ``f[..., :j+1, :]`` (flattened to (j+1)·F) with ``W_D.<j>`` (plus ``b_D[j]`` when ``bias``)."""
        self._check_acts(feature_acts)
        outs = []
        for j, w in enumerate(self.W_D):
            src = feature_acts[..., : j + 1, :].flatten(-2)
            out = src @ w.reshape(-1, w.shape[-1])
            outs.append(out + self.b_D[j] if bias else out)
        return torch.stack(outs, dim=-2)

    def decode_sparse(self, feature_acts: Tensor, bias: bool = True) -> Tensor:
        """Predictions computed from the non-zero activations only (same value and gradients as
        :meth:`decode_dense`, see below; ``bias=False`` leaves out ``b_D``).

        The active entries ``(token, i, f)`` come in token order; for each target j the entries with
        ``i <= j`` form one bag per token, and ``embedding_bag`` sums their decoder rows of
        ``W_D.<j>`` weighted by the activations. Cost O(nnz · L · o) instead of O(tokens · L² · F · o).
        On a CPU the gather costs a few hundred times a dense multiply-add, so this pays off only
        for very sparse activations (see ``sparse_decode_density``).

        Gradients: identical to the dense path for the decoders, the biases and every non-zero
        activation; zero (not ``W_D·grad``) for the zero activations. That changes nothing upstream
        for ReLU and the TopK variants, whose backward passes zero there anyway, but would starve a
        JumpReLU threshold, so :meth:`decode` does not use this path to train a JumpReLU.
        """
        self._check_acts(feature_acts)
        lead = feature_acts.shape[:-2]
        n_layers, n_feat = feature_acts.shape[-2:]
        flat = feature_acts.reshape(-1, n_layers, n_feat)
        n_tokens = flat.shape[0]
        tok, src, feat = flat.nonzero(as_tuple=True)  # row-major: grouped by token
        values = flat[tok, src, feat]  # differentiable gather of the active activations
        outs = []
        for j, w in enumerate(self.W_D):
            keep = src <= j
            t = tok[keep]
            offsets = torch.zeros(n_tokens, dtype=torch.long, device=flat.device)
            if n_tokens > 1:
                offsets[1:] = torch.bincount(t, minlength=n_tokens).cumsum(0)[:-1]
            rows = F.embedding_bag(src[keep] * n_feat + feat[keep], w.reshape(-1, w.shape[-1]), offsets,
                                   mode="sum", per_sample_weights=values[keep].to(w.dtype))
            outs.append(rows + self.b_D[j] if bias else rows)
        return torch.stack(outs, dim=1).reshape(*lead, n_layers, self.b_D.shape[-1])

    def decoder_norm(self) -> Tensor:
        """Combined decoder norm of each feature, ``(L, F)``: ``sqrt(sum_{j>=i} c_j² ||W_D[i->j]||²)``.

        Differentiable wrt every decoder (the sparsity penalty trains them through it; the
        reference computed it without gradient). Zero-norm features get a zero gradient.
        """
        n_layers = self.config.n_layers
        c2 = self.target_norm_factors.to(self.b_D.dtype).square()
        total = None
        for j, w in enumerate(self.W_D):
            sq = w.square().sum(-1) * c2[j]  # (j+1, F)
            sq = F.pad(sq, (0, 0, 0, n_layers - 1 - j))
            total = sq if total is None else total + sq
        return _safe_sqrt(total)

    def target_decoder_norms(self, raw: bool = True) -> Tensor:
        """Norm of each feature's decoder into each target layer, ``(L_source, F, L_target)``, zero for j < i.

        ``raw=True``: in raw activation units of each output hook (what :meth:`decoder_directions`
        writes); ``raw=False``: in the units of :meth:`decoder_norm` (whose square is the sum over
        targets of the squares).
        """
        n_layers, n_feat = self.config.n_layers, self.config.n_features
        out = torch.zeros(n_layers, n_feat, n_layers, dtype=self.b_D.dtype, device=self.b_D.device)
        factors = self._raw_output_factors() if raw else self.target_norm_factors.to(self.b_D.dtype).tolist()
        with torch.no_grad():
            for j, w in enumerate(self.W_D):
                out[: j + 1, :, j] = w.norm(dim=-1) * factors[j]
        return out

    # --- initialisation -------------------------------------------------------------------------------

    @staticmethod
    def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        # Drawn on the CPU in float32 whatever the parameters' device and dtype, so that one seed
        # gives the same initial dictionary everywhere.
        return torch.empty(shape, dtype=torch.float32).uniform_(-1.0, 1.0, generator=generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter, seeded through ``generator``.

        - decoders: random directions; every feature starts with combined decoder norm 1, split
          evenly over the L - i layers it writes to (each block norm ``1/sqrt(L - i)``), or, with
          ``init_cross_layer_decoders_zero``, all of it on its own layer (cross-layer blocks 0);
        - ``W_E``: random unit-norm columns (an input width may differ from the output width);
        - ``b_E``, ``b_D`` = 0; JumpReLU ``log_threshold`` = log(jumprelu_init_threshold);
        - ``target_norm_factors`` = 1 (a fresh dictionary lives in normalised units).
        """
        cfg = self.config
        n_layers = cfg.n_layers
        for j, w in enumerate(self.W_D):
            block = self._uniform(tuple(w.shape), generator)
            block = block / block.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            scale = torch.tensor([1.0 / math.sqrt(n_layers - i) for i in range(j + 1)])
            if cfg.init_cross_layer_decoders_zero:
                scale = torch.tensor([1.0 if i == j else 0.0 for i in range(j + 1)])
            w.copy_(block * scale[:, None, None])
        w_e = self._uniform(tuple(self.W_E.shape), generator)
        self.W_E.copy_(w_e / w_e.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.b_E.zero_()
        self.b_D.zero_()
        self.target_norm_factors.fill_(1.0)
        if isinstance(self.activation, JumpReLU):
            self.activation.log_threshold.fill_(math.log(cfg.jumprelu_init_threshold))

    # capabilities used by lmsae.training.initializer

    @torch.no_grad()
    def set_decoder_norm(self, value: float) -> None:
        """Scale every feature's decoders (all its target layers together) to combined norm ``value``."""
        if not (value > 0 and math.isfinite(value)):
            raise LmsaeError(f"decoder norm must be a finite number > 0, got {value!r}")
        factor = value / self.decoder_norm().clamp_min(1e-12)  # (L, F)
        for j, w in enumerate(self.W_D):
            w.mul_(factor[: j + 1, :, None])

    @torch.no_grad()
    def init_encoder_from_decoder(self, factor: float = 1.0) -> None:
        """``W_E[i] = W_D[i->i]^T · factor``: each encoder is the transpose of its same-layer decoder
        (needs d_out == d_model)."""
        if self.config.output_width != self.config.d_model:
            raise LmsaeError(
                f"cannot initialise the encoder from the decoder transpose: the CLT maps d_model={self.config.d_model} "
                f"to d_out={self.config.output_width}; set initializer.encoder_from_decoder = false")
        for i, w in enumerate(self.W_D):
            self.W_E[i].copy_(w[i].T * factor)

    @torch.no_grad()
    def init_decoder_bias(self, mean: Tensor) -> None:
        """Set ``b_D`` to ``mean`` (shape ``(L, d_out)``, e.g. the mean of the normalised labels)."""
        if tuple(mean.shape) != tuple(self.b_D.shape):
            raise ShapeError(f"decoder bias init: mean has shape {tuple(mean.shape)}, b_D has shape "
                             f"{tuple(self.b_D.shape)}")
        self.b_D.copy_(mean)

    @torch.no_grad()
    def init_encoder_bias_from_mean_pre(self, x: Tensor, mask: Tensor | None = None, **extras: Any) -> None:
        """Shift ``b_E`` so that the mean pre-activation of every (layer, feature) over the unmasked tokens is 0."""
        flat = self.encode_pre(x).reshape(-1, *self.b_E.shape)
        if mask is not None:
            flat = flat[mask.reshape(-1).to(flat.device) != 0]
        if flat.shape[0] == 0:
            raise LmsaeError("cannot initialise the encoder bias: the batch has no unmasked token")
        self.b_E.sub_(flat.mean(dim=0))

    # --- folding ------------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_scales(self, scales_in: Mapping[str, float], scales_out: Mapping[str, float]) -> None:
        """Rewrite the weights so the model takes raw activations (module docstring: h is unchanged).

        With s_i the scale of input layer i and t_j of output layer j:
        ``W_E[i] ← s_i·W_E[i]`` (so ``x_raw W_E' = (s_i x_raw) W_E``), ``W_D.<j> ← W_D.<j>/t_j``,
        ``b_D[j] ← b_D[j]/t_j``, ``c_j ← c_j·t_j`` (combined norms, gates and thresholds unchanged).
        """
        s = [float(scales_in[h]) for h in self.config.hooks_in]
        t = [float(scales_out[h]) for h in self.config.hooks_out]
        bad = [v for v in (*s, *t) if not (v > 0 and math.isfinite(v))]
        if bad:
            raise LmsaeError(f"fold_scales: scales must be finite and > 0, got {bad}")
        dtype = self.W_E.dtype
        self.W_E.mul_(torch.tensor(s, dtype=dtype, device=self.W_E.device)[:, None, None])
        t_tensor = torch.tensor(t, dtype=dtype, device=self.b_D.device)
        for j, w in enumerate(self.W_D):
            w.div_(t[j])
        self.b_D.div_(t_tensor[:, None])
        self.target_norm_factors.mul_(t_tensor.to(self.target_norm_factors.dtype))

    def output_scale(self, scales: Mapping[str, Tensor]) -> Tensor:
        """The output hooks' scales stacked on the layers axis: ``(L, 1)``, or ``(tokens..., L, 1)``
        for token-wise normalisation."""
        per_hook = [scales[h] if scales[h].ndim else scales[h].reshape(1) for h in self.config.hooks_out]
        return torch.stack(torch.broadcast_tensors(*per_hook), dim=-2)

    def _raw_output_factors(self) -> list[float]:
        """Per target layer: the factor that turns normalised decoder rows into raw-space write directions."""
        cfg = self.config
        out = []
        for h in cfg.hooks_out:
            if cfg.normalization == "dataset" and h in cfg.dataset_norms:
                out.append(cfg.dataset_norms[h] / math.sqrt(cfg.output_width))
            else:
                out.append(1.0)
        return out

    # --- evaluation and analysis ----------------------------------------------------------------------

    def split_output(self, reconstruction: Tensor) -> dict[str, Tensor]:
        """``{hook_points_out[j]: reconstruction[..., j, :]}``."""
        return {h: reconstruction[..., j, :] for j, h in enumerate(self.config.hooks_out)}

    def reconstruct_hooks(self, inputs: Mapping[str, Tensor], mask: Tensor | None = None) -> dict[str, Tensor]:
        """Raw-space predictions of the outputs that the given inputs determine.

        Output j depends only on the inputs of layers 0..j (features of layer i read only x_i, and
        decoders only go forward), so when the inputs of layers p, p+1, ... are missing — as at
        ``hook_points_out[j]`` during a closed-loop splice, where later layers have not run yet — they
        are zero-filled and only the outputs 0..p-1 are returned (zero-filling cannot change them).

        The across-layer TopK variants (``layertopk``, ``batchlayertopk``) select features of every
        layer jointly, so no output is determined until every input is there: with missing inputs
        they return ``{}`` (a closed-loop splice then reports that the outputs come too early and
        suggests ``mode = "per_hook"``; ``lmsae clt to-jumprelu`` gives a CLT that splices in closed
        loop). Raises :class:`DataError` when layer 0's input is missing.
        """
        hooks_in = self.config.hooks_in
        present = 0
        while present < len(hooks_in) and hooks_in[present] in inputs:
            present += 1
        if present == len(hooks_in):
            return super().reconstruct_hooks(inputs, mask)
        if present == 0:
            raise DataError(f"{type(self).__name__} needs the activations of {hooks_in[0]!r} (layer 0) to predict "
                            "any of its outputs")
        if self.config.act_fn in ACROSS_LAYER_ACT_FNS:
            return {}
        ref = inputs[hooks_in[0]]
        filled = dict(inputs)
        for h in hooks_in[present:]:
            filled[h] = torch.zeros(*ref.shape[:-1], self.config.d_model, dtype=ref.dtype, device=ref.device)
        predictions = super().reconstruct_hooks(filled, mask)
        return {h: predictions[h] for h in self.config.hooks_out[:present]}

    def analysis_activations(self, feature_acts: Tensor, x: Tensor) -> Tensor:
        """``(tokens..., L, F)`` -> ``(tokens..., L·F)``: feature f of layer i is column ``i·F + f``."""
        return feature_acts.flatten(-2)

    def decoder_directions(self) -> dict[str, Tensor]:
        """Raw-space write directions per output hook, ``{hooks_out[j]: (L·F, o)}`` in the layer-major
        feature order; rows of source layers i > j are zero (those features do not write there)."""
        n_layers, n_feat = self.config.n_layers, self.config.n_features
        factors = self._raw_output_factors()
        out = {}
        for j, (h, w) in enumerate(zip(self.config.hooks_out, self.W_D, strict=True)):
            d = torch.zeros(n_layers * n_feat, w.shape[-1], dtype=w.dtype, device=w.device)
            d[: (j + 1) * n_feat] = w.detach().reshape(-1, w.shape[-1]) * factors[j]
            out[h] = d
        return out

    def feature_layer(self, feature_index: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Source layer of layer-major feature indices (``index // d_sae``)."""
        idx = np.asarray(feature_index, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_features):
            raise LmsaeError(f"feature indices must lie in [0, {self.n_features}) (L·d_sae, layer-major)")
        return idx // self.config.n_features

    @torch.no_grad()
    def training_metrics(self, ctx: Mapping[str, Any]) -> dict[str, float]:
        """Per-layer metrics of the last batch: ``metrics/explained_variance/<hooks_out[j]>`` and
        ``metrics/l0/layer<i>`` (masked tokens excluded)."""
        acts = flatten_tokens(ctx["acts"].detach(), ctx["feature_axes"], ctx["mask"])  # (n, L, F)
        y = flatten_tokens(ctx["label"].detach(), ctx["output_axes"], ctx["mask"]).double()  # (n, L, o)
        y_hat = flatten_tokens(ctx["recon"].detach(), ctx["output_axes"], ctx["mask"]).double()
        out: dict[str, float] = {}
        if acts.shape[0] == 0:
            return out
        l0 = (acts > 0).sum(-1).double().mean(0)  # (L,)
        err = (y_hat - y).square().sum(dim=(0, 2))  # (L,)
        var = (y - y.mean(0, keepdim=True)).square().sum(dim=(0, 2))
        for j, h in enumerate(self.config.hooks_out):
            if y.shape[0] > 1:
                out[f"metrics/explained_variance/{h}"] = float(1 - err[j] / var[j].clamp_min(1e-30))
        for i in range(self.config.n_layers):
            out[f"metrics/l0/layer{i}"] = float(l0[i])
        return out


def _get(batch: Mapping[str, Any], hook: str) -> Tensor:
    try:
        return batch[hook]
    except KeyError:
        keys = sorted(k for k in batch if k not in ("mask", "tokens", "meta"))
        raise DataError(f"the activation stream has no hook point {hook!r} (the CLT needs it); it provides: "
                        f"{keys}") from None


# --- the architecture record ------------------------------------------------------------------------


def clt_sharding_rules(config: CLTConfig) -> dict[str, dict[str, int]]:
    """Tensor-parallel layout: every feature axis is split over the 'model' mesh axis.

    ``W_E`` (L, d, F) on dim 2, ``b_E`` (L, F) on dim 1, each ``W_D.<j>`` (j+1, F, o) on dim 1,
    the JumpReLU ``log_threshold`` (L, F) on its last dim: shard i of k holds features
    ``[i F/k, (i+1) F/k)`` of EVERY layer, with all their decoders, so a shard is a CLT of
    ``d_sae / k`` features per layer (:func:`clt_shard_config`). ``b_D`` is replicated (the first
    'model' rank adds it: :meth:`CrossLayerTranscoder.decode` there,
    :meth:`~CrossLayerTranscoder.decode_linear` on the others), and so is the buffer
    ``target_norm_factors`` (one factor per target layer; it needs no rule).
    """
    rules: dict[str, dict[str, int]] = {"W_E": {"model": 2}, "b_E": {"model": 1}, "b_D": {}}
    for j in range(config.n_layers):
        rules[f"W_D.{j}"] = {"model": 1}
    if config.act_fn == "jumprelu":
        rules["activation.log_threshold"] = {"model": 1}
    return rules


def clt_shard_config(config: CLTConfig, counts: Mapping[str, int]) -> CLTConfig:
    """The config of one feature shard: ``d_sae // counts["model"]`` features per layer.

    Only the 'model' axis splits a CLT; any other axis of size > 1 raises
    :class:`~lmsae.errors.ShardingError`, as does a ``d_sae`` that ``model`` does not divide.
    """
    extra = sorted(a for a, n in counts.items() if a != "model" and int(n) > 1)
    if extra:
        raise ShardingError(f"the CLT has no {extra[0]!r} axis to split (its features split over 'model' only); "
                            f"set [distributed] {extra[0]} = 1")
    k = int(counts.get("model", 1))
    n = config.n_features
    if k < 1 or n % k:
        raise ShardingError(f"d_sae = {n} features per layer do not split into {k} equal shards "
                            f"([distributed] model = {k}); choose d_sae divisible by {k}")
    return attrs.evolve(config, d_sae=n // k, expansion_factor=None)


def clt_example_config() -> CLTConfig:
    """A small 3-layer TopK CLT (16 dims, 32 features per layer, k = 4 per layer)."""
    return CLTConfig(hook_points_in=[f"blocks.{i}.ln2.hook_normalized" for i in range(3)],
                     hook_points_out=[f"blocks.{i}.hook_mlp_out" for i in range(3)],
                     d_model=16, d_sae=32, act_fn="topk", top_k=4)


def clt_analysis_extras(model: CrossLayerTranscoder, feature_indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Per analysed feature (layer-major indices ``i·d_sae + f``):

    - ``source_layer`` ``(n,)``: the layer i whose input the feature reads;
    - ``decoder_norm_by_layer`` ``(n, L)``: raw-space norm of its decoder into each target layer
      (0 for targets before its own layer).
    """
    idx = np.asarray(feature_indices, dtype=np.int64)
    layer = model.feature_layer(idx)
    feat = idx % model.config.n_features
    norms = model.target_decoder_norms(raw=True).cpu().double().numpy()  # (L, F, L)
    return {"source_layer": layer, "decoder_norm_by_layer": norms[layer, feat]}


CLT_SPEC = ArchitectureSpec(
    config_class=CLTConfig,
    model_class=CrossLayerTranscoder,
    sharding_rules=clt_sharding_rules,
    example_config=clt_example_config,
    summary="cross-layer transcoder (ReLU, JumpReLU, per-layer / across-layer / batch TopK)",
    analysis_extras=clt_analysis_extras,
    shard_config=clt_shard_config,
)
