"""The ``cached`` activation source: chunks of an activation cache written by
:class:`lmsae.activations.cache.ActivationWriter`, verified as they are read.

Users select it with ``[[activations.sources]] type = "cached"`` and ``path = "<cache dir>"``.
Each yielded chunk is one chunk file set of the cache: ``{hook: (S, T, d) float32, "tokens":
(S, T) int64, "mask": (S, T) bool, "meta": list of S dicts}`` (always whole sequences; the
activation factory flattens them in the ``"tokens"`` layout).

Chunk order and data parallelism: the *global chunk order* lists the selected shards by
ascending index and, within a shard, its chunks in order. Under data parallelism
(``context.shard = (rank, world)``) rank ``r`` reads global positions ``r, r + W, r + 2W, ...``
(``W = world``): the ranks' chunks are disjoint and together cover the selection. Ranks may
get one chunk more or less than each other, and chunks may differ in size (the last chunk of a
shard can be short); nothing is dropped.

The position is ``{"chunk": chunks delivered to the consumer, "offset": 0}``; chunks read ahead
by the prefetch thread but not yet delivered do not count, so resuming is exact.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch

from lmsae.activations.cache import ActivationCache, ChunkRef
from lmsae.activations.protocol import Batch, SourceContext
from lmsae.config.base import SourceConfig
from lmsae.config.fields import config_class, each, non_empty, non_negative, one_of, option
from lmsae.errors import CheckpointError
from lmsae.records import SourceSpec

__all__ = ["CACHED_SOURCE_SPEC", "CachedSource", "CachedSourceConfig", "build_cached_source"]

log = logging.getLogger("lmsae")


@config_class
class CachedSourceConfig(SourceConfig):
    """Activations read back from a cache written by the activation-generation task."""

    name: ClassVar[str] = "cached"

    path: str = option(doc="Directory of the activation cache (the one holding manifest.json).",
                       validator=non_empty())
    verify: Literal["none", "size", "sha256"] = option(
        "size", doc="Checks on every chunk file as it is read: 'size' compares byte counts with the manifest "
                    "(cheap; catches truncation), 'sha256' compares checksums (exact, but hashes every byte), "
                    "'none' skips both. Files are always parsed and shape-checked, and tokens are compared "
                    "across hook points.",
        validator=one_of("none", "size", "sha256"))
    prefetch_chunks: int = option(
        2, doc="Chunks read ahead by a background thread (0 = read in the consuming thread).",
        validator=non_negative())
    shards: list[int] | None = option(
        None, doc="Cache shards to read (unset = all), in ascending order. Under data parallelism the chunks "
                  "of these shards are dealt round-robin to the ranks.",
        validator=[non_empty(), each(non_negative())])


class _Prefetcher:
    """Reads ``read(i)`` for ``i`` in ``positions`` on a background thread, at most ``depth`` ahead
    of the consumer. An exception is delivered in place of the chunk that raised it, so the
    consumer sees the chunks before it first, exactly as without prefetching."""

    _END = object()

    def __init__(self, read: Callable[[int], Batch], positions: range, depth: int):
        self._read = read
        self._positions = positions
        self._slots = threading.Semaphore(depth)
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmsae-cache-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for position in self._positions:
            # Wait for a free slot, but notice a close() while waiting.
            while not self._slots.acquire(timeout=0.05):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            try:
                item: Any = (position, self._read(position), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                self._queue.put((position, None, exc))
                return
            self._queue.put(item)
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            position, chunk, exc = item
            if exc is not None:
                raise exc
            self._slots.release()
            yield position, chunk

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class CachedSource:
    """An :class:`~lmsae.activations.protocol.ActivationStream` over an activation cache.

    Yields the hook points in ``context.hook_points`` (every cached hook point when empty) plus
    ``"tokens"``, ``"mask"`` and ``"meta"``, moved to ``context.device``; activations are cast
    from the storage dtype to float32.

    Raises:
        DataError: the cache's manifest is missing or invalid, a requested hook point or shard is
            not in the cache (naming it and listing what is cached); while iterating, a chunk
            file is missing, truncated, corrupt or inconsistent (naming the file and the hook).
    """

    def __init__(self, config: CachedSourceConfig, context: SourceContext):
        rank, world = context.shard
        if not 0 <= rank < world:
            raise ValueError(f"context.shard must be (rank, world) with 0 <= rank < world, got {context.shard}")
        self.config = config
        self.cache = ActivationCache(config.path)
        self.hook_points = self.cache.check_hooks(tuple(context.hook_points))
        self.device = torch.device(context.device)
        selected = self.cache.chunks(config.shards)
        self._chunks: list[ChunkRef] = selected[rank::world]
        unfinished = [i for i in self.cache.unfinished_shards() if config.shards is None or i in config.shards]
        if unfinished:
            log.warning("activation cache %s: shard(s) %s are not finished; reading the chunks written so far",
                        self.cache.directory, unfinished)
        #: chunks delivered to the consumer
        self.position = 0
        # Bumped by load_state_dict: a generator started before it stops instead of moving
        # the restored position.
        self._generation = 0

    @property
    def n_chunks(self) -> int:
        """Chunks this process reads in total."""
        return len(self._chunks)

    @property
    def chunk_refs(self) -> list[ChunkRef]:
        """This process's chunks, in reading order."""
        return list(self._chunks)

    def _read(self, position: int) -> Batch:
        chunk = self.cache.read_chunk(self._chunks[position], self.hook_points, self.config.verify)
        if self.device.type != "cpu":
            chunk = {k: v if k == "meta" else v.to(self.device) for k, v in chunk.items()}
        return chunk

    def __iter__(self) -> Iterator[Batch]:
        """Yield chunks from :attr:`position` on."""
        return self._iterate()

    def _iterate(self) -> Iterator[Batch]:
        generation = self._generation
        positions = range(self.position, len(self._chunks))
        if self.config.prefetch_chunks == 0:
            for position in positions:
                chunk = self._read(position)
                if generation != self._generation:
                    return
                # Advance before yielding: the consumer holds this chunk now.
                self.position = position + 1
                yield chunk
            return
        prefetcher = _Prefetcher(self._read, positions, self.config.prefetch_chunks)
        try:
            for position, chunk in prefetcher:
                if generation != self._generation:
                    return
                self.position = position + 1
                yield chunk
        finally:
            prefetcher.close()

    def state_dict(self) -> dict[str, Any]:
        """``{"chunk": chunks delivered, "offset": 0}`` (whole chunks are always delivered)."""
        return {"chunk": self.position, "offset": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; the next iteration continues there.

        Raises:
            CheckpointError: the state is malformed or lies past this process's chunks.
        """
        chunk = state.get("chunk") if isinstance(state, dict) else None
        offset = state.get("offset", 0) if isinstance(state, dict) else None
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0 or offset != 0:
            raise CheckpointError(f"cached source state must be {{'chunk': int >= 0, 'offset': 0}}, got {state!r}")
        if chunk > len(self._chunks):
            raise CheckpointError(f"cached source position {chunk} is past the end of this process's "
                                  f"{len(self._chunks)} chunks of {self.cache.directory} (did the cache change?)")
        self.position = chunk
        self._generation += 1

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.cache.directory)!r}, hooks={list(self.hook_points)}, "
                f"position={self.position}/{len(self._chunks)})")


def build_cached_source(config: CachedSourceConfig, context: SourceContext) -> CachedSource:
    """Source factory registered under ``type = "cached"``: ``factory(config, context)``."""
    return CachedSource(config, context)


CACHED_SOURCE_SPEC = SourceSpec(config_class=CachedSourceConfig, factory=build_cached_source,
                                summary="activations read from a sharded safetensors cache (verified, prefetched)")
