"""The architecture record of the crosscoder: sharding rules, example config, analysis extras."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from lmsae.errors import ShardingError
from lmsae.records import ArchitectureSpec

from lmsae_crosscoder.analysis import crosscoder_analysis_extras
from lmsae_crosscoder.config import CrosscoderConfig, CrosscoderShardConfig
from lmsae_crosscoder.model import Crosscoder

__all__ = ["CROSSCODER_SPEC", "crosscoder_example_config", "crosscoder_shard_config", "crosscoder_sharding_rules"]


def crosscoder_sharding_rules(config: CrosscoderConfig) -> dict[str, dict[str, int]]:
    """Heads are split over the 'head' mesh axis, features over 'model'.

    ``b_E`` (features only) is replicated over 'head': under head parallelism each head rank
    computes its partial sum ``x_h W_E[h]``, the partial sums are all-reduced over 'head', then
    ``b_E`` is added once. The buffer ``head_norm_weight`` (H,) is not a parameter but is per
    head, so it has a rule too (dim 0 on 'head'; replicated over 'model').
    """
    rules: dict[str, dict[str, int]] = {
        "W_E": {"head": 0, "model": 2},
        "b_E": {"model": 0},
        "W_D": {"head": 0, "model": 1},
        "b_D": {"head": 0},
        "head_norm_weight": {"head": 0},
    }
    if config.act_fn == "jumprelu":
        rules["activation.log_threshold"] = {"model": 0}
    return rules


def crosscoder_shard_config(config: CrosscoderConfig, counts: Mapping[str, int],
                            index: Mapping[str, int] | None = None) -> CrosscoderShardConfig:
    """The config of one shard when ``counts`` (``{"model": k, "head": h}``) split the crosscoder.

    - ``model``: ``d_sae // k`` features (every head's block of them);
    - ``head``: ``n_heads // h`` heads; shard ``j = index["head"]`` holds the contiguous block of
      heads ``[j * n / h, (j + 1) * n / h)``, so its ``hook_points`` (and ``dataset_norms``) are
      those heads'. Without ``index`` the shard is the first block (the sizes do not depend on it).

    The result is a :class:`~lmsae_crosscoder.config.CrosscoderShardConfig` (a shard may hold a
    single head). Raises :class:`~lmsae.errors.ShardingError` when a size does not divide or an
    axis cannot split a crosscoder (``sweep`` and ``data`` replicate the dictionary: ignored).
    """
    index = dict(index or {})
    sizes = {axis: int(n) for axis, n in counts.items()}
    unknown = sorted(a for a, n in sizes.items() if a not in ("model", "head", "data", "sweep") and n > 1)
    if unknown:
        raise ShardingError(f"the crosscoder cannot be split along {unknown[0]!r} (it splits features over "
                            "'model' and heads over 'head')")
    k, h = sizes.get("model", 1), sizes.get("head", 1)
    for axis, n in (("model", k), ("head", h)):
        if n < 1:
            raise ShardingError(f"[distributed] {axis} = {n}: a size must be >= 1")
    n_features, n_heads = config.n_features, config.n_heads
    if n_features % k:
        raise ShardingError(f"d_sae = {n_features} features do not split into {k} equal shards "
                            f"([distributed] model = {k})")
    if n_heads % h:
        raise ShardingError(f"hook_points: {n_heads} heads do not split into {h} equal shards "
                            f"([distributed] head = {h})")
    j = int(index.get("head", 0))
    if not 0 <= j < h:
        raise ShardingError(f"head shard index {j} outside [0, {h}) ([distributed] head = {h})")
    per = n_heads // h
    hooks = list(config.hook_points[j * per:(j + 1) * per])
    values = {f.name: getattr(config, f.name) for f in attrs.fields(type(config))}
    values.update(hook_points=hooks, d_sae=n_features // k, expansion_factor=None,
                  dataset_norms={hk: v for hk, v in config.dataset_norms.items() if hk in hooks})
    return CrosscoderShardConfig(**values)


def crosscoder_example_config() -> CrosscoderConfig:
    """A small TopK crosscoder over two layers' residual streams (16 dims, 64 features, k=4)."""
    return CrosscoderConfig(hook_points=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], d_model=16,
                            expansion_factor=4.0, act_fn="topk", top_k=4)


CROSSCODER_SPEC = ArchitectureSpec(
    config_class=CrosscoderConfig,
    model_class=Crosscoder,
    sharding_rules=crosscoder_sharding_rules,
    example_config=crosscoder_example_config,
    summary="crosscoder: one sparse code shared by several hook points or models (ReLU, JumpReLU, TopK, BatchTopK)",
    analysis_extras=crosscoder_analysis_extras,
    shard_config=crosscoder_shard_config,
)
