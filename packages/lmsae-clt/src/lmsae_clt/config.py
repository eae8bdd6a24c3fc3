"""Configuration of the cross-layer transcoder (``[dictionary] architecture = "clt"``).

A CLT with L layers reads ``hook_points_in[i]`` (e.g. ``blocks.i.ln2.hook_normalized``) and
predicts ``hook_points_out[j]`` (e.g. ``blocks.i.hook_mlp_out``). Layer i has ``d_sae`` features
of its own; a feature at layer i writes to every layer j >= i.

Sparsity (``act_fn``) and the meaning of ``top_k``:

============== ============================================ =====================================
act_fn         selection                                    top_k means
============== ============================================ =====================================
relu           ReLU                                         (unused)
jumprelu       h·[h > θ], θ learnable per (layer, feature)  (unused)
topk           top k of each token's features, per layer    features per token PER LAYER
layertopk      top k of each token over layers × features   features per token IN TOTAL
batchtopk      top k·n_tokens over batch × features,        features per token PER LAYER, on
               separately for each layer                    average over the batch
batchlayertopk top k·n_tokens over batch × layers × features features per token IN TOTAL, on
                                                            average over the batch
============== ============================================ =====================================

Every TopK variant applies a ReLU first; the batch variants exclude masked tokens.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import attrs

from lmsae.config.base import DictionaryConfig
from lmsae.config.fields import FieldValueError, config_class, in_range, non_empty, option, positive

__all__ = ["ACROSS_LAYER_ACT_FNS", "ACT_FNS", "DEFAULT_EXPANSION_FACTOR", "TOPK_ACT_FNS", "CLTConfig"]

ActFn = Literal["relu", "jumprelu", "topk", "layertopk", "batchtopk", "batchlayertopk"]
ACT_FNS: tuple[str, ...] = ("relu", "jumprelu", "topk", "layertopk", "batchtopk", "batchlayertopk")
#: activations whose selection uses ``top_k``
TOPK_ACT_FNS: tuple[str, ...] = ("topk", "layertopk", "batchtopk", "batchlayertopk")
#: activations that compare features of different layers: a layer's features then depend on the
#: inputs of every layer, so an output cannot be computed from earlier layers' inputs alone
ACROSS_LAYER_ACT_FNS: tuple[str, ...] = ("layertopk", "batchlayertopk")

#: features per input dimension (per layer) when neither ``d_sae`` nor ``expansion_factor`` is given
DEFAULT_EXPANSION_FACTOR = 8.0


def _finite_positive(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not (value > 0 and math.isfinite(value)):
        raise FieldValueError(attribute.name, f"must be a finite number > 0, got {value!r}")


def _hook_names(_instance: Any, attribute: attrs.Attribute, value: list[str]) -> None:
    bad = [h for h in value if not isinstance(h, str) or not h.strip() or h in ("mask", "tokens", "meta")]
    if bad:
        raise FieldValueError(attribute.name, f"hook point names must be non-empty strings other than the reserved "
                                              f"batch keys 'mask', 'tokens', 'meta'; got {bad!r}")
    seen: set[str] = set()
    dupes = [h for h in value if h in seen or seen.add(h)]  # type: ignore[func-returns-value]
    if dupes:
        raise FieldValueError(attribute.name, f"each layer needs its own hook point; repeated: {sorted(set(dupes))}")


def _default_expansion_factor(self: Any) -> float | None:
    # TOML has no null: an explicit d_sae alone must not clash with a default expansion factor.
    return None if self.d_sae is not None else DEFAULT_EXPANSION_FACTOR


@config_class
class CLTConfig(DictionaryConfig):
    """A cross-layer transcoder: L encoders, and decoders from every layer i to every layer j >= i."""

    name: ClassVar[str] = "clt"

    hook_points_in: list[str] = option(
        doc="Hook point read by each layer's encoder, in layer order, e.g. ['blocks.0.ln2.hook_normalized', "
            "'blocks.1.ln2.hook_normalized']. Its length is the number of layers L.",
        validator=[non_empty(), _hook_names])
    hook_points_out: list[str] = option(
        doc="Hook point predicted at each layer, in the same order and of the same length as hook_points_in, "
            "e.g. ['blocks.0.hook_mlp_out', 'blocks.1.hook_mlp_out']. Output j is predicted from the features of "
            "layers 0..j.",
        validator=[non_empty(), _hook_names])
    d_model: int = option(doc="Width of the input activations (every hook point of hook_points_in).",
                          validator=positive())
    d_out: int | None = option(
        None, doc="Width of the predicted activations (every hook point of hook_points_out); defaults to d_model.",
        validator=positive())
    d_sae: int | None = option(
        None,
        doc="Features PER LAYER (the CLT has L * d_sae features in all). When set, expansion_factor must be unset "
            "or agree with it (int(d_model * expansion_factor) == d_sae).",
        validator=positive())
    expansion_factor: float | None = option(
        attrs.Factory(_default_expansion_factor, takes_self=True),
        doc="Features per input dimension PER LAYER: d_sae = int(d_model * expansion_factor). Defaults to 8 when "
            "d_sae is unset, and to unset when d_sae is given.",
        validator=_finite_positive)
    act_fn: ActFn = option(
        "topk",
        doc="Sparse activation: 'relu'; 'jumprelu' (h * [h > theta], a learnable threshold per layer and feature); "
            "'topk' (top_k per token in each layer); 'layertopk' (top_k per token over all layers' features "
            "together); 'batchtopk' (top_k * n_tokens over the batch, separately in each layer); "
            "'batchlayertopk' (top_k * n_tokens over the batch and all layers together). TopK variants apply a "
            "ReLU first; batch variants ignore masked tokens.")
    top_k: int = option(
        50,
        doc="k of the TopK activations: features per token in EACH LAYER for 'topk' and 'batchtopk' (on average "
            "over the batch for 'batchtopk'), features per token summed OVER ALL LAYERS for 'layertopk' and "
            "'batchlayertopk'. A trainer may schedule it.",
        validator=positive())
    jumprelu_init_threshold: float = option(
        0.01,
        doc="Initial JumpReLU threshold theta (> 0), in the units of the normalised (and, with decoder_norm_gating, "
            "decoder-norm-scaled) pre-activations.",
        validator=_finite_positive)
    jumprelu_bandwidth: float = option(
        0.05,
        doc="Width epsilon (> 0) of the rectangle kernel of JumpReLU's straight-through threshold gradient, in the "
            "threshold's units. Only affects training gradients.",
        validator=_finite_positive)
    decoder_norm_gating: bool = option(
        False,
        doc="Apply the activation to h * n and divide the result back by n, where n is each feature's combined "
            "decoder norm over every layer it writes to (sqrt of the sum over j >= i of ||W_D[i->j]||^2): TopK "
            "selections and JumpReLU thresholds then act on each feature's contribution to the output norm.")
    init_cross_layer_decoders_zero: bool = option(
        False,
        doc="Start with every cross-layer decoder (source layer i < target layer j) at zero, so the CLT starts as L "
            "per-layer transcoders and learns cross-layer writes only where they help.")
    sparse_decode_density: float = option(
        0.001,
        doc="Decode through the active features only (gathering their decoder rows) when the fraction of non-zero "
            "feature activations is below this value; otherwise use dense matrix products. Both give the same "
            "result. On a CPU the sparse path wins only below about 0.3% active (e.g. k = 16 of 8192 features per "
            "layer); 0 = always dense. A JumpReLU CLT always trains densely (its threshold gradient needs it).",
        validator=in_range(0.0, 1.0))

    def __attrs_post_init__(self) -> None:
        if len(self.hook_points_out) != len(self.hook_points_in):
            raise FieldValueError(
                "hook_points_out", f"has {len(self.hook_points_out)} hook points but hook_points_in has "
                                   f"{len(self.hook_points_in)}; a CLT predicts one output per input layer")
        if self.d_sae is None and self.expansion_factor is None:
            raise FieldValueError("d_sae", "set d_sae or expansion_factor (both are unset)")
        if self.expansion_factor is not None:
            implied = int(self.d_model * self.expansion_factor)
            if self.d_sae is not None and implied != self.d_sae:
                raise FieldValueError(
                    "d_sae", f"{self.d_sae} disagrees with expansion_factor={self.expansion_factor} "
                             f"(int({self.d_model} * {self.expansion_factor}) = {implied}); set only one of them")
            if implied < 1:
                raise FieldValueError("expansion_factor", f"{self.expansion_factor} gives {implied} features per "
                                                          "layer; need at least 1")
        shared = sorted(set(self.hook_points_in) & set(self.hook_points_out))
        if shared and self.output_width != self.d_model:
            raise FieldValueError(
                "d_out", f"{self.d_out} differs from d_model={self.d_model}, but hook point(s) {shared} are both read "
                         "and predicted, so they cannot have two widths")

    # --- what the dictionary reads and predicts -------------------------------------------------

    @property
    def hooks_in(self) -> tuple[str, ...]:
        return tuple(self.hook_points_in)

    @property
    def hooks_out(self) -> tuple[str, ...]:
        return tuple(self.hook_points_out)

    @property
    def n_layers(self) -> int:
        """L, the number of layers (encoders)."""
        return len(self.hook_points_in)

    @property
    def output_width(self) -> int:
        """Width of every prediction: ``d_out`` if set, else ``d_model``."""
        return self.d_out if self.d_out is not None else self.d_model

    @property
    def n_features(self) -> int:
        """Features per layer (``d_sae``); the CLT has ``n_layers * n_features`` in all."""
        if self.d_sae is not None:
            return self.d_sae
        return int(self.d_model * self.expansion_factor)  # type: ignore[operator]
