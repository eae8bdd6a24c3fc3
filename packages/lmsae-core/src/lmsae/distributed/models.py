"""A dictionary split over the mesh: build this process's shard, gather the canonical whole.

The parallel axes that split a dictionary are ``head`` (outer) and ``model`` (inner): this
process holds block ``coord("head")`` of the heads and, inside it, block ``coord("model")`` of the
features, as the architecture's sharding rules say. The shard is an instance of the same
architecture built from :attr:`~lmsae.records.ArchitectureSpec.shard_config`; the canonical
(unsharded) state is the only thing ever saved as a dictionary.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lmsae.distributed.mesh import Mesh
from lmsae.distributed.sharding import rule_dim, shard_state, unshard_tensor
from lmsae.errors import ShardingError

__all__ = ["PARALLEL_AXES", "gather_state", "layout_of", "shard_config_for", "shard_model"]

#: the mesh axes that split a dictionary, outer first
PARALLEL_AXES: tuple[str, ...] = ("head", "model")


def layout_of(mesh: Mesh) -> dict[str, tuple[int, int]]:
    """``{axis: (index, count)}`` of this process along the axes that split the dictionary."""
    return {a: (mesh.coord(a), mesh.size(a)) for a in PARALLEL_AXES if mesh.size(a) > 1}


def shard_config_for(spec: Any, config: Any, layout: Mapping[str, tuple[int, int]]) -> Any:
    """The config of the shard at ``layout`` (the config itself when nothing is split)."""
    if not layout:
        return config
    if spec.shard_config is None:
        raise ShardingError(f"architecture {spec.name!r} supports data parallelism only (its plugin gives no "
                            f"shard_config); set [distributed] {' and '.join(f'{a} = 1' for a in layout)}")
    counts = {a: k for a, (_, k) in layout.items()}
    fn = spec.shard_config
    try:
        accepts_index = "index" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        accepts_index = False
    if accepts_index:
        return fn(config, counts, index={a: i for a, (i, _) in layout.items()})
    return fn(config, counts)


def _parameter_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def shard_model(full: torch.nn.Module, spec: Any, mesh: Mesh) -> torch.nn.Module:
    """This process's shard of the dictionary ``full`` (a new module; ``full`` is unchanged)."""
    layout = layout_of(mesh)
    if not layout:
        return full
    rules = spec.sharding_rules(full.config)
    config = shard_config_for(spec, full.config, layout)
    shard = spec.model_class(config)
    first = next(full.parameters(), None)
    if first is not None:  # before loading: the state must not pass through another dtype
        shard.to(device=first.device, dtype=first.dtype)
    state = shard_state(full.state_dict(), rules, layout, parameters=_parameter_names(full))
    own = shard.state_dict()
    wrong = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape}
    if wrong:
        name, (got, want) = next(iter(wrong.items()))
        raise ShardingError(f"{spec.name}: the sharding rules give {name} the shape {got} but the shard config "
                            f"builds {want} (shard_config and sharding_rules disagree)")
    shard.load_state_dict(state)
    return shard


def _gather_list(tensor: Tensor, group: Any) -> list[Tensor]:
    t = tensor.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def gather_state(shard: torch.nn.Module, rules: Mapping[str, Mapping[str, int]], mesh: Mesh,
                 state: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The canonical state dict of the whole dictionary on every process (collective over the
    ``head`` and ``model`` groups). ``state``: a state of the shard's shape (default: its own)."""
    state = dict(shard.state_dict() if state is None else state)
    params = _parameter_names(shard)
    for axis in reversed(PARALLEL_AXES):  # undo the inner split first
        group = mesh.group(axis)
        if group is None:
            continue
        for name in list(state):
            dim = rule_dim(rules, name, axis, strict=name in params)
            parts = _gather_list(state[name], group)
            try:
                state[name] = unshard_tensor(parts, dim)
            except ShardingError as exc:
                raise ShardingError(f"{name} along {axis!r}: {exc}") from None
    return {k: v.clone() for k, v in state.items()}
