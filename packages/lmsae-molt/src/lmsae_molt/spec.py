"""The architecture record of MOLT: sharding rules, example config, analysis extras."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from lmsae.errors import ShardingError
from lmsae.records import ArchitectureSpec

from lmsae_molt.analysis import molt_analysis_extras
from lmsae_molt.config import MOLTConfig
from lmsae_molt.model import MixtureOfLinearTransforms
from lmsae_molt.sharding import GroupedDim

__all__ = ["MOLT_SPEC", "molt_example_config", "molt_shard_config", "molt_sharding_rules"]


def molt_sharding_rules(config: MOLTConfig) -> dict[str, dict[str, int]]:
    """Tensor-parallel layout: features are split over the 'model' mesh axis, per rank group.

    - ``U.<r>``, ``V.<r>``: dim 0 (the count axis of the group);
    - ``W_E`` dim 1, ``b_E`` and the JumpReLU ``log_threshold`` dim 0: these span ALL features, so
      their dim is a :class:`~lmsae_molt.sharding.GroupedDim` over the rank-group counts — shard i
      holds block i of every group, the same features as its slices of ``U.<r>``/``V.<r>``. A plain
      contiguous split of F would pair gate columns with other features' transforms (the
      reference's bug) whenever there are several groups. ``GroupedDim`` is an ``int``: readers of
      plain rules see the dim;
    - ``b_D``: replicated (added once: ``decode`` on the first 'model' rank, ``decode_linear`` on the
      others). MOLT has no buffers.
    """
    groups = config.counts
    rules: dict[str, dict[str, int]] = {"W_E": {"model": GroupedDim(1, groups)},
                                        "b_E": {"model": GroupedDim(0, groups)}}
    for r in config.ranks:
        rules[f"U.{r}"] = {"model": 0}
        rules[f"V.{r}"] = {"model": 0}
    if config.use_decoder_bias:
        rules["b_D"] = {}
    if config.act_fn == "jumprelu":
        rules["activation.log_threshold"] = {"model": GroupedDim(0, groups)}
    return rules


def molt_shard_config(config: MOLTConfig, counts: Mapping[str, int]) -> MOLTConfig:
    """The config of one 'model' shard: the same ranks, every count of ``rank_counts`` divided by k
    (the group-aware rules give shard i block i of every rank group: a smaller canonical MOLT).

    Raises :class:`~lmsae.errors.ShardingError` when k does not divide a count, or for any other
    axis of size > 1 (MOLT splits over 'model' only).
    """
    extra = sorted(a for a, n in counts.items() if a != "model" and int(n) > 1)
    if extra:
        raise ShardingError(f"MOLT has no {extra[0]!r} axis to split (its transforms split over 'model' only); "
                            f"set [distributed] {extra[0]} = 1")
    k = int(counts.get("model", 1))
    bad = [(r, c) for r, c in config.rank_groups if k < 1 or c % k]
    if bad:
        listed = ", ".join(f"rank {r}: {c}" for r, c in bad)
        raise ShardingError(f"rank_counts do not split into {k} equal shards ([distributed] model = {k}): every "
                            f"shard holds an equal block of each rank group, so each count must be divisible by "
                            f"{k} ({listed})")
    return attrs.evolve(config, rank_counts={r: c // k for r, c in config.rank_groups})


def molt_example_config() -> MOLTConfig:
    """A small TopK MOLT on one MLP (16 dims; 8 transforms of rank 1, 4 of rank 2, 2 of rank 4; k = 3)."""
    return MOLTConfig(hook_point_in="blocks.0.ln2.hook_normalized", hook_point_out="blocks.0.hook_mlp_out",
                      d_model=16, rank_counts={1: 8, 2: 4, 4: 2}, act_fn="topk", top_k=3)


MOLT_SPEC = ArchitectureSpec(
    config_class=MOLTConfig,
    model_class=MixtureOfLinearTransforms,
    sharding_rules=molt_sharding_rules,
    example_config=molt_example_config,
    summary="MOLT: sparse-gated mixture of low-rank linear transforms, an MLP replacement (ReLU, JumpReLU, "
            "TopK, BatchTopK)",
    analysis_extras=molt_analysis_extras,
    shard_config=molt_shard_config,
)
