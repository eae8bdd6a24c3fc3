"""Configuration of the crosscoder architecture (``[dictionary] architecture = "crosscoder"``)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import attrs

from lmsae.activations.protocol import RESERVED_KEYS
from lmsae.config.base import DictionaryConfig
from lmsae.config.fields import FieldValueError, config_class, option, positive

__all__ = ["ActFn", "CrosscoderConfig", "CrosscoderShardConfig", "DEFAULT_EXPANSION_FACTOR", "Init"]

ActFn = Literal["relu", "jumprelu", "topk", "batchtopk"]
Init = Literal["identical", "independent"]

#: expansion factor used when neither ``d_sae`` nor ``expansion_factor`` is given (as for the SAE)
DEFAULT_EXPANSION_FACTOR = 8.0


def _finite_positive(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not (value > 0 and math.isfinite(value)):
        raise FieldValueError(attribute.name, f"must be a finite number > 0, got {value!r}")


def _default_expansion_factor(self: Any) -> float | None:
    # TOML has no null: with d_sae given, "unset" must be the default of expansion_factor.
    return None if self.d_sae is not None else DEFAULT_EXPANSION_FACTOR


def _check_heads(attribute: attrs.Attribute, value: list[str], minimum: int) -> None:
    if len(value) < minimum:
        if minimum == 2:
            raise FieldValueError(attribute.name, f"a crosscoder needs at least 2 heads (hook points), got "
                                                  f"{len(value)}: {list(value)!r}; with one hook point train an "
                                                  "SAE instead")
        raise FieldValueError(attribute.name, f"needs at least {minimum} head(s), got {list(value)!r}")
    empty = [i for i, h in enumerate(value) if not h]
    if empty:
        raise FieldValueError(attribute.name, f"entry {empty[0]} is an empty string")
    seen: set[str] = set()
    for h in value:
        if h in seen:
            raise FieldValueError(attribute.name, f"{h!r} appears twice; every head needs its own hook point "
                                                  "(or its own batch key, see the crosscoder_heads source)")
        seen.add(h)
    reserved = [h for h in value if h in RESERVED_KEYS]
    if reserved:
        raise FieldValueError(attribute.name, f"{reserved[0]!r} is a reserved batch key "
                                              f"({', '.join(sorted(RESERVED_KEYS))}), not an activation")


def _valid_heads(_instance: Any, attribute: attrs.Attribute, value: list[str]) -> None:
    _check_heads(attribute, value, 2)


def _valid_shard_heads(_instance: Any, attribute: attrs.Attribute, value: list[str]) -> None:
    _check_heads(attribute, value, 1)


@config_class
class CrosscoderConfig(DictionaryConfig):
    """A crosscoder: one sparse code shared by several heads (hook points, layers or models).

    Each head reads and reconstructs its own hook point; the pre-activation of the shared code
    is the sum of the per-head encodings.
    """

    name: ClassVar[str] = "crosscoder"

    hook_points: list[str] = option(
        doc="One head per entry: the batch key of the activations the head reads and reconstructs, in head "
            "order. Usually hook points of one model, e.g. ['blocks.2.hook_resid_post', "
            "'blocks.3.hook_resid_post', 'blocks.4.hook_resid_post']. The same hook of several models "
            "(checkpoints) is expressed with distinct keys, e.g. ['base.blocks.3.hook_resid_post', "
            "'chat.blocks.3.hook_resid_post'], which a 'crosscoder_heads' activation source provides by "
            "renaming each member source's hook point. At least 2, all distinct.",
        validator=_valid_heads)
    d_model: int = option(doc="Width of every head's activations (all heads must have the same width).",
                          validator=positive())
    d_sae: int | None = option(
        None,
        doc="Number of features of the shared code. When set it defines the dictionary size; expansion_factor "
            "must then be unset or agree with it (int(d_model * expansion_factor) == d_sae).",
        validator=positive())
    expansion_factor: float | None = option(
        attrs.Factory(_default_expansion_factor, takes_self=True),
        doc="Features per dimension of ONE head: d_sae = int(d_model * expansion_factor). Defaults to 8 when "
            "d_sae is unset, and to unset when d_sae is given.",
        validator=_finite_positive)
    act_fn: ActFn = option(
        "topk",
        doc="Sparse activation of the shared code: 'relu'; 'jumprelu' (h * [h > theta], learnable per-feature "
            "threshold); 'topk' (the top_k largest per token, after ReLU); 'batchtopk' (the top_k * n_tokens "
            "largest over the whole batch, after ReLU; masked tokens excluded).")
    top_k: int = option(50, doc="k of 'topk' and 'batchtopk': features kept per token (on average for batchtopk), "
                                "for the shared code, not per head. A trainer may schedule it.",
                        validator=positive())
    jumprelu_init_threshold: float = option(
        0.01,
        doc="Initial JumpReLU threshold theta (> 0), in the units of the (normalised, and with decoder_norm_gating "
            "combined-decoder-norm-scaled) summed pre-activations.",
        validator=_finite_positive)
    jumprelu_bandwidth: float = option(
        0.05,
        doc="Width epsilon (> 0) of the rectangle kernel of JumpReLU's straight-through threshold gradient, in the "
            "units of the threshold. It only affects training gradients, never the forward pass.",
        validator=_finite_positive)
    decoder_norm_gating: bool = option(
        False,
        doc="Apply the activation to h * n_i and divide the result back by n_i, where n_i = sum over heads of "
            "||W_D[head, i]|| is the feature's combined decoder norm (the weight of the crosscoder sparsity "
            "penalty), so TopK selection and JumpReLU thresholds act on each feature's total contribution to "
            "the reconstructions.")
    init: Init = option(
        "identical",
        doc="Initial decoders: 'identical' draws one random decoder and copies it to every head (what the "
            "reference implementation did silently; every feature starts shared, a natural prior for model "
            "diffing), 'independent' draws every head's decoder separately (features start unrelated across "
            "heads; a natural prior for layers that share little). Encoders start as the decoders' "
            "transposes either way.")

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

    # --- what the dictionary reads and predicts -------------------------------------------------

    @property
    def hooks_in(self) -> tuple[str, ...]:
        return tuple(self.hook_points)

    @property
    def hooks_out(self) -> tuple[str, ...]:
        return tuple(self.hook_points)

    @property
    def n_heads(self) -> int:
        """Number of heads (= len(hook_points))."""
        return len(self.hook_points)

    @property
    def n_features(self) -> int:
        if self.d_sae is not None:
            return self.d_sae
        return int(self.d_model * self.expansion_factor)  # type: ignore[operator]


@config_class
class CrosscoderShardConfig(CrosscoderConfig):
    """The config of ONE shard of a crosscoder split over the ``head`` and/or ``model`` mesh axes.

    Built by :func:`lmsae_crosscoder.spec.crosscoder_shard_config`, never written by users: its
    ``hook_points`` are the shard's own heads (possibly a single one, which a user config forbids)
    and ``d_sae`` its own features. It keeps the architecture tag ``crosscoder``; what is saved is
    always the full model's config and canonical (unsharded) weights.
    """

    hook_points: list[str] = option(
        doc="The shard's own heads: a contiguous block of the full crosscoder's hook points, in head order. At "
            "least 1, all distinct.",
        validator=_valid_shard_heads)
