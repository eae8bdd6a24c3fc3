"""The architecture record of Lorsa: sharding rules, example config, analysis extras."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
import torch
from lmsae.errors import ShardingError
from lmsae.records import ArchitectureSpec

from lmsae_lorsa.config import LorsaConfig
from lmsae_lorsa.model import LowRankSparseAttention

__all__ = ["LORSA_SPEC", "lorsa_analysis_extras", "lorsa_example_config", "lorsa_shard_config",
           "lorsa_sharding_rules"]


def lorsa_sharding_rules(config: LorsaConfig) -> dict[str, dict[str, int]]:
    """QK heads and their OV groups are split together over the 'model' mesh axis.

    Every per-head tensor (``W_Q``, ``W_K``, ``b_Q``, ``b_K``, QK-norm weights) and every
    per-feature tensor (``W_V``, ``b_V``, ``W_O``, JumpReLU thresholds) is split along dim 0.
    Because features are grouped contiguously under their QK head, rank r of m holds QK heads
    ``[r H/m, (r+1) H/m)`` and exactly their features ``[r F/m, (r+1) F/m)``: attention and
    encoding are local, only the decoder's partial sums ``f W_O`` are all-reduced, then ``b_D``
    (replicated) is added once (by the first 'model' rank: ``decode`` there, ``decode_linear``
    elsewhere). Needs ``n_qk_heads`` divisible by the 'model' axis size. Lorsa has no buffers (the
    rotary frequencies are a plain attribute rebuilt from the config).
    """
    rules: dict[str, dict[str, int]] = {
        "W_Q": {"model": 0}, "W_K": {"model": 0}, "b_Q": {"model": 0}, "b_K": {"model": 0},
        "W_V": {"model": 0}, "b_V": {"model": 0}, "W_O": {"model": 0}, "b_D": {},
    }
    if config.qk_norm == "rms":
        rules["q_norm_weight"] = {"model": 0}
        rules["k_norm_weight"] = {"model": 0}
    if config.act_fn == "jumprelu":
        rules["activation.log_threshold"] = {"model": 0}
    return rules


def lorsa_shard_config(config: LorsaConfig, counts: Mapping[str, int]) -> LorsaConfig:
    """The config of one 'model' shard: ``n_qk_heads // m`` QK heads and their OV groups
    (``d_sae // m`` features); every other setting (``d_qk_head``, attention scale, RoPE) is kept.

    Raises :class:`~lmsae.errors.ShardingError` when ``m`` does not divide ``n_qk_heads`` or for any
    other axis of size > 1 (Lorsa splits over 'model' only).
    """
    extra = sorted(a for a, n in counts.items() if a != "model" and int(n) > 1)
    if extra:
        raise ShardingError(f"Lorsa has no {extra[0]!r} axis to split (its QK heads and features split over "
                            f"'model' only); set [distributed] {extra[0]} = 1")
    m = int(counts.get("model", 1))
    if m < 1 or config.n_qk_heads % m:
        raise ShardingError(f"n_qk_heads = {config.n_qk_heads} QK heads do not split into {m} equal shards "
                            f"([distributed] model = {m}); each shard holds whole QK heads with their "
                            f"{config.ov_group_size} features, so choose n_qk_heads divisible by {m}")
    return attrs.evolve(config, n_qk_heads=config.n_qk_heads // m, d_sae=config.d_sae // m)


def lorsa_example_config() -> LorsaConfig:
    """A small TopK Lorsa on one attention layer: 16 dims, 2 QK heads of 8, 32 features, k=4, RoPE."""
    return LorsaConfig(hook_point_in="blocks.0.ln1.hook_normalized", hook_point_out="blocks.0.hook_attn_out",
                       d_model=16, n_qk_heads=2, d_qk_head=8, d_sae=32, n_ctx=64, act_fn="topk", top_k=4)


@torch.no_grad()
def lorsa_analysis_extras(model: LowRankSparseAttention, feature_indices: Any) -> dict[str, np.ndarray]:
    """Per feature: ``qk_head`` (the QK head whose pattern it reads), ``value_norm`` (||W_V[i]||)
    and ``decoder_norm`` (||W_O[i]||), in the saved dictionary's units."""
    idx = torch.as_tensor(np.asarray(feature_indices, dtype=np.int64).reshape(-1))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= model.n_features):
        raise IndexError(f"feature indices must lie in [0, {model.n_features})")
    return {
        "qk_head": (idx // model.config.ov_group_size).numpy(),
        "value_norm": model.encoder_norm().detach().cpu()[idx].double().numpy(),
        "decoder_norm": model.decoder_norm().detach().cpu()[idx].double().numpy(),
    }


LORSA_SPEC = ArchitectureSpec(
    config_class=LorsaConfig,
    model_class=LowRankSparseAttention,
    sharding_rules=lorsa_sharding_rules,
    example_config=lorsa_example_config,
    summary="low-rank sparse attention: causal QK heads driving rank-1 OV features (attention-layer replacement)",
    analysis_extras=lorsa_analysis_extras,
    shard_config=lorsa_shard_config,
)
