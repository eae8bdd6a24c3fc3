"""The built-in sparse autoencoder and (per-layer) transcoder.

One hook point in, one hook point out::

    x' = x - b_D                     (only with apply_decoder_bias_to_input)
    h  = x' W_E + b_E                (pre-activations, (..., d_sae))
    h  = h * sigmoid(x' W_G + b_G)   (only with use_glu_encoder)
    f  = act(h)                      or act(h * n) / n with decoder-norm gating, n_i = ||W_D[i]||
    y  = f W_D + b_D                 (b_D only with use_decoder_bias)

An SAE reconstructs its input hook (``hook_point_out`` unset); a transcoder predicts another
hook point (``hook_point_out`` set), possibly of another width (``d_out``).

Weights live in normalised space (see :class:`lmsae.dictionary.base.SparseDictionary`);
:meth:`SparseAutoEncoder.fold_scales` rewrites them exactly for raw activations, JumpReLU
thresholds, GLU gates, decoder-norm gating and the input-side decoder bias included.

``SAE_SPEC`` is the architecture record; it is registered by the core plugin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmsae.config.base import DictionaryConfig
from lmsae.config.fields import FieldValueError, config_class, non_empty, option, positive
from lmsae.dictionary.base import SparseDictionary
from lmsae.errors import LmsaeError, ShapeError, ShardingError
from lmsae.nn.activations import JumpReLU, apply_with_decoder_norm_gating, build_activation
from lmsae.records import ArchitectureSpec

__all__ = [
    "SAE_SPEC",
    "SAEConfig",
    "SparseAutoEncoder",
    "sae_example_config",
    "sae_shard_config",
    "sae_sharding_rules",
]

ActFn = Literal["relu", "jumprelu", "topk", "batchtopk"]

#: expansion factor used when neither ``d_sae`` nor ``expansion_factor`` is given
DEFAULT_EXPANSION_FACTOR = 8.0


def _finite_positive(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not (value > 0 and math.isfinite(value)):
        raise FieldValueError(attribute.name, f"must be a finite number > 0, got {value!r}")


def _default_expansion_factor(self: Any) -> float | None:
    # An explicit d_sae alone must not clash with a default expansion factor; TOML has no null,
    # so "unset" has to be the default whenever d_sae is given.
    return None if self.d_sae is not None else DEFAULT_EXPANSION_FACTOR


@config_class
class SAEConfig(DictionaryConfig):
    """A sparse autoencoder (``hook_point_out`` unset) or a transcoder (``hook_point_out`` set)."""

    name: ClassVar[str] = "sae"

    hook_point_in: str = option(
        doc="Hook point whose activations are encoded, e.g. 'blocks.6.hook_resid_post'.",
        validator=non_empty())
    hook_point_out: str | None = option(
        None,
        doc="Hook point the dictionary predicts. Unset: an SAE reconstructing hook_point_in. Set to another "
            "hook point: a transcoder, e.g. 'blocks.6.ln2.hook_normalized' -> 'blocks.6.hook_mlp_out'.",
        validator=non_empty())
    d_model: int = option(doc="Width of the input activations (last dimension of hook_point_in).",
                          validator=positive())
    d_out: int | None = option(
        None,
        doc="Width of the predicted activations; defaults to d_model. Only a transcoder may predict a hook "
            "point of another width.",
        validator=positive())
    d_sae: int | None = option(
        None,
        doc="Number of features. When set it defines the dictionary size; expansion_factor must then be "
            "unset or agree with it (int(d_model * expansion_factor) == d_sae).",
        validator=positive())
    expansion_factor: float | None = option(
        attrs.Factory(_default_expansion_factor, takes_self=True),
        doc="Features per input dimension: d_sae = int(d_model * expansion_factor). Defaults to 8 when "
            "d_sae is unset, and to unset when d_sae is given.",
        validator=_finite_positive)
    act_fn: ActFn = option(
        "topk",
        doc="Sparse activation: 'relu'; 'jumprelu' (h * [h > theta], learnable per-feature threshold); "
            "'topk' (the top_k largest per token, after ReLU); 'batchtopk' (the top_k * n_tokens largest over "
            "the whole batch, after ReLU).")
    top_k: int = option(50, doc="k of 'topk' and 'batchtopk' (features kept per token, on average for "
                                "batchtopk). A trainer may schedule it.", validator=positive())
    jumprelu_init_threshold: float = option(
        0.01,
        doc="Initial JumpReLU threshold theta (> 0), in the units of the (normalised, and with "
            "decoder_norm_gating decoder-norm-scaled) pre-activations.",
        validator=_finite_positive)
    jumprelu_bandwidth: float = option(
        0.05,
        doc="Width epsilon (> 0) of the rectangle kernel of JumpReLU's straight-through threshold gradient. "
            "It is in normalised pre-activation units, i.e. on the same scale as the threshold: choose it "
            "relative to jumprelu_init_threshold. It only affects training gradients, never the forward pass.",
        validator=_finite_positive)
    decoder_norm_gating: bool = option(
        False,
        doc="Apply the activation to h * ||W_D[i]|| and divide the result back by ||W_D[i]||, so TopK "
            "selection and JumpReLU thresholds act on each feature's contribution to the output norm "
            "(sparsity_include_decoder_norm in the reference implementation).")
    use_decoder_bias: bool = option(True, doc="Learn a decoder bias b_D added to every prediction.")
    apply_decoder_bias_to_input: bool = option(
        False,
        doc="Subtract b_D from the input before encoding (SAELens' apply_b_dec_to_input). Needs "
            "use_decoder_bias and an input as wide as the output.")
    use_glu_encoder: bool = option(
        False,
        doc="Multiply the pre-activations by a learned gate sigmoid(x W_E_glu + b_E_glu) (GLU encoder).")

    def __attrs_post_init__(self) -> None:
        if self.d_sae is None and self.expansion_factor is None:
            raise FieldValueError("d_sae", "set d_sae or expansion_factor (both are unset)")
        if self.expansion_factor is not None:
            implied = int(self.d_model * self.expansion_factor)
            if self.d_sae is not None and implied != self.d_sae:
                raise FieldValueError(
                    "d_sae", f"{self.d_sae} disagrees with expansion_factor={self.expansion_factor} "
                             f"(int(d_model * expansion_factor) = int({self.d_model} * {self.expansion_factor}) "
                             f"= {implied}); set only one of them")
            if implied < 1:
                raise FieldValueError(
                    "expansion_factor", f"{self.expansion_factor} gives int({self.d_model} * "
                                        f"{self.expansion_factor}) = {implied} features; need at least 1")
        if self.d_out is not None and self.d_out != self.d_model and not self.is_transcoder:
            raise FieldValueError(
                "d_out", f"{self.d_out} differs from d_model={self.d_model}, but an SAE reconstructs its own "
                         "input (hook_point_out is unset or equal to hook_point_in); only a transcoder may "
                         "change width")
        if self.apply_decoder_bias_to_input:
            if not self.use_decoder_bias:
                raise FieldValueError("apply_decoder_bias_to_input",
                                      "needs use_decoder_bias = true (there is no decoder bias to subtract)")
            if self.output_width != self.d_model:
                raise FieldValueError(
                    "apply_decoder_bias_to_input",
                    f"the decoder bias has the output width d_out={self.output_width} and cannot be subtracted "
                    f"from an input of width d_model={self.d_model}")

    # --- what the dictionary reads and predicts -------------------------------------------------

    @property
    def is_transcoder(self) -> bool:
        """True when the predicted hook point differs from the input one."""
        return self.hook_point_out is not None and self.hook_point_out != self.hook_point_in

    @property
    def hooks_in(self) -> tuple[str, ...]:
        return (self.hook_point_in,)

    @property
    def hooks_out(self) -> tuple[str, ...]:
        return (self.hook_point_out or self.hook_point_in,)

    @property
    def output_width(self) -> int:
        """Width of the prediction: ``d_out`` if set, else ``d_model``."""
        return self.d_out if self.d_out is not None else self.d_model

    @property
    def n_features(self) -> int:
        if self.d_sae is not None:
            return self.d_sae
        return int(self.d_model * self.expansion_factor)  # type: ignore[operator]


class SparseAutoEncoder(SparseDictionary):
    """SAE / transcoder. Parameters (shapes with f = d_sae, d = d_model, o = d_out):

    - ``W_E`` (d, f), ``b_E`` (f,), ``W_D`` (f, o), ``b_D`` (o,) when ``use_decoder_bias``;
    - ``W_E_glu`` (d, f), ``b_E_glu`` (f,) with ``use_glu_encoder``;
    - ``activation.log_threshold`` (f,) with ``act_fn = "jumprelu"``.

    Decoder-norm gating uses the live decoder norm, NOT detached: the activations are
    ``act(h·n)/n``, whose derivative wrt n is zero wherever it is defined (ReLU, TopK and
    JumpReLU are positively homogeneous in the pass-through region), so the gate adds no spurious
    decoder gradient while staying exact under ``torch.func`` transforms and double backward.
    """

    config: SAEConfig

    def __init__(self, config: SAEConfig):
        super().__init__(config)
        d, f, o = config.d_model, config.n_features, config.output_width
        self.W_E = nn.Parameter(torch.empty(d, f))
        self.b_E = nn.Parameter(torch.empty(f))
        self.W_D = nn.Parameter(torch.empty(f, o))
        if config.use_decoder_bias:
            self.b_D = nn.Parameter(torch.empty(o))
        else:
            self.b_D = None
        if config.use_glu_encoder:
            self.W_E_glu = nn.Parameter(torch.empty(d, f))
            self.b_E_glu = nn.Parameter(torch.empty(f))
        else:
            self.W_E_glu = None
            self.b_E_glu = None
        self.activation = build_activation(config.act_fn, k=config.top_k, shape=f,
                                           init_threshold=config.jumprelu_init_threshold,
                                           bandwidth=config.jumprelu_bandwidth)
        self.reset_parameters()

    # --- maths ------------------------------------------------------------------------------------

    def _encoder_input(self, x: Tensor) -> Tensor:
        if self.config.apply_decoder_bias_to_input:
            return x - self.b_D
        return x

    def encode_pre(self, x: Tensor, **extras: Any) -> Tensor:
        """Pre-activations ``(..., d_sae)`` of inputs ``x`` ``(..., d_model)`` (GLU gate included)."""
        x_in = self._encoder_input(x)
        h = x_in @ self.W_E + self.b_E
        if self.W_E_glu is not None:
            h = h * torch.sigmoid(x_in @ self.W_E_glu + self.b_E_glu)
        return h

    def activate(self, hidden_pre: Tensor, mask: Tensor | None = None) -> Tensor:
        """Feature activations ``(..., d_sae)``; gated by the live decoder norm when configured."""
        if self.config.decoder_norm_gating:
            return apply_with_decoder_norm_gating(self.activation, hidden_pre, self.decoder_norm(), mask)
        return self.activation(hidden_pre, mask=mask)

    def decode(self, feature_acts: Tensor, **extras: Any) -> Tensor:
        """Prediction ``(..., d_out)`` from feature activations ``(..., d_sae)``."""
        out = feature_acts @ self.W_D
        return out + self.b_D if self.b_D is not None else out

    def decode_linear(self, feature_acts: Tensor, **extras: Any) -> Tensor:
        """``f W_D`` (no output bias)."""
        return feature_acts @ self.W_D

    def decode_sparse(self, indices: Tensor, values: Tensor) -> Tensor:
        """Prediction from the active features only: ``indices``/``values`` of shape ``(..., k)``.

        Equal to ``decode(f)`` where ``f`` is zero except ``f[..., indices] = values`` (repeated
        indices add up). Costs O(k·d_out) per token instead of O(d_sae·d_out).
        """
        if indices.shape != values.shape:
            raise ShapeError(f"decode_sparse: indices of shape {tuple(indices.shape)} and values of shape "
                             f"{tuple(values.shape)} must have the same shape (..., k)")
        lead = indices.shape[:-1]
        k = indices.shape[-1] if indices.ndim else 1
        flat_idx = indices.reshape(-1, k)
        flat_val = values.reshape(-1, k).to(self.W_D.dtype)
        out = F.embedding_bag(flat_idx, self.W_D, per_sample_weights=flat_val, mode="sum")
        if self.b_D is not None:
            out = out + self.b_D
        return out.reshape(*lead, self.W_D.shape[1])

    def fused_topk_forward(self, x: Tensor, buffers: dict[str, Any] | None = None
                           ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(recon, indices, values)`` by the fast TopK path, or None where it does not apply.

        Same result and gradients as ``decode(activate(encode_pre(x)))`` (see
        :func:`lmsae.nn.fused.topk_sae_forward`), computed with one dense encoder product, a
        sparse decode and a sparse backward. ``buffers`` is a dict the caller keeps across steps
        (the pre-activation buffer is reused; ``buffers["pre"]`` holds this call's
        pre-activations, without gradient, until the next call).

        Applies exactly when: ``act_fn == "topk"`` (k = ``self.activation.k``, so a scheduled k
        is honoured); no ``decoder_norm_gating``; no ``use_glu_encoder``; no feature-parallel
        forward context is active (a sharded TopK needs a global selection); autocast is off
        for ``x``'s device; ``x`` is floating point with the parameters' dtype and device and
        ends with ``d_model``. Decoder bias on or off, ``apply_decoder_bias_to_input`` (its
        gradient from both uses is summed) and transcoders of another output width are
        supported. Returns None otherwise (``relu``, ``jumprelu``, ``batchtopk``, ...).
        """
        from lmsae.nn.activations import TopK
        from lmsae.nn.fused import topk_sae_forward

        cfg = self.config
        if (cfg.act_fn != "topk" or not isinstance(self.activation, TopK) or cfg.decoder_norm_gating
                or cfg.use_glu_encoder or self.W_E_glu is not None):
            return None
        from lmsae.distributed.parallel import current

        ctx = current()
        if ctx is not None and getattr(ctx, "feature_group", None) is not None:
            return None
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype != self.W_E.dtype:
            return None
        if x.device != self.W_E.device or x.ndim < 1 or x.shape[-1] != cfg.d_model:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        input_bias = self.b_D if cfg.apply_decoder_bias_to_input else None
        return topk_sae_forward(x, self.W_E, self.b_E, self.W_D, self.b_D, self.activation.k,
                                input_bias=input_bias, buffers=buffers)

    def decoder_norm(self) -> Tensor:
        """L2 norm of each decoder row, ``(d_sae,)``."""
        return self.W_D.norm(dim=1)

    def decoder_directions(self) -> dict[str, Tensor]:
        """Each feature's write direction in raw output space, ``{hook_out: (d_sae, d_out)}``
        (the decoder rows divided by the output normalisation factor, if not folded)."""
        (hook,) = self.config.hooks_out
        scale = 1.0
        if self.config.normalization == "dataset" and hook in self.config.dataset_norms:
            scale = math.sqrt(self.W_D.shape[1]) / self.config.dataset_norms[hook]
        return {hook: self.W_D.detach() / scale}

    def encoder_norm(self) -> Tensor:
        """L2 norm of each encoder column, ``(d_sae,)``."""
        return self.W_E.norm(dim=0)

    def hook_dims(self) -> dict[str, int]:
        dims = {self.config.hook_point_in: self.config.d_model}
        dims.setdefault(self.config.hooks_out[0], self.config.output_width)
        return dims

    # --- initialisation ---------------------------------------------------------------------------

    def _uniform(self, shape: tuple[int, ...], bound: float, generator: torch.Generator | None) -> Tensor:
        # Drawn on the CPU in float32 whatever the parameters' device and dtype, so that one seed
        # gives the same initial dictionary everywhere.
        return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter, seeded through ``generator``.

        - ``W_D``: rows drawn U(-1, 1), then scaled to unit L2 norm, so every feature starts with
          the same decoder norm (what gating and decoder-norm-weighted penalties assume);
        - ``W_E = W_D^T`` when the input and output widths match, otherwise its own U(-1, 1)
          columns scaled to unit norm;
        - ``b_E``, ``b_D``, ``b_E_glu`` = 0; ``W_E_glu`` ~ U(±1/sqrt(d_model));
        - JumpReLU ``log_threshold`` = log(jumprelu_init_threshold).
        """
        cfg = self.config
        d, f, o = cfg.d_model, cfg.n_features, cfg.output_width
        w_d = self._uniform((f, o), 1.0, generator)
        w_d = w_d / w_d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_D.copy_(w_d)
        if o == d:
            self.W_E.copy_(w_d.T)
        else:
            w_e = self._uniform((d, f), 1.0, generator)
            self.W_E.copy_(w_e / w_e.norm(dim=0, keepdim=True).clamp_min(1e-12))
        self.b_E.zero_()
        if self.b_D is not None:
            self.b_D.zero_()
        if self.W_E_glu is not None:
            self.W_E_glu.copy_(self._uniform((d, f), 1.0 / math.sqrt(d), generator))
            self.b_E_glu.zero_()
        if isinstance(self.activation, JumpReLU):
            self.activation.log_threshold.fill_(math.log(cfg.jumprelu_init_threshold))

    # --- capabilities used by lmsae.training.initializer ------------------------------------------

    @torch.no_grad()
    def set_decoder_norm(self, value: float) -> None:
        """Scale every decoder row to L2 norm ``value`` exactly."""
        if not (value > 0 and math.isfinite(value)):
            raise LmsaeError(f"decoder norm must be a finite number > 0, got {value!r}")
        self.W_D.mul_(value / self.W_D.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def init_encoder_from_decoder(self, factor: float = 1.0) -> None:
        """``W_E = W_D^T · factor`` (needs d_out == d_model)."""
        if self.config.output_width != self.config.d_model:
            raise LmsaeError(
                f"cannot initialise the encoder from the decoder transpose: the transcoder maps d_model="
                f"{self.config.d_model} to d_out={self.config.output_width}; set initializer.encoder_from_decoder"
                " = false")
        self.W_E.copy_(self.W_D.T * factor)

    @torch.no_grad()
    def init_decoder_bias(self, mean: Tensor) -> None:
        """Set ``b_D`` to ``mean`` (shape ``(d_out,)``), e.g. the mean of the normalised labels."""
        if self.b_D is None:
            raise LmsaeError("cannot initialise the decoder bias: this SAE has use_decoder_bias = false")
        if tuple(mean.shape) != tuple(self.b_D.shape):
            raise ShapeError(f"decoder bias init: mean has shape {tuple(mean.shape)}, b_D has shape "
                             f"{tuple(self.b_D.shape)}")
        self.b_D.copy_(mean)

    @torch.no_grad()
    def init_encoder_bias_from_mean_pre(self, x: Tensor, mask: Tensor | None = None, **extras: Any) -> None:
        """Shift ``b_E`` so that the mean pre-activation over the (unmasked) tokens of ``x`` is 0.

        With a GLU encoder the linear part ``x' W_E + b_E`` (before the gate) is centred: it is
        the only part that ``b_E`` moves additively.
        """
        linear = self._encoder_input(x) @ self.W_E + self.b_E
        flat = linear.reshape(-1, linear.shape[-1])
        if mask is not None:
            keep = mask.reshape(-1).to(flat.device) != 0
            flat = flat[keep]
        if flat.shape[0] == 0:
            raise LmsaeError("cannot initialise the encoder bias: the batch has no unmasked token")
        self.b_E.sub_(flat.mean(dim=0))

    @torch.no_grad()
    def init_active_subspace(self, label: Tensor, d: int, mask: Tensor | None = None) -> None:
        """Put every decoder row inside the top-``d`` principal subspace of ``label``.

        ``label`` ``(..., d_out)`` is de-meaned and decomposed by SVD; each new row is
        ``W_D[i, :d] @ V_d`` (the current row's first d coordinates as random coefficients on
        the d leading right-singular vectors ``V_d`` of shape (d, d_out)), then normalised to
        unit norm. Meant for low-rank activations such as attention outputs.
        """
        o = self.config.output_width
        flat = label.reshape(-1, label.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1).to(flat.device) != 0]
        if flat.shape[-1] != o:
            raise ShapeError(f"active subspace init: labels have width {flat.shape[-1]}, the decoder has {o}")
        limit = min(o, flat.shape[0])
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= limit:
            raise LmsaeError(f"active subspace dimension must be an integer in [1, {limit}] "
                             f"(min of d_out={o} and {flat.shape[0]} tokens), got {d!r}")
        centred = (flat - flat.mean(dim=0)).to(torch.float64)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        basis = vh[:d].to(self.W_D.dtype)  # (d, d_out), orthonormal rows
        rows = self.W_D[:, :d] @ basis
        self.W_D.copy_(rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # --- folding ------------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_scales(self, scales_in: Mapping[str, float], scales_out: Mapping[str, float]) -> None:
        """Rewrite the weights so the model takes raw activations (see the base class).

        With s = scale of the input hook, t = scale of the output hook, the normalised model sees
        ``s·x`` and predicts ``t·y``. Folded: feature activations become f/s and

        - decoder: ``W_D ← W_D·s/t``, ``b_D ← b_D/t`` (so an SAE keeps its decoder norms);
        - encoder: ``W_E`` unchanged, ``b_E ← b_E/s + δ/s·W_E`` where ``δ = (s/t − 1)·b_D``
          (old b_D) is non-zero only when b_D is subtracted from the input and s ≠ t: the old
          encoder saw ``s·x − b_D = s·(x − b_D/t) + δ``;
        - GLU gate (its input must not change): ``W_E_glu ← s·W_E_glu``, ``b_E_glu ← b_E_glu + δ·W_E_glu``;
        - JumpReLU threshold: ``θ/s`` (it compares h/s); with decoder-norm gating it compares
          ``h·n``, which becomes ``(h/s)·(n·s/t) = h·n/t``, so ``θ/t``. TopK/BatchTopK selections
          are invariant under a positive scale.
        """
        (s,) = (float(v) for v in scales_in.values())
        (t,) = (float(v) for v in scales_out.values())
        if not (s > 0 and t > 0 and math.isfinite(s) and math.isfinite(t)):
            raise LmsaeError(f"fold_scales: scales must be finite and > 0, got s_in={s!r}, s_out={t!r}")
        shift = None
        if self.config.apply_decoder_bias_to_input and s != t:
            shift = (s / t - 1.0) * self.b_D  # δ, computed with the old b_D
        b_e = self.b_E / s
        if shift is not None:
            b_e = b_e + (shift / s) @ self.W_E
        self.b_E.copy_(b_e)
        if self.W_E_glu is not None:
            if shift is not None:
                self.b_E_glu.add_(shift @ self.W_E_glu)
            self.W_E_glu.mul_(s)
        self.W_D.mul_(s / t)
        if self.b_D is not None:
            self.b_D.div_(t)
        if isinstance(self.activation, JumpReLU):
            self.activation.rescale_threshold(1.0 / t if self.config.decoder_norm_gating else 1.0 / s)


def sae_sharding_rules(config: SAEConfig) -> dict[str, dict[str, int]]:
    """Tensor-parallel layout: features are split over the 'model' mesh axis; b_D is replicated."""
    rules: dict[str, dict[str, int]] = {"W_E": {"model": 1}, "b_E": {"model": 0}, "W_D": {"model": 0}}
    if config.use_decoder_bias:
        rules["b_D"] = {}
    if config.use_glu_encoder:
        rules["W_E_glu"] = {"model": 1}
        rules["b_E_glu"] = {"model": 0}
    if config.act_fn == "jumprelu":
        rules["activation.log_threshold"] = {"model": 0}
    return rules


def sae_shard_config(config: SAEConfig, counts: Mapping[str, int]) -> SAEConfig:
    """One feature shard: ``d_sae // counts["model"]`` features (the rules split only features)."""
    k = int(counts.get("model", 1))
    extra = sorted(a for a, n in counts.items() if a != "model" and n > 1)
    if extra:
        raise ShardingError(f"the SAE has no {extra[0]!r} axis to split (it has features only: 'model')")
    n = config.n_features
    if n % k:
        raise ShardingError(f"d_sae = {n} features do not split into {k} equal shards ([distributed] model = {k})")
    return attrs.evolve(config, d_sae=n // k, expansion_factor=None)


def sae_example_config() -> SAEConfig:
    """A small TopK SAE on a residual stream (16 dims, 64 features, k=4)."""
    return SAEConfig(hook_point_in="blocks.0.hook_resid_post", d_model=16, expansion_factor=4.0,
                     act_fn="topk", top_k=4)


SAE_SPEC = ArchitectureSpec(
    config_class=SAEConfig,
    model_class=SparseAutoEncoder,
    sharding_rules=sae_sharding_rules,
    example_config=sae_example_config,
    shard_config=sae_shard_config,
    summary="sparse autoencoder / transcoder (ReLU, JumpReLU, TopK, BatchTopK)",
)
