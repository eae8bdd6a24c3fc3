"""Sharding rules in practice: slicing state dicts into shards and back, for any mesh.

An architecture's sharding rules map every state-dict entry (parameters; buffers too when they
are per feature or per head) to ``{mesh axis: tensor dim}``; an axis a rule does not name
replicates the tensor along it. Shard ``i`` of ``k`` along a dim is its ``i``-th contiguous
block, except for a :class:`GroupedDim`: an axis that is the concatenation of groups (MOLT's
features are grouped by rank), where shard ``i`` takes block ``i`` of every group, so that each
shard is itself a smaller model in canonical order.

Canonical order: what is saved is always the unsharded tensors; :func:`shard_state` and
:func:`unshard_state` convert at the shard boundary (the reference system interleaved features of
different ranks on save, upstream spec §15 item 8). Shards over several axes (``head`` then
``model``) are taken one axis after the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Self

import torch
from torch import Tensor

from lmsae.errors import ShardingError

__all__ = ["GroupedDim", "grouped_split", "local_feature_indices", "rule_dim", "shard_parameters", "shard_state",
           "shard_tensor", "unshard", "unshard_state", "unshard_tensor"]


class GroupedDim(int):
    """A sharding rule's tensor dim whose axis is a concatenation of groups of ``group_sizes``.

    ``GroupedDim(1, (512, 256))`` == 1 for any code that only wants the dim; group-aware code
    reads ``.group_sizes``. Pickle-free and JSON-serialisable as the plain dim.
    """

    group_sizes: tuple[int, ...]

    def __new__(cls, dim: int, group_sizes: Sequence[int]) -> Self:
        obj = super().__new__(cls, dim)
        sizes = tuple(int(s) for s in group_sizes)
        if not sizes or any(s < 1 for s in sizes):
            raise ShardingError(f"GroupedDim needs at least one group and positive group sizes, got {group_sizes!r}")
        obj.group_sizes = sizes
        return obj

    @property
    def dim(self) -> int:
        return int(self)

    def __getnewargs__(self) -> tuple[int, tuple[int, ...]]:  # copy/deepcopy rebuild it with its groups
        return (int(self), self.group_sizes)

    def __repr__(self) -> str:
        return f"GroupedDim({int(self)}, {self.group_sizes})"


def _check_k_i(k: int, i: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ShardingError(f"number of shards must be an integer >= 1, got {k!r}")
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < k:
        raise ShardingError(f"shard index must be an integer in [0, {k}), got {i!r}")


def grouped_split(sizes: Sequence[int], k: int, i: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: the slice of every group that shard ``i`` of ``k`` holds."""
    _check_k_i(k, i)
    out, offset = [], 0
    for g, size in enumerate(sizes):
        if size % k:
            raise ShardingError(f"group {g} has {size} features, which does not divide into {k} shards")
        block = size // k
        out.append((offset + i * block, offset + (i + 1) * block))
        offset += size
    return out


def shard_tensor(tensor: Tensor, dim: int | None, k: int, i: int) -> Tensor:
    """Shard ``i`` of ``k`` of ``tensor`` along ``dim`` (a plain or :class:`GroupedDim` dim; ``None``:
    replicated, returned as is)."""
    _check_k_i(k, i)
    if dim is None:
        return tensor
    d = int(dim)
    size = tensor.shape[d]
    sizes = dim.group_sizes if isinstance(dim, GroupedDim) else (size,)
    if sum(sizes) != size:
        raise ShardingError(f"grouped dim {d} has size {size} but its groups sum to {sum(sizes)} ({sizes})")
    pieces = [tensor.narrow(d, start, stop - start) for start, stop in grouped_split(sizes, k, i)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=d)


def unshard_tensor(shards: Sequence[Tensor], dim: int | None) -> Tensor:
    """Inverse of :func:`shard_tensor` over all ``k = len(shards)`` shards (replicated: shard 0,
    after checking that every shard holds the same values)."""
    if not shards:
        raise ShardingError("unshard needs at least one shard")
    if dim is None:
        if any(not torch.equal(s, shards[0]) for s in shards[1:]):
            raise ShardingError("a replicated parameter differs between shards")
        return shards[0]
    d, k = int(dim), len(shards)
    if not isinstance(dim, GroupedDim):
        return torch.cat(list(shards), dim=d)
    blocks = []
    for g, size in enumerate(dim.group_sizes):
        if size % k:
            raise ShardingError(f"group {g} has {size} features, which does not divide into {k} shards")
        block = size // k
        local_offset = sum(s // k for s in dim.group_sizes[:g])
        blocks.extend(s.narrow(d, local_offset, block) for s in shards)
    return torch.cat(blocks, dim=d)


def _dim_for(rules: Mapping[str, Mapping[str, int]], name: str, axis: str) -> int | None:
    try:
        rule = rules[name]
    except KeyError:
        raise ShardingError(f"parameter {name!r} has no sharding rule (every parameter needs one)") from None
    return rule.get(axis)


def shard_parameters(state: Mapping[str, Tensor], rules: Mapping[str, Mapping[str, int]], k: int, i: int,
                     axis: str = "model") -> dict[str, Tensor]:
    """The local state dict of shard ``i`` of ``k`` along mesh ``axis`` (other axes are ignored).

    Every entry of ``state`` needs a rule; :class:`GroupedDim` dims are sliced per group.
    """
    out = {}
    for name, t in state.items():
        dim = _dim_for(rules, name, axis)
        try:
            out[name] = shard_tensor(t, dim, k, i)
        except ShardingError as exc:
            raise ShardingError(f"{name}: {exc}") from None
    return out


def unshard(shards: Sequence[Mapping[str, Tensor]], rules: Mapping[str, Mapping[str, int]],
            axis: str = "model") -> dict[str, Tensor]:
    """Reassemble the full (canonical-order) state dict from every shard's local state dict."""
    if not shards:
        raise ShardingError("unshard needs at least one shard")
    names = list(shards[0])
    for j, s in enumerate(shards[1:], start=1):
        if list(s) != names:
            raise ShardingError(f"shard {j} holds parameters {sorted(s)}, shard 0 holds {sorted(names)}")
    out = {}
    for name in names:
        dim = _dim_for(rules, name, axis)
        try:
            out[name] = unshard_tensor([s[name] for s in shards], dim)
        except ShardingError as exc:
            raise ShardingError(f"{name}: {exc}") from None
    return out


def local_feature_indices(group_sizes: Sequence[int], k: int, i: int) -> Tensor:
    """Global (canonical) index of each local feature of shard ``i`` of ``k``, shape ``(F / k,)``."""
    return torch.cat([torch.arange(start, stop) for start, stop in grouped_split(group_sizes, k, i)])


def rule_dim(rules: Mapping[str, Mapping[str, int]], name: str, axis: str, *, strict: bool = True) -> int | None:
    """The dim of ``name`` sharded along ``axis`` (None: replicated). Without a rule: an error when
    ``strict``, else replicated (buffers that are not per feature)."""
    if name not in rules:
        if strict:
            raise ShardingError(f"state entry {name!r} has no sharding rule (every parameter needs one)")
        return None
    return rules[name].get(axis)


def shard_state(state: Mapping[str, Tensor], rules: Mapping[str, Mapping[str, int]],
                layout: Mapping[str, tuple[int, int]], parameters: set[str] | None = None) -> dict[str, Tensor]:
    """This shard's state dict: ``layout`` maps each split axis to ``(index, count)``.

    Entries in ``parameters`` (default: all) need a rule; others (buffers) without one are replicated.
    """
    out = {}
    for name, tensor in state.items():
        strict = parameters is None or name in parameters
        t = tensor
        for axis, (i, k) in layout.items():
            if k == 1:
                continue
            try:
                t = shard_tensor(t, rule_dim(rules, name, axis, strict=strict), k, i)
            except ShardingError as exc:
                raise ShardingError(f"{name} along {axis!r}: {exc}") from None
        out[name] = t.contiguous().clone()
    return out


def unshard_state(shards: Mapping[tuple[int, ...], Mapping[str, Tensor]], rules: Mapping[str, Mapping[str, int]],
                  axes: Sequence[str], counts: Sequence[int], parameters: set[str] | None = None) -> dict[str, Tensor]:
    """The full state dict from every shard: ``shards[(i_axis0, i_axis1, ...)]`` for ``axes`` split in
    ``counts`` parts (inverse of :func:`shard_state` applied axis after axis)."""
    if not axes:
        (only,) = shards.values()
        return dict(only)
    axis, k = axes[0], counts[0]
    rest_axes, rest_counts = list(axes[1:]), list(counts[1:])
    # reassemble the inner axes first, per index of the outer one
    partial = []
    for i in range(k):
        inner = {key[1:]: s for key, s in shards.items() if key[0] == i}
        if not inner:
            raise ShardingError(f"shard {i} of axis {axis!r} is missing")
        partial.append(unshard_state(inner, rules, rest_axes, rest_counts, parameters))
    if k == 1:
        return partial[0]
    names = list(partial[0])
    out = {}
    for name in names:
        strict = parameters is None or name in parameters
        try:
            out[name] = unshard_tensor([p[name] for p in partial], rule_dim(rules, name, axis, strict=strict))
        except (KeyError, ShardingError) as exc:
            raise ShardingError(f"{name} along {axis!r}: {exc}") from None
    return out
