"""Group-aware sharding (:class:`GroupedDim`) now lives in the core, :mod:`lmsae.distributed.sharding`;
this module re-exports it for code written against lmsae-molt 0.1.

MOLT's per-feature tensors (``W_E`` (d, F), ``b_E`` (F,), the JumpReLU threshold) have a feature
axis that is the concatenation of rank groups, while the transforms ``U.<r>`` / ``V.<r>`` are split
per group; a ``GroupedDim`` rule splits the gate columns per group too, so a shard pairs every
gate with its own transform (the reference system did not, upstream spec §15 item 8).
"""

from lmsae.distributed.sharding import (
    GroupedDim,
    grouped_split,
    local_feature_indices,
    shard_parameters,
    shard_tensor,
    unshard,
    unshard_tensor,
)

__all__ = ["GroupedDim", "grouped_split", "local_feature_indices", "shard_parameters", "shard_tensor",
           "unshard", "unshard_tensor"]
