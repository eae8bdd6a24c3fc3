"""Layer-wise TopK activations of the cross-layer transcoder.

Pre-activations have shape ``(token axes..., L, F)``: one or two token axes, then layers, then
features. Every module applies a ReLU, then keeps a subset of the entries (gradient flows only
to the kept ones) and zeroes the rest; ``k`` is a mutable, validated attribute so that the
trainer can schedule it. Per-token selections ignore the token mask; batch selections exclude
masked tokens (their outputs are zero and they do not count in ``n_tokens``).

- :class:`lmsae.nn.activations.TopK` (core), used for ``act_fn = "topk"``: the k largest of each
  token's features in each layer (the last axis).
- :class:`LayerTopK` (``"layertopk"``): the k largest of each token over layers × features.
- :class:`BatchTopKPerLayer` (``"batchtopk"``): in each layer separately, the ``k · n_tokens``
  largest over tokens × features.
- :class:`BatchLayerTopK` (``"batchlayertopk"``): the ``k · n_tokens`` largest over tokens ×
  layers × features (k is then the average number of active features per token, all layers
  together — the reference's docstring and code disagreed on this).

:func:`build_clt_activation` maps a :class:`~lmsae_clt.config.CLTConfig` to its module
(``"jumprelu"`` gets a core :class:`~lmsae.nn.activations.JumpReLU` of threshold shape ``(L, F)``).

Distributed (:func:`lmsae.distributed.parallel.current`): under feature parallelism each process
holds the same slice of every layer's features, ``(tokens..., L, F / model)``, and under data
parallelism its own tokens. Every selection is then the one a single process makes on the whole
batch and dictionary: the ``k``-th largest value is taken over the process group
(:func:`~lmsae.distributed.collectives.global_kth_value`; the per-token selections over the
``model`` group, the batch selections over ``data`` x ``model`` with ``n_tokens`` counted over
the ``data`` group) and the entries that are positive and at least that value are kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmsae.distributed.collectives import all_reduce, global_kth_value
from lmsae.distributed.parallel import current
from lmsae.errors import ShapeError
from lmsae.nn.activations import BatchTopK, JumpReLU, ReLU, TopK
from lmsae_clt.config import CLTConfig

__all__ = ["BatchLayerTopK", "BatchTopKPerLayer", "LayerTopK", "build_clt_activation"]


def _check_k(value: object, what: str) -> int:
    # bool is an int subclass; k=True is almost certainly a config mistake
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} k must be an integer >= 1, got {value!r}")
    return value


def _check_layered(h: Tensor, mask: Tensor | None, what: str) -> None:
    if h.ndim < 3:
        raise ShapeError(f"{what} needs pre-activations of shape (tokens..., layers, features), got {tuple(h.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(h.shape[:-2]):
        raise ShapeError(f"token mask has shape {tuple(mask.shape)} but the pre-activations of shape {tuple(h.shape)} "
                         f"have token shape {tuple(h.shape[:-2])}")


class _KModule(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        self._k = _check_k(value, type(self).__name__)

    def extra_repr(self) -> str:
        return f"k={self._k}"


class LayerTopK(_KModule):
    """ReLU, then the ``k`` largest entries of each token over all layers and features jointly."""

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(tokens..., L, F)`` -> same shape; the token mask is ignored (per-token selection)."""
        _check_layered(h, mask, "LayerTopK")
        flat = torch.relu(h).flatten(-2)
        ctx = current()
        if ctx is not None and ctx.feature_group is not None:
            # this process holds a slice of every layer's features: the global k-th value per token
            k = min(self._k, flat.shape[-1] * ctx.feature_shards)
            kth = global_kth_value(flat, k, ctx.feature_group)
            kept = torch.where((flat >= kth) & (flat > 0), flat, torch.zeros_like(flat))
            return kept.unflatten(-1, h.shape[-2:])
        k = min(self._k, flat.shape[-1])
        values, indices = flat.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(flat).scatter(-1, indices, values).unflatten(-1, h.shape[-2:])


class BatchTopKPerLayer(_KModule):
    """ReLU, then in each layer separately the ``k · n_tokens`` largest entries over tokens × features."""

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(tokens..., L, F)`` -> same shape; masked tokens are excluded from every layer's selection."""
        _check_layered(h, mask, "BatchTopKPerLayer")
        acts = torch.relu(h)
        if mask is not None:
            keep = (mask != 0)[..., None, None]
            # masked entries become 0: they can only be "selected" as zeros, which change nothing
            # and receive no gradient (the ``where`` blocks it)
            acts = torch.where(keep, acts, torch.zeros_like(acts))
            n_tokens = int((mask != 0).sum().item())
        else:
            n_tokens = math.prod(h.shape[:-2])
        n_layers, n_feat = h.shape[-2], h.shape[-1]
        per_layer = acts.reshape(-1, n_layers, n_feat).transpose(0, 1).reshape(n_layers, -1)  # (L, N·F)
        ctx = current()
        if ctx is not None and ctx.batch_group is not None:
            # tokens split over data ranks, every layer's features over model ranks: per layer, one
            # selection over the whole batch and every feature of that layer
            counts = torch.tensor([float(n_tokens), float(per_layer.shape[1])], dtype=torch.float64,
                                  device=per_layer.device)
            n_global, size_global = (int(v) for v in all_reduce(counts, ctx.data_group).tolist())
            total = min(self._k * n_global, size_global * ctx.feature_shards)
            if total == 0:
                return torch.zeros_like(acts)
            kth = global_kth_value(per_layer, total, ctx.batch_group, dim=1)  # (L, 1)
            kept = torch.where((per_layer >= kth) & (per_layer > 0), per_layer, torch.zeros_like(per_layer))
            return kept.reshape(n_layers, -1, n_feat).transpose(0, 1).reshape(h.shape)
        total = min(self._k * n_tokens, per_layer.shape[1])
        if total == 0:
            return torch.zeros_like(acts)
        values, indices = per_layer.topk(total, dim=1, sorted=False)
        kept = torch.zeros_like(per_layer).scatter(1, indices, values)
        return kept.reshape(n_layers, -1, n_feat).transpose(0, 1).reshape(h.shape)


class BatchLayerTopK(_KModule):
    """ReLU, then the ``k · n_tokens`` largest entries over tokens × layers × features jointly.

    The core :class:`~lmsae.nn.activations.BatchTopK` on the ``(tokens..., L·F)`` view: ``k`` is the
    average number of active features per token, all layers together. (Distributed, that module
    does the global selection: any split of the flattened entries over the group gives the same.)
    """

    def __init__(self, k: int):
        super().__init__(k)
        self._flat = BatchTopK(k)

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(tokens..., L, F)`` -> same shape; masked tokens are excluded."""
        _check_layered(h, mask, "BatchLayerTopK")
        self._flat.k = self._k
        return self._flat(h.flatten(-2), mask=mask).unflatten(-1, h.shape[-2:])


def build_clt_activation(config: CLTConfig) -> nn.Module:
    """The activation module of ``config.act_fn`` (see the module docstring)."""
    act = config.act_fn
    if act == "relu":
        return ReLU()
    if act == "jumprelu":
        return JumpReLU((config.n_layers, config.n_features), config.jumprelu_init_threshold, config.jumprelu_bandwidth)
    if act == "topk":
        return TopK(config.top_k)
    if act == "layertopk":
        return LayerTopK(config.top_k)
    if act == "batchtopk":
        return BatchTopKPerLayer(config.top_k)
    if act == "batchlayertopk":
        return BatchLayerTopK(config.top_k)
    raise ValueError(f"unknown CLT activation {act!r}")
