"""Configuration of low-rank sparse attention (``[dictionary] architecture = "lorsa"``).

A Lorsa replaces one attention layer: it reads the layer's input (``hook_point_in``, e.g.
``blocks.3.ln1.hook_normalized``) over whole sequences and predicts its output
(``hook_point_out``, e.g. ``blocks.3.hook_attn_out``). ``n_qk_heads`` query/key heads of width
``d_qk_head`` compute causal attention patterns; each of the ``d_sae`` features is a rank-1
OV head (one value direction, one output direction) that reads through the pattern of its QK
head. Features are grouped contiguously: feature i uses QK head ``i // (d_sae / n_qk_heads)``.

The positional settings must match the language model for the QK heads to be copied from it
(:func:`lmsae_lorsa.init.attention_settings` prints the right values for a TransformerLens model):

============================ ============================================================
``positional_embedding``     ``"rotary"`` (RoPE on q and k) or ``"none"`` (absolute or no
                             positions: they are already in the residual stream)
``rotary_dim``               dimensions of q/k that are rotated (the first ones; default all)
``rotary_base``              θ of RoPE (10000 for GPT-J/Llama 2, 100000 for SmolLM2, 500000
                             for Llama 3)
``rotary_style``             ``"neox"``: dimension j pairs with j + rotary_dim/2 (Llama, Qwen,
                             SmolLM2, GPT-NeoX; TransformerLens ``rotary_adjacent_pairs=False``);
                             ``"gptj"``: adjacent pairs (2j, 2j+1)
``ntk_by_parts``             Llama 3.1 frequency scaling (``ntk_*`` settings)
============================ ============================================================
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import attrs
from lmsae.config.base import DictionaryConfig
from lmsae.config.fields import FieldValueError, config_class, non_empty, one_of, option, positive

__all__ = ["ACT_FNS", "LorsaConfig"]

ActFn = Literal["relu", "jumprelu", "topk", "batchtopk"]
ACT_FNS: tuple[str, ...] = ("relu", "jumprelu", "topk", "batchtopk")


def _finite_positive(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not (value > 0 and math.isfinite(value)):
        raise FieldValueError(attribute.name, f"must be a finite number > 0, got {value!r}")


def _hook_name(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value in ("mask", "tokens", "meta", "attention_mask"):
        raise FieldValueError(attribute.name, f"{value!r} is a reserved batch key, not a hook point")


@config_class
class LorsaConfig(DictionaryConfig):
    """Low-rank sparse attention: a sparse, feature-per-OV-head replacement of an attention layer."""

    name: ClassVar[str] = "lorsa"
    #: Attention reads whole sequences: every run's activation streams need layout = "sequences"
    #: (the lorsa_init task's rule; the train task reads this flag to check it with the config).
    needs_sequences: ClassVar[bool] = True

    hook_point_in: str = option(
        doc="Input of the attention layer, read over whole sequences, e.g. 'blocks.3.ln1.hook_normalized'.",
        validator=[non_empty(), _hook_name])
    hook_point_out: str = option(
        doc="Output of the attention layer that the Lorsa predicts, e.g. 'blocks.3.hook_attn_out'. Must differ "
            "from hook_point_in.",
        validator=[non_empty(), _hook_name])
    d_model: int = option(doc="Width of the input and output activations.", validator=positive())
    n_qk_heads: int = option(
        doc="Number of query/key heads (attention patterns). To copy them from a language model, a multiple of "
            "its number of query heads (each of its heads is repeated n_qk_heads / n_heads times).",
        validator=positive())
    d_qk_head: int = option(doc="Width of each query/key head (the language model's d_head to copy its heads).",
                            validator=positive())
    d_sae: int = option(
        doc="Number of features = number of rank-1 OV heads. A multiple of n_qk_heads: each QK head drives "
            "d_sae / n_qk_heads consecutive features.",
        validator=positive())
    n_ctx: int = option(
        doc="Longest sequence accepted (tokens). Nothing of this size is stored: the causal mask and the rotary "
            "tables are computed for each batch's length.",
        validator=positive())
    positional_embedding: Literal["rotary", "none"] = option(
        "rotary",
        doc="'rotary': RoPE on queries and keys (as in Llama, Qwen, SmolLM2); 'none': no positional term in the "
            "attention scores (models with absolute position embeddings already carry them in the input).",
        validator=one_of("rotary", "none"))
    rotary_dim: int | None = option(
        None, doc="Number of leading query/key dimensions rotated by RoPE (even, <= d_qk_head). Unset: d_qk_head.",
        validator=positive())
    rotary_base: float = option(10_000.0, doc="RoPE base theta (frequency of pair j: base^(-2j/rotary_dim)).",
                                validator=_finite_positive)
    rotary_style: Literal["neox", "gptj"] = option(
        "neox",
        doc="Which dimensions RoPE rotates together: 'neox' pairs j with j + rotary_dim/2 (Llama, Qwen, SmolLM2; "
            "TransformerLens rotary_adjacent_pairs = false); 'gptj' pairs adjacent dimensions (2j, 2j+1).",
        validator=one_of("neox", "gptj"))
    ntk_by_parts: bool = option(
        False, doc="Llama-3.1 'NTK-by-parts' RoPE frequency scaling (the ntk_* settings; TransformerLens "
                   "use_NTK_by_parts_rope).")
    ntk_factor: float = option(8.0, doc="NTK-by-parts: factor dividing the low frequencies.",
                               validator=_finite_positive)
    ntk_low_freq_factor: float = option(1.0, doc="NTK-by-parts: wavelengths above original_context / this are "
                                                 "scaled by 1/ntk_factor.", validator=_finite_positive)
    ntk_high_freq_factor: float = option(4.0, doc="NTK-by-parts: wavelengths below original_context / this are "
                                                  "kept; in between, interpolated.", validator=_finite_positive)
    ntk_original_context: int = option(8192, doc="NTK-by-parts: the context length the model was pre-trained "
                                                 "with.", validator=positive())
    attn_scale: float | None = option(
        None, doc="Attention scores are q.k / attn_scale. Unset: sqrt(d_qk_head) (the language model's usual "
                  "scale).", validator=_finite_positive)
    qk_norm: Literal["none", "rms"] = option(
        "none", doc="'rms': RMSNorm on every query and key head (learnt weight per head and dimension) before "
                    "RoPE, as in models with QK-norm (Qwen3, OLMo 2); 'none': no normalisation.",
        validator=one_of("none", "rms"))
    qk_norm_eps: float = option(1e-6, doc="Epsilon of the QK RMSNorm.", validator=_finite_positive)
    act_fn: ActFn = option(
        "topk",
        doc="Sparse activation over the features of each token: 'relu'; 'jumprelu' (learnable threshold per "
            "feature); 'topk' (the top_k largest per token, after ReLU); 'batchtopk' (top_k * n_tokens over the "
            "batch's unmasked tokens).",
        validator=one_of(*ACT_FNS))
    top_k: int = option(50, doc="k of 'topk' / 'batchtopk' (active features per token). A trainer may schedule it.",
                        validator=positive())
    jumprelu_init_threshold: float = option(
        0.01, doc="Initial JumpReLU threshold (> 0), in units of the (normalised, with decoder_norm_gating "
                  "decoder-norm-scaled) pre-activations.", validator=_finite_positive)
    jumprelu_bandwidth: float = option(
        0.05, doc="Width of the rectangle kernel of JumpReLU's threshold gradient (training only).",
        validator=_finite_positive)
    decoder_norm_gating: bool = option(
        False, doc="Apply the activation to h * ||W_O[i]|| and divide the result back: TopK and JumpReLU then act "
                   "on each feature's contribution to the output norm.")

    def __attrs_post_init__(self) -> None:
        if self.hook_point_in == self.hook_point_out:
            raise FieldValueError("hook_point_out", f"must differ from hook_point_in ({self.hook_point_in!r}): a "
                                                    "Lorsa predicts the attention output from the attention input")
        if self.d_sae % self.n_qk_heads:
            raise FieldValueError("d_sae", f"{self.d_sae} is not a multiple of n_qk_heads={self.n_qk_heads} "
                                           f"(every QK head drives the same number of features)")
        if self.positional_embedding == "rotary":
            rd = self.resolved_rotary_dim
            if rd % 2 or rd > self.d_qk_head:
                raise FieldValueError("rotary_dim", f"must be even and <= d_qk_head={self.d_qk_head}, got {rd}")
        else:
            if self.ntk_by_parts:
                raise FieldValueError("ntk_by_parts", "needs positional_embedding = 'rotary'")
            if self.rotary_dim is not None:
                raise FieldValueError("rotary_dim", "is only used with positional_embedding = 'rotary'; unset it")
        if self.ntk_by_parts and self.ntk_high_freq_factor <= self.ntk_low_freq_factor:
            raise FieldValueError("ntk_high_freq_factor",
                                  f"must be > ntk_low_freq_factor={self.ntk_low_freq_factor} (the interpolation "
                                  f"band between them would be empty), got {self.ntk_high_freq_factor}")

    # --- what the dictionary reads and predicts -------------------------------------------------

    @property
    def hooks_in(self) -> tuple[str, ...]:
        return (self.hook_point_in,)

    @property
    def hooks_out(self) -> tuple[str, ...]:
        return (self.hook_point_out,)

    @property
    def n_features(self) -> int:
        return self.d_sae

    # --- derived sizes ----------------------------------------------------------------------------

    @property
    def ov_group_size(self) -> int:
        """Features (rank-1 OV heads) per QK head: ``d_sae // n_qk_heads``."""
        return self.d_sae // self.n_qk_heads

    @property
    def resolved_rotary_dim(self) -> int:
        """``rotary_dim``, or ``d_qk_head`` when unset (0 without rotary embeddings)."""
        if self.positional_embedding != "rotary":
            return 0
        return self.rotary_dim if self.rotary_dim is not None else self.d_qk_head

    @property
    def resolved_attn_scale(self) -> float:
        """``attn_scale``, or ``sqrt(d_qk_head)`` when unset."""
        return self.attn_scale if self.attn_scale is not None else math.sqrt(self.d_qk_head)
