"""Configuration of the MOLT architecture (``[dictionary] architecture = "molt"``).

The dictionary size is defined by ``rank_counts`` alone (rank -> number of transforms of that
rank, ``n_features = sum of the counts``); there is no ``expansion_factor`` or ``d_sae`` field, so
the two can never disagree (the reference kept both and only checked them against each other
within 0.1). Either key is rejected as unknown by the config loader.

In files the ranks are table keys, hence strings: ``rank_counts = { "4" = 512, "16" = 256 }`` or
a ``[dictionary.rank_counts]`` table with bare keys ``4 = 512``. The config stores them
canonically as decimal strings in ascending rank order (so it writes back to TOML and JSON
unchanged); :attr:`MOLTConfig.ranks`, :attr:`MOLTConfig.counts` and
:attr:`MOLTConfig.rank_groups` give the integers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import attrs

from lmsae.config.base import DictionaryConfig
from lmsae.config.fields import FieldValueError, config_class, non_empty, option, positive

__all__ = ["ActFn", "MOLTConfig", "normalize_rank_counts"]

ActFn = Literal["relu", "jumprelu", "topk", "batchtopk"]


def _finite_positive(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not (value > 0 and math.isfinite(value)):
        raise FieldValueError(attribute.name, f"must be a finite number > 0, got {value!r}")


def _rank_of(key: Any) -> int:
    """A rank key (int, or a string of decimal digits as TOML/JSON keys are) as a positive int."""
    if isinstance(key, bool):
        raise FieldValueError("rank_counts", f"rank {key!r} is not a positive integer")
    if isinstance(key, int):
        rank = key
    elif isinstance(key, str) and key.strip().isdecimal():
        rank = int(key.strip())
    else:
        raise FieldValueError("rank_counts", f"rank {key!r} is not a positive integer (keys are ranks, e.g. "
                                             "\"4\" = 512 for 512 transforms of rank 4)")
    if rank < 1:
        raise FieldValueError("rank_counts", f"rank {key!r} must be >= 1")
    return rank


def normalize_rank_counts(value: Mapping[Any, Any]) -> dict[str, int]:
    """``rank_counts`` in canonical form: ``{str(rank): count}`` in ascending rank order.

    Accepts int or decimal-string keys; raises :class:`FieldValueError` for an empty mapping, a
    key that is not a positive integer, the same rank written twice ("4" and "04") or a count
    that is not a positive integer.
    """
    if not isinstance(value, Mapping):
        raise FieldValueError("rank_counts", f"must be a table rank -> count, got {type(value).__name__}")
    if not value:
        raise FieldValueError("rank_counts", "must not be empty (give at least one rank -> count)")
    out: dict[int, int] = {}
    for key, count in value.items():
        rank = _rank_of(key)
        if rank in out:
            raise FieldValueError("rank_counts", f"rank {rank} is given twice")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise FieldValueError("rank_counts", f"the count of rank {rank} must be an integer >= 1, got {count!r}")
        out[rank] = count
    return {str(r): out[r] for r in sorted(out)}


@config_class
class MOLTConfig(DictionaryConfig):
    """A mixture of linear transforms: a sparse gate picks low-rank linear maps of the input.

    ``y = sum_i f_i U_i V_i x + b_D`` with ``f = act(x W_E + b_E)``; transform i has rank r_i.
    Usually an MLP replacement: reads the MLP input, predicts the MLP output.
    """

    name: ClassVar[str] = "molt"

    hook_point_in: str = option(
        doc="Hook point the gate and the transforms read, usually the MLP input, e.g. 'blocks.3.ln2.hook_normalized'.",
        validator=non_empty())
    hook_point_out: str = option(
        doc="Hook point the dictionary predicts, usually the MLP output, e.g. 'blocks.3.hook_mlp_out'. It may equal "
            "hook_point_in (the transforms then reconstruct their own input).",
        validator=non_empty())
    d_model: int = option(doc="Width of the input activations (last dimension of hook_point_in).",
                          validator=positive())
    d_out: int | None = option(
        None, doc="Width of the predicted activations; defaults to d_model.", validator=positive())
    rank_counts: dict[str | int, int] = option(
        doc="Rank -> number of transforms of that rank, e.g. { \"4\" = 512, \"16\" = 256, \"64\" = 64 }. Defines the "
            "dictionary size: n_features = the sum of the counts. Features are ordered by ascending rank, and by "
            "index within a rank (the canonical order, on disk and in memory). Ranks must be at most "
            "min(d_model, d_out). Keys may be written as strings (as TOML requires) or integers.",
        converter=normalize_rank_counts)
    act_fn: ActFn = option(
        "topk",
        doc="Sparse activation of the gate: 'relu'; 'jumprelu' (h * [h > theta], learnable per-feature threshold); "
            "'topk' (the top_k largest per token, after ReLU); 'batchtopk' (the top_k * n_tokens largest over the "
            "whole batch, after ReLU; masked tokens excluded).")
    top_k: int = option(32, doc="k of 'topk' and 'batchtopk' (active transforms per token, on average for "
                                "batchtopk). A trainer may schedule it.", validator=positive())
    jumprelu_init_threshold: float = option(
        0.01,
        doc="Initial JumpReLU threshold theta (> 0), in the units of the (normalised, and with decoder_norm_gating "
            "||U_i V_i||_F-scaled) gate pre-activations.",
        validator=_finite_positive)
    jumprelu_bandwidth: float = option(
        0.05,
        doc="Width epsilon (> 0) of the rectangle kernel of JumpReLU's straight-through threshold gradient, in the "
            "units of the threshold. It only affects training gradients, never the forward pass.",
        validator=_finite_positive)
    decoder_norm_gating: bool = option(
        False,
        doc="Apply the activation to h_i * ||U_i V_i||_F and divide the result back by ||U_i V_i||_F, so TopK "
            "selection and JumpReLU thresholds act on each transform's strength (the Frobenius norm of its map), "
            "not on the raw gate value.")
    use_decoder_bias: bool = option(True, doc="Learn an output bias b_D added to every prediction.")

    def __attrs_post_init__(self) -> None:
        if self.hook_point_out == self.hook_point_in and self.output_width != self.d_model:
            raise FieldValueError(
                "d_out", f"{self.d_out} differs from d_model={self.d_model}, but hook_point_out equals hook_point_in "
                         "(the same activations cannot have two widths)")
        limit = min(self.d_model, self.output_width)
        too_big = [r for r in self.ranks if r > limit]
        if too_big:
            raise FieldValueError(
                "rank_counts", f"rank {too_big[0]} exceeds min(d_model, d_out) = {limit}: a product U V of shape "
                               f"({self.output_width}, {self.d_model}) has rank at most {limit}, so a larger rank only "
                               "adds parameters; use a rank <= the limit")

    # --- what the dictionary reads and predicts -------------------------------------------------

    @property
    def hooks_in(self) -> tuple[str, ...]:
        return (self.hook_point_in,)

    @property
    def hooks_out(self) -> tuple[str, ...]:
        return (self.hook_point_out,)

    @property
    def output_width(self) -> int:
        """Width of the prediction: ``d_out`` if set, else ``d_model``."""
        return self.d_out if self.d_out is not None else self.d_model

    # --- the rank groups ------------------------------------------------------------------------

    @property
    def rank_groups(self) -> tuple[tuple[int, int], ...]:
        """``((rank, count), ...)`` in ascending rank order: the canonical feature order."""
        return tuple((int(r), c) for r, c in self.rank_counts.items())

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks, ascending."""
        return tuple(r for r, _ in self.rank_groups)

    @property
    def counts(self) -> tuple[int, ...]:
        """Number of transforms of each rank (same order as :attr:`ranks`)."""
        return tuple(c for _, c in self.rank_groups)

    @property
    def n_features(self) -> int:
        return sum(self.counts)

    @property
    def total_rank(self) -> int:
        """Sum of the ranks of every transform (``sum_r r * count_r``)."""
        return sum(r * c for r, c in self.rank_groups)
