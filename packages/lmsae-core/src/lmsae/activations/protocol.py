"""What flows from activation sources to the trainer.

A **batch** is a dict: hook-point name -> float tensor, plus

- ``"mask"``: bool tensor over the token axes (False for padding/BOS/ignored tokens),
- ``"tokens"``: int64 token ids over the token axes (optional; -1 where unknown),
- ``"meta"``: optional list of per-sequence dicts (sequence layout only).

Layouts: ``"tokens"`` gives per-token tensors ``(batch, d)`` with a ``(batch,)`` mask;
``"sequences"`` gives ``(batch, context, d)`` with a ``(batch, context)`` mask.

An **activation stream** is an iterable of batches that can save and restore its position, so
that a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, Protocol, runtime_checkable

import attrs
import torch

Layout = Literal["tokens", "sequences"]
Batch = dict[str, Any]
RESERVED_KEYS = frozenset({"mask", "tokens", "meta"})


@runtime_checkable
class ActivationStream(Protocol):
    """An iterable of batches with a resumable position."""

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches, continuing after the last batch yielded (or restored)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position: nested dicts of JSON values and torch tensors."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`."""
        ...


@attrs.define
class SourceContext:
    """What a source factory is given besides its config: ``factory(config, context)``."""

    #: hook points the consumer needs (a source must provide all of them)
    hook_points: tuple[str, ...]
    #: "tokens" (per-token rows) or "sequences"
    layout: Layout = "tokens"
    #: seed of everything random in the source
    seed: int = 0
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    #: the registry (sources that need a language model look the backend up here)
    registry: Any = None
    #: data-parallel shard of this process (rank, world size)
    shard: tuple[int, int] = (0, 1)
    #: show progress bars
    progress: bool = True
    #: loads the run's language model on first use (None when the run configures no [model]);
    #: sources that turn text into activations call it, and every caller gets the same instance
    language_model: Any = None
