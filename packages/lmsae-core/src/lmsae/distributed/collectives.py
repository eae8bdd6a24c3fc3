"""Collectives the core runs for every architecture (no-ops on a ``None`` group).

- :func:`reduce_sum`: all-reduce (sum) whose backward is the identity. Used on quantities every
  rank of the group then uses identically (partial reconstructions, feature-summed losses): the
  gradient each rank receives for its own partial sum is exactly the loss gradient.
- :func:`copy_to_group`: identity whose backward all-reduces (sum) the gradient, its dual.
- :func:`all_reduce` / :func:`all_gather` without autograd.
- :func:`global_kth_value`: the k-th largest value over a dimension split across a group, for
  exact feature-parallel TopK and BatchTopK.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather", "all_reduce", "broadcast_object", "copy_to_group", "global_kth_value", "reduce_sum"]


def _size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(tensor: Tensor, group: Any, op: str = "sum") -> Tensor:
    """A reduced copy of ``tensor`` over ``group`` (``op``: sum, max, min); no autograd."""
    if group is None:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    out = tensor.detach().clone().contiguous()
    if out.dtype == torch.bool:
        out = out.to(torch.uint8)
        dist.all_reduce(out, op=ops[op], group=group)
        return out.bool()
    dist.all_reduce(out, op=ops[op], group=group)
    return out


def all_gather(tensor: Tensor, group: Any, dim: int = 0) -> Tensor:
    """Every rank's ``tensor`` concatenated along ``dim`` in group-rank order (same shapes); no autograd."""
    if group is None:
        return tensor
    t = tensor.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=dim)


class _ReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        out = tensor.clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def reduce_sum(tensor: Tensor, group: Any) -> Tensor:
    """Sum of ``tensor`` over ``group``; gradient passes through unchanged (see the module docstring)."""
    if group is None:
        return tensor
    return _ReduceSum.apply(tensor, group)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        out = grad.clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def copy_to_group(tensor: Tensor, group: Any) -> Tensor:
    """Identity forward; backward sums the gradient over ``group``. Put it where a tensor that
    every rank holds identically enters a computation split across the group (e.g. a
    crosscoder's shared code entering each rank's own heads' decoders)."""
    if group is None:
        return tensor
    return _CopyToGroup.apply(tensor, group)


def global_kth_value(values: Tensor, k: int | Tensor, group: Any, dim: int = -1) -> Tensor:
    """The ``k``-th largest entry along ``dim`` over the concatenation of every rank's ``values``.

    Each rank contributes its own ``min(k, size)`` largest entries (the global top k cannot hold
    more of any one rank's), gathered along ``dim``. ``k`` must not exceed the global size.
    Returns ``values`` reduced along ``dim`` (keepdim) — detached.
    """
    values = values.detach()
    local_k = min(int(k), values.shape[dim])
    top = values.topk(local_k, dim=dim, sorted=False).values if local_k > 0 else values.narrow(dim, 0, 0)
    if group is not None:
        # ranks may hold different local sizes only in their last shard; pad with -inf
        width = torch.tensor([top.shape[dim]], dtype=torch.int64, device=top.device)
        widest = int(all_reduce(width, group, "max"))
        if top.shape[dim] < widest:
            pad_shape = list(top.shape)
            pad_shape[dim] = widest - top.shape[dim]
            top = torch.cat([top, top.new_full(pad_shape, float("-inf"))], dim=dim)
        top = all_gather(top, group, dim=dim)
    return top.topk(int(k), dim=dim, sorted=False).values.amin(dim=dim, keepdim=True)


def broadcast_object(obj: Any, group: Any, src: int = 0) -> Any:
    """``obj`` (JSON-serialisable) of group rank ``src`` on every rank of ``group`` (sent as JSON text)."""
    if group is None:
        return obj
    import json

    source = dist.get_global_rank(group, src)
    mine = dist.get_rank() == source
    payload = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8) if mine else None
    length = torch.tensor([payload.numel() if mine else 0], dtype=torch.int64)
    dist.broadcast(length, src=source, group=group)
    buffer = payload if mine else torch.empty(int(length), dtype=torch.uint8)
    dist.broadcast(buffer, src=source, group=group)
    return obj if mine else json.loads(bytes(buffer.tolist()).decode())
