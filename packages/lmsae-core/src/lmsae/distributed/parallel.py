"""The parallel context of a forward pass: which process groups split the features and the tokens.

The trainer enters :func:`parallel` around a distributed step; code that selects across
features or tokens reads :func:`current`:

- the core's TopK (per token, over the features) and AuxK selection take the ``k``-th largest
  value over the ``model`` group (:func:`~lmsae.distributed.collectives.global_kth_value`), so each
  process keeps exactly the entries a single process would keep for the whole dictionary;
- BatchTopK takes the ``k * n_tokens``-th largest value over the ``data`` and ``model`` groups
  together (tokens and features are both split), with ``n_tokens`` counted over all data ranks.

Ties: an entry is kept when it is positive and at least the global ``k``-th value, which is the
single-process selection whenever the ``k``-th value is not tied with another positive entry
(single-process ``torch.topk`` breaks such ties arbitrarily too). Outside :func:`parallel` (a
single process), ``current()`` is None and nothing changes.

Plugin architectures read the context to split their own computations: a crosscoder with its
heads over the ``head`` group sums partial pre-activations with
:func:`~lmsae.distributed.collectives.reduce_sum` over :attr:`ParallelContext.head_group` and adds
a head-replicated bias on :meth:`ParallelContext.first` of ``head`` only (see docs/distributed.md:
a parameter replicated along an axis must contribute its gradient in shares that sum to the
total, because the trainer sums such gradients over the axis).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import attrs

from lmsae.distributed.mesh import Mesh

__all__ = ["ParallelContext", "current", "parallel"]


@attrs.frozen
class ParallelContext:
    """Process groups of one distributed forward pass (see the module docstring)."""

    mesh: Mesh

    @property
    def feature_group(self) -> Any:
        """Ranks holding the other feature shards of the same tokens (``model``)."""
        return self.mesh.group("model")

    @property
    def head_group(self) -> Any:
        """Ranks holding the other heads (``head``)."""
        return self.mesh.group("head")

    @property
    def data_group(self) -> Any:
        """Ranks holding the other token shards (``data``)."""
        return self.mesh.group("data")

    @property
    def batch_group(self) -> Any:
        """Ranks holding the other (tokens x features) blocks of one global batch (``data`` + ``model``)."""
        return self.mesh.group("data", "model")

    @property
    def feature_shards(self) -> int:
        return self.mesh.size("model")

    def first(self, axis: str) -> bool:
        """True on the first rank along ``axis`` (where an axis-replicated term is added once)."""
        return self.mesh.coord(axis) == 0


_CURRENT: contextvars.ContextVar[ParallelContext | None] = contextvars.ContextVar("lmsae_parallel", default=None)


def current() -> ParallelContext | None:
    """The context of the running distributed forward pass (None in a single process)."""
    return _CURRENT.get()


@contextlib.contextmanager
def parallel(context: ParallelContext | None) -> Iterator[ParallelContext | None]:
    """Run the body under ``context`` (None or a single-process mesh: no context)."""
    if context is None or not context.mesh.is_distributed:
        yield None
        return
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)
