"""The crosscoder: one sparse code shared by H heads, each with its own encoder and decoder.

With x_h the (normalised) activations of head h (one hook point, layer or model), shapes
``(tokens..., d)``::

    h   = sum_h x_h W_E[h] + b_E          shared pre-activation, (tokens..., F)
    f   = act(h)                           or act(h * n) / n with decoder-norm gating
    y_h = f W_D[h] + b_D[h]                per-head reconstruction, (tokens..., d)

    n_i = sum_h g_h ||W_D[h, i]||          combined decoder norm of feature i, (F,)

Tensors stack the heads on axis -2: input and output ``(tokens..., heads, d_model)``, features
``(tokens..., sae)``. ``n`` is :meth:`Crosscoder.decoder_norm`, so the core's
decoder-norm-weighted L1 penalty is the crosscoder penalty of Anthropic's "Sparse crosscoders"
(sum_i f_i sum_h ||W_D[h, i]||), and the reconstruction loss sums the squared errors of all heads.

``g`` (buffer ``head_norm_weight``, (H,), 1 during training) makes folding exact: dataset-wise
normalisation multiplies head h by its own factor s_h, and folding divides W_D[h] by s_h; without
``g`` the combined norm (hence the gate, the JumpReLU comparison and the penalty) would change
non-uniformly across heads. Folding multiplies g_h by s_h instead, so n, the gate and the
features are exactly unchanged (the reference implementation rescaled the biases only, which is
exact only when all heads share one factor).

Distributed (see the README): under feature parallelism (mesh axis ``model``) a shard holds a
block of the features of every head and nothing here changes (the core's TopK/BatchTopK select
globally, the trainer sums the partial reconstructions). Under head parallelism (``head``) a
shard holds a block of the heads; while :func:`lmsae.distributed.parallel.current` has a head
group, :meth:`Crosscoder.encode_pre` sums the heads' partial pre-activations over it (``b_E``
added by the first head rank only), :meth:`Crosscoder.decoder_norm` sums the heads' norms over
it, and :meth:`Crosscoder.decode` receives the (replicated) code through ``copy_to_group``, whose
backward sums the code's gradient from every rank's heads. The code, the combined norm and every
loss term built from them are then identical on all head ranks, and so are their gradients; a
head-replicated parameter used only there (the JumpReLU threshold) keeps its gradient on the
first head rank only, since the trainer sums head-replicated gradients over the head group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lmsae.dictionary.base import SparseDictionary
from lmsae.distributed.collectives import copy_to_group, reduce_sum
from lmsae.distributed.parallel import ParallelContext, current
from lmsae.errors import DataError, LmsaeError, ShapeError
from lmsae.nn.activations import JumpReLU, apply_with_decoder_norm_gating, build_activation
from lmsae.nn.axes import flatten_tokens

from lmsae_crosscoder.config import CrosscoderConfig

__all__ = ["Crosscoder", "HeadSharedJumpReLU"]


def _head_parallel() -> ParallelContext | None:
    """The running distributed forward pass when it splits the heads (else None)."""
    ctx = current()
    return ctx if ctx is not None and ctx.head_group is not None else None


class HeadSharedJumpReLU(JumpReLU):
    """JumpReLU whose threshold is shared by all head ranks of a head-parallel crosscoder.

    The threshold is replicated along ``head`` (its rule splits it over ``model`` only) and every
    head rank applies it to the same summed pre-activations, so every head rank computes the
    FULL gradient of the loss with respect to it (the code's gradient is summed over the head
    group by ``copy_to_group``, and the feature-summed loss terms are replicated). The trainer sums
    head-replicated gradients over the head group, so only the first head rank may keep it: on the
    others :attr:`threshold` is detached (same values). Identical to :class:`JumpReLU` outside
    head parallelism.
    """

    @property
    def threshold(self) -> Tensor:
        theta = self.log_threshold.exp()
        ctx = _head_parallel()
        if ctx is not None and not ctx.first("head"):
            return theta.detach()
        return theta


class Crosscoder(SparseDictionary):
    """Crosscoder over ``config.hook_points`` (H heads). Parameters (F = d_sae, d = d_model):

    - ``W_E`` (H, d, F): per-head encoders; ``b_E`` (F,): ONE encoder bias (per-head encoder biases
      would only add up, so they are merged);
    - ``W_D`` (H, F, d): per-head decoders; ``b_D`` (H, d): per-head decoder biases;
    - ``activation.log_threshold`` (F,) with ``act_fn = "jumprelu"`` (one threshold per feature of
      the shared code).

    Buffer ``head_norm_weight`` (H,): weight g_h of head h's decoder norm in the combined norm (1
    unless the model was folded; see the module docstring). It is saved with the weights.
    """

    input_dims = ("heads", "d_model")
    feature_dims = ("sae",)
    output_dims = ("heads", "d_model")

    config: CrosscoderConfig

    def __init__(self, config: CrosscoderConfig):
        super().__init__(config)
        n_heads, d, f = config.n_heads, config.d_model, config.n_features
        self.W_E = nn.Parameter(torch.empty(n_heads, d, f))
        self.b_E = nn.Parameter(torch.empty(f))
        self.W_D = nn.Parameter(torch.empty(n_heads, f, d))
        self.b_D = nn.Parameter(torch.empty(n_heads, d))
        self.register_buffer("head_norm_weight", torch.ones(n_heads))
        if config.act_fn == "jumprelu":
            self.activation = HeadSharedJumpReLU(f, config.jumprelu_init_threshold, config.jumprelu_bandwidth)
        else:
            self.activation = build_activation(config.act_fn, k=config.top_k, shape=f,
                                               init_threshold=config.jumprelu_init_threshold,
                                               bandwidth=config.jumprelu_bandwidth)
        self.reset_parameters()

    @property
    def n_heads(self) -> int:
        return self.config.n_heads

    # --- what the dictionary reads and predicts ---------------------------------------------------

    def _stack(self, batch: Mapping[str, Any]) -> Tensor:
        tensors = []
        for hook in self.config.hook_points:
            if hook not in batch:
                keys = sorted(k for k in batch if k not in ("mask", "tokens", "meta"))
                raise DataError(f"the activation stream has no key {hook!r} (a head of this crosscoder); it "
                                f"provides: {keys}")
            tensors.append(batch[hook])
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            detail = ", ".join(f"{h}: {tuple(t.shape)}" for h, t in zip(self.config.hook_points, tensors))
            raise DataError(f"the heads of a crosscoder must have activations of one shape; got {detail}")
        return torch.stack(tensors, dim=-2)

    def prepare_input(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Every head's activations stacked on axis -2: ``(tokens..., heads, d_model)``.

        Heads are read by key, so a head-parallel shard (whose ``hook_points`` are its own heads)
        takes its heads from a batch that holds every head's activations or only its own."""
        return self._stack(batch), {}

    def prepare_label(self, batch: Mapping[str, Any]) -> Tensor:
        """The same stack as the input (each head reconstructs what it reads)."""
        return self._stack(batch)

    def hook_dims(self) -> dict[str, int]:
        return {hook: self.config.d_model for hook in self.config.hook_points}

    # --- maths ------------------------------------------------------------------------------------

    def encode_pre(self, x: Tensor, **extras: Any) -> Tensor:
        """Shared pre-activations ``(tokens..., F)`` = sum over heads of ``x_h W_E[h]``, plus ``b_E``.

        Head-parallel (a head group in the parallel context): this shard's heads' partial sum,
        plus ``b_E`` on the first head rank only, summed over the head group."""
        if tuple(x.shape[-2:]) != (self.n_heads, self.config.d_model):
            raise ShapeError(f"crosscoder input must end with (heads, d_model) = ({self.n_heads}, "
                             f"{self.config.d_model}), got shape {tuple(x.shape)}")
        partial = torch.einsum("...hd,hdf->...f", x, self.W_E)
        ctx = _head_parallel()
        if ctx is None:
            return partial + self.b_E
        if ctx.first("head"):
            partial = partial + self.b_E
        return reduce_sum(partial, ctx.head_group)

    def activate(self, hidden_pre: Tensor, mask: Tensor | None = None) -> Tensor:
        """The shared code ``(tokens..., F)``; gated by the combined decoder norm when configured.

        ``mask`` has the shape of the token axes, ``(batch,)`` or ``(batch, context)``;
        BatchTopK leaves masked tokens out of its selection, the others ignore it.
        """
        if self.config.decoder_norm_gating:
            return apply_with_decoder_norm_gating(self.activation, hidden_pre, self.decoder_norm(), mask)
        return self.activation(hidden_pre, mask=mask)

    def decode(self, feature_acts: Tensor, **extras: Any) -> Tensor:
        """Per-head reconstructions ``(tokens..., heads, d_model)`` from the code ``(tokens..., F)``
        (a head-parallel shard: its own heads')."""
        return self.decode_linear(feature_acts) + self.b_D

    def decode_linear(self, feature_acts: Tensor, **extras: Any) -> Tensor:
        """:meth:`decode` without the decoder biases: ``f W_D[h]`` per head.

        Head-parallel: the code enters through ``copy_to_group`` over the head group, so its
        gradient is the sum over every rank's heads."""
        ctx = _head_parallel()
        if ctx is not None:
            feature_acts = copy_to_group(feature_acts, ctx.head_group)
        return torch.einsum("...f,hfd->...hd", feature_acts, self.W_D)

    def head_decoder_norms(self) -> Tensor:
        """``g_h ||W_D[h, i]||`` per head and feature, ``(H, F)``, in normalised (training) units:
        the same before and after folding."""
        return self.W_D.norm(dim=-1) * self.head_norm_weight.unsqueeze(-1)

    def decoder_norm(self) -> Tensor:
        """Combined decoder norm ``n_i = sum_h g_h ||W_D[h, i]||``, ``(F,)`` (differentiable).

        Head-parallel: the shard's heads' sum, summed over the head group (every head rank gets
        the full norm; each shard's decoders receive the gradient of their own terms)."""
        local = self.head_decoder_norms().sum(dim=0)
        ctx = _head_parallel()
        return local if ctx is None else reduce_sum(local, ctx.head_group)

    def decoder_directions(self) -> dict[str, Tensor]:
        """Each feature's write direction in raw space per head, ``{hook: (F, d_model)}``.

        The code keeps its (normalised) units after folding, so the raw direction of head h is
        ``W_D[h] / s_h`` while dataset-wise normalisation is not folded, and ``W_D[h]`` after.
        """
        out: dict[str, Tensor] = {}
        for i, hook in enumerate(self.config.hook_points):
            scale = 1.0
            if self.config.normalization == "dataset" and hook in self.config.dataset_norms:
                scale = math.sqrt(self.config.d_model) / self.config.dataset_norms[hook]
            out[hook] = self.W_D[i].detach() / scale
        return out

    def encoder_norm(self) -> Tensor:
        """L2 norm of each head's encoder column, ``(H, F)``."""
        return self.W_E.norm(dim=1)

    # --- normalisation, folding, evaluation -------------------------------------------------------

    def output_scale(self, scales: Mapping[str, Tensor]) -> Tensor:
        """Per-head scales stacked on the head axis: ``(H, 1)`` for per-hook scalars,
        ``(tokens..., H, 1)`` for token-wise normalisation."""
        parts = torch.broadcast_tensors(*(scales[h] for h in self.config.hook_points))
        if parts[0].ndim == 0:
            return torch.stack(parts).unsqueeze(-1)
        return torch.stack(parts, dim=-2)

    def split_output(self, reconstruction: Tensor) -> dict[str, Tensor]:
        """``{hook: (tokens..., d_model)}``: each head's slice of ``(tokens..., heads, d_model)``."""
        return {hook: reconstruction[..., i, :] for i, hook in enumerate(self.config.hook_points)}

    def reconstruct_hooks(self, inputs: Mapping[str, Tensor], mask: Tensor | None = None) -> dict[str, Tensor]:
        """Raw-space reconstruction of every head from raw activations of ALL heads.

        Unlike a cross-layer transcoder, no head can be computed from a subset of the inputs: the
        shared code sums every head's encoding. To splice head h into a language model, capture
        all ``hook_points`` from one clean forward pass, call this, and replace head h only; the
        later heads' inputs therefore stay clean (what ``mode = "per_hook"`` measures).
        """
        missing = [h for h in self.config.hook_points if h not in inputs]
        if missing:
            raise DataError(f"a crosscoder reconstructs each head from the activations of all its heads "
                            f"{list(self.config.hook_points)} (the shared code sums them); missing {missing}. "
                            "Capture every head from one clean forward pass first.")
        batch: dict[str, Any] = {h: inputs[h] for h in self.config.hook_points}
        if mask is not None:
            batch["mask"] = mask
        return self.split_output(self.forward_raw(batch))

    @torch.no_grad()
    def fold_scales(self, scales_in: Mapping[str, float], scales_out: Mapping[str, float]) -> None:
        """Rewrite the weights so the model takes raw activations (see the base class).

        Head h is normalised by s_h on the way in and t_h on the way out (s_h = t_h for a
        crosscoder; kept apart for clarity). The shared code keeps its values exactly:

        - ``W_E[h] <- s_h W_E[h]``, ``b_E`` unchanged: the pre-activation of raw x equals the old
          pre-activation of s_h x, so TopK/BatchTopK selections and JumpReLU comparisons are
          unchanged and thresholds need no rescaling;
        - ``W_D[h] <- W_D[h] / t_h``, ``b_D[h] <- b_D[h] / t_h``: raw-space reconstructions;
        - ``g_h <- g_h t_h``: each term ``g_h ||W_D[h, i]||`` of the combined norm is unchanged,
          so the decoder-norm gate, the penalty weights and the JumpReLU gate are invariant even
          though the heads' factors differ.
        """
        hooks = list(self.config.hook_points)
        s = torch.tensor([float(scales_in[h]) for h in hooks], dtype=torch.float64)
        t = torch.tensor([float(scales_out[h]) for h in hooks], dtype=torch.float64)
        if not bool(((s > 0) & (t > 0) & s.isfinite() & t.isfinite()).all()):
            raise LmsaeError(f"fold_scales: scales must be finite and > 0, got s_in={s.tolist()}, "
                             f"s_out={t.tolist()}")
        dev = self.W_E.device
        s_e = s.to(device=dev, dtype=self.W_E.dtype)
        t_d = t.to(device=dev, dtype=self.W_D.dtype)
        self.W_E.mul_(s_e.view(-1, 1, 1))
        self.W_D.div_(t_d.view(-1, 1, 1))
        self.b_D.div_(t_d.view(-1, 1))
        self.head_norm_weight.mul_(t.to(device=dev, dtype=self.head_norm_weight.dtype))

    # --- initialisation ---------------------------------------------------------------------------

    @staticmethod
    def _unit_rows(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        # Drawn on the CPU in float32 whatever the parameters' device and dtype, so that one seed
        # gives the same initial dictionary everywhere (as the SAE does).
        w = torch.empty(shape, dtype=torch.float32).uniform_(-1.0, 1.0, generator=generator)
        return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter, seeded through ``generator``.

        - ``W_D[h]``: rows drawn U(-1, 1) and scaled to unit L2 norm (every head of every feature
          starts with norm 1, combined norm H); with ``init = "identical"`` one draw is copied to
          all heads, with ``"independent"`` each head has its own draw;
        - ``W_E[h] = W_D[h]^T / H`` (see :meth:`init_encoder_from_decoder`); ``b_E``, ``b_D`` = 0;
          ``head_norm_weight`` = 1;
        - JumpReLU ``log_threshold`` = log(jumprelu_init_threshold).
        """
        cfg = self.config
        n_heads, d, f = cfg.n_heads, cfg.d_model, cfg.n_features
        if cfg.init == "identical":
            w_d = self._unit_rows((f, d), generator).expand(n_heads, f, d)
        else:
            w_d = self._unit_rows((n_heads, f, d), generator)
        self.W_D.copy_(w_d)
        self.init_encoder_from_decoder(1.0)
        self.b_E.zero_()
        self.b_D.zero_()
        self.head_norm_weight.fill_(1.0)
        if isinstance(self.activation, JumpReLU):
            self.activation.log_threshold.fill_(math.log(cfg.jumprelu_init_threshold))

    # --- capabilities used by lmsae.training.initializer ------------------------------------------

    @torch.no_grad()
    def set_decoder_norm(self, value: float) -> None:
        """Scale every head's decoder row to L2 norm ``value`` exactly (combined norm ``H * value``,
        in units where ``head_norm_weight`` is 1)."""
        if not (value > 0 and math.isfinite(value)):
            raise LmsaeError(f"decoder norm must be a finite number > 0, got {value!r}")
        self.W_D.mul_(value / self.W_D.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def init_encoder_from_decoder(self, factor: float = 1.0) -> None:
        """``W_E[h] = W_D[h]^T * factor / H`` for every head.

        The 1/H keeps the summed pre-activation on the scale of one head's: a crosscoder fed H
        copies of the same activations starts exactly as an SAE with ``W_E = W_D^T`` would
        (without it, correlated heads such as adjacent layers start with codes and
        reconstructions about H times too large).
        """
        self.W_E.copy_(self.W_D.transpose(-1, -2) * (factor / self.n_heads))

    @torch.no_grad()
    def init_decoder_bias(self, mean: Tensor) -> None:
        """Set ``b_D`` to ``mean`` of shape ``(H, d_model)`` (e.g. each head's mean label)."""
        if tuple(mean.shape) != tuple(self.b_D.shape):
            raise ShapeError(f"decoder bias init: mean has shape {tuple(mean.shape)}, b_D has shape "
                             f"{tuple(self.b_D.shape)} (heads, d_model)")
        self.b_D.copy_(mean)

    @torch.no_grad()
    def init_encoder_bias_from_mean_pre(self, x: Tensor, mask: Tensor | None = None, **extras: Any) -> None:
        """Shift ``b_E`` so that the mean shared pre-activation over the unmasked tokens of ``x`` is 0."""
        pre = self.encode_pre(x)
        flat = pre.reshape(-1, pre.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1).to(flat.device) != 0]
        if flat.shape[0] == 0:
            raise LmsaeError("cannot initialise the encoder bias: the batch has no unmasked token")
        self.b_E.sub_(flat.mean(dim=0))

    @torch.no_grad()
    def init_active_subspace(self, label: Tensor, d: int, mask: Tensor | None = None) -> None:
        """Put each head's decoder rows inside the top-``d`` principal subspace of that head's labels.

        ``label`` is ``(tokens..., heads, d_model)``; per head the de-meaned labels are decomposed
        by SVD and row i becomes ``W_D[h, i, :d] @ V_d`` (random coefficients on the d leading
        right-singular vectors), scaled to unit norm.
        """
        n_heads, width = self.n_heads, self.config.d_model
        if tuple(label.shape[-2:]) != (n_heads, width):
            raise ShapeError(f"active subspace init: labels must end with (heads, d_model) = ({n_heads}, {width}), "
                             f"got {tuple(label.shape)}")
        flat = label.reshape(-1, n_heads, width)
        if mask is not None:
            flat = flat[mask.reshape(-1).to(flat.device) != 0]
        limit = min(width, flat.shape[0])
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= limit:
            raise LmsaeError(f"active subspace dimension must be an integer in [1, {limit}] "
                             f"(min of d_model={width} and {flat.shape[0]} tokens), got {d!r}")
        for head in range(n_heads):
            y = flat[:, head, :].to(torch.float64)
            _, _, vh = torch.linalg.svd(y - y.mean(dim=0), full_matrices=False)
            rows = self.W_D[head, :, :d] @ vh[:d].to(self.W_D.dtype)
            self.W_D[head].copy_(rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    # --- metrics ----------------------------------------------------------------------------------

    @torch.no_grad()
    def training_metrics(self, ctx: Mapping[str, Any]) -> dict[str, float]:
        """Per-head metrics of the last training batch (normalised space, masked tokens excluded):

        - ``metrics/explained_variance/<hook>``: ``1 - sum_t ||y_hat - y||^2 / sum_t ||y - mean(y)||^2``;
        - ``metrics/mse/<hook>``: mean ``||y_hat - y||^2``; ``metrics/l2_norm_error/<hook>``: mean
          ``||y_hat - y||``;
        - ``metrics/decoder_norm/<hook>``: mean over features of ``g_h ||W_D[h, i]||``.

        L0 is the shared code's (the core's ``metrics/l0``): every head reads the same features.
        """
        axes = ctx["output_axes"]
        mask = ctx.get("mask")
        y = flatten_tokens(ctx["label"].detach(), axes, mask).double()  # (n, H, d)
        y_hat = flatten_tokens(ctx["recon"].detach(), axes, mask).double()
        out: dict[str, float] = {}
        norms = self.head_decoder_norms().mean(dim=-1)
        for i, hook in enumerate(self.config.hook_points):
            out[f"metrics/decoder_norm/{hook}"] = float(norms[i])
            if y.shape[0] == 0:
                continue
            err = (y_hat[:, i] - y[:, i]).pow(2).sum(-1)
            var = (y[:, i] - y[:, i].mean(0, keepdim=True)).pow(2).sum(-1).sum()
            if y.shape[0] > 1:
                out[f"metrics/explained_variance/{hook}"] = float(1 - err.sum() / var.clamp_min(1e-30))
            out[f"metrics/mse/{hook}"] = float(err.mean())
            out[f"metrics/l2_norm_error/{hook}"] = float(err.sqrt().mean())
        return out
