"""Mix activation sources and cut their chunks into fixed-size, optionally shuffled batches.

Pipeline of :class:`ActivationFactory` (one step per chunk pulled)::

    sources --(weighted random pick, renormalised over the sources still running)--> chunk
      --(validate, flatten sequences in the "tokens" layout, drop masked tokens, cast)-->
      buffer --(shuffle on every refill when shuffle_buffer > 0)--> batches of batch_size rows

A *row* is a token in the ``"tokens"`` layout and a sequence in the ``"sequences"`` layout.

The whole position of the stream (each source's position, which sources are exhausted, both
random generators and the rows held in the buffer) is returned by
:meth:`ActivationFactory.state_dict`, so a run resumed from it sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch import Tensor

from lmsae.activations.protocol import RESERVED_KEYS, ActivationStream, Batch, Layout, SourceContext
from lmsae.config.base import Config, SourceConfig
from lmsae.config.fields import config_class, non_empty, non_negative, one_of, option, positive
from lmsae.errors import CheckpointError, DataError, PluginError

__all__ = ["ActivationFactory", "ActivationsConfig", "build_activation_stream"]

DTypeName = Literal["float32", "float16", "bfloat16", "float64"]
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_LAYOUTS = ("tokens", "sequences")

_STATE_FORMAT = "lmsae.activation_factory"
_STATE_VERSION = 2

# Independent random streams derived from the one config seed (see _generator).
_STREAM_MIX = 0
_STREAM_SHUFFLE = 1


@config_class
class ActivationsConfig(Config):
    """Where training activations come from and how they are batched (``[activations]``)."""

    sources: list[SourceConfig] = option(
        doc="Activation sources ([[activations.sources]] tables, each with a 'type'). With several, "
            "each chunk is drawn from a source picked at random in proportion to its weight.",
        validator=non_empty())
    batch_size: int = option(
        4096, doc="Rows per batch: tokens in the 'tokens' layout, sequences in the 'sequences' layout.",
        validator=positive())
    layout: Literal["tokens", "sequences"] = option(
        "tokens", doc="'tokens': batches of single tokens (batch, d); 'sequences': whole sequences "
                      "(batch, context, d).",
        validator=one_of(*_LAYOUTS))
    shuffle_buffer: int = option(
        0, doc="Rows held in a shuffle buffer (0 = no shuffling). The buffer is filled to this size and "
               "shuffled, batches are taken while it holds more than half of it, then it is refilled.",
        validator=non_negative())
    prefetch: int = option(
        2, doc="Batches prepared ahead by a background thread, so that producing activations (a language-model "
               "forward pass, reading a cache) overlaps with training (0 = no thread).", validator=non_negative())
    remainder: Literal["drop", "keep"] = option(
        "drop", doc="What to do with the last incomplete batch at the end of a finite stream: 'drop' it "
                    "(every batch has exactly batch_size rows; best for BatchTopK) or 'keep' it.",
        validator=one_of("drop", "keep"))
    dtype: DTypeName | None = option(
        None, doc="Cast activation tensors to this dtype (unset keeps the sources' dtype).",
        validator=one_of(None, *_DTYPES))
    seed: int = option(0, doc="Seed of source mixing and of shuffling.", validator=non_negative())
    drop_masked_tokens: bool = option(
        True, doc="In the 'tokens' layout, remove tokens whose mask is False (padding, BOS...) before "
                  "batching, so every row is a real token.")


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for ``(seed, stream)``; SeedSequence makes the streams independent."""
    state = np.random.SeedSequence(entropy=seed, spawn_key=(stream,)).generate_state(1, np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


@attrs.define
class _Rows:
    """Rows held by the factory: tensors sharing a leading length, plus optional per-row meta."""

    tensors: dict[str, Tensor]
    meta: list[Any] | None
    rows: int

    def index(self, index: Tensor) -> _Rows:
        tensors = {k: v[index.to(v.device)] for k, v in self.tensors.items()}
        meta = None if self.meta is None else [self.meta[i] for i in index.tolist()]
        return _Rows(tensors, meta, int(index.numel()))

    def split(self, n: int) -> tuple[_Rows, _Rows]:
        head = _Rows({k: v[:n] for k, v in self.tensors.items()}, None if self.meta is None else self.meta[:n], n)
        tail = _Rows({k: v[n:] for k, v in self.tensors.items()}, None if self.meta is None else self.meta[n:],
                     self.rows - n)
        return head, tail


@attrs.define
class _Signature:
    """What every chunk must look like: same keys, dtypes and trailing shapes as the first."""

    origin: str
    keys: tuple[str, ...]
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    has_meta: bool

    @classmethod
    def of(cls, rows: _Rows, origin: str) -> _Signature:
        shapes = {k: (tuple(v.shape[1:]), v.dtype) for k, v in rows.tensors.items()}
        return cls(origin, tuple(rows.tensors), shapes, rows.meta is not None)


def _concat(parts: list[_Rows]) -> _Rows:
    if len(parts) == 1:
        return parts[0]
    # Rows restored from a checkpoint live on the CPU; follow the device of the newest chunk.
    newest = parts[-1].tensors
    tensors = {k: torch.cat([p.tensors[k].to(newest[k].device) for p in parts]) for k in newest}
    meta = None
    if parts[-1].meta is not None:
        meta = [m for p in parts for m in (p.meta or [])]
    return _Rows(tensors, meta, sum(p.rows for p in parts))


class ActivationFactory:
    """Mixes several activation streams into batches of exactly ``config.batch_size`` rows.

    Args:
        config: batching, shuffling, casting and seed settings (``config.sources`` is not read:
            the built ``sources`` are passed instead).
        sources: the streams to mix, each an :class:`ActivationStream` yielding chunk dicts.
        weights: one positive sampling weight per source, in the same order.
        layout: ``"tokens"`` or ``"sequences"``; defaults to ``config.layout``.
        device: where rows restored by :meth:`load_state_dict` are put (checkpoints usually hold
            CPU copies); ``None`` leaves them where they are. Rows are moved to the device of the
            incoming chunks when they are joined in any case.

    Batches are dicts ``{hook: (B, d), "mask": (B,) bool, ["tokens": (B,) int64]}`` in the
    ``"tokens"`` layout and ``{hook: (B, T, d), "mask": (B, T), ["tokens": (B, T)],
    ["meta": list of B dicts]}`` in the ``"sequences"`` layout, with ``B = batch_size`` except
    for a last partial batch when ``remainder="keep"``. Every chunk must have the same keys, dtypes
    (after ``dtype`` casting) and trailing shapes. Chunks in the ``"tokens"`` layout may be per-token
    ``(N, d)`` or per-sequence ``(N, T, d)`` (flattened to ``N*T`` rows; meta is dropped). A chunk
    without ``"mask"`` is taken as all real tokens.

    Mixing: each chunk comes from a source picked among those not yet exhausted, with probability
    proportional to its weight among them; the stream ends when every source is exhausted.

    Resume: :meth:`state_dict` may be called between any two batches; the state it returns
    already counts every batch handed out so far, so ``load_state_dict`` on a freshly built
    factory (with freshly built sources) continues with exactly the batches that would have
    followed. Buffered rows are part of the state as tensors that share memory with the live
    buffer (the factory never writes into them, it only replaces them).

    Raises (while iterating):
        DataError: a chunk is malformed or does not match the chunks before it (naming the source
            index and the key).
    """

    def __init__(
        self,
        config: ActivationsConfig,
        sources: Sequence[ActivationStream],
        weights: Sequence[float],
        *,
        layout: Layout | None = None,
        device: torch.device | str | None = None,
    ):
        layout = config.layout if layout is None else layout
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        sources = list(sources)
        if not sources:
            raise ValueError("ActivationFactory needs at least one source")
        for i, source in enumerate(sources):
            if not isinstance(source, ActivationStream):
                raise PluginError(
                    f"activation source {i} ({type(source).__name__}) is not resumable: a source must be "
                    "iterable and implement state_dict() and load_state_dict()")
        weights = list(weights)
        if len(weights) != len(sources):
            raise ValueError(f"got {len(weights)} weights for {len(sources)} sources")
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ValueError(f"weight of source {i} must be a finite number > 0, got {w!r}")

        self.config = config
        self.layout: Layout = layout
        self.device = None if device is None else torch.device(device)
        self.batch_size = config.batch_size
        self.sources = sources
        self.weights = [float(w) for w in weights]
        self._weights = torch.tensor(self.weights, dtype=torch.float64)
        self._dtype = None if config.dtype is None else _DTYPES[config.dtype]
        self._iters: list[Iterator[Batch] | None] = [None] * len(sources)
        self._exhausted = [False] * len(sources)
        self._mix_generator = _generator(config.seed, _STREAM_MIX)
        self._shuffle_generator = _generator(config.seed, _STREAM_SHUFFLE)
        # Row blocks admitted to the (shuffle) buffer, concatenated lazily (cat on every chunk
        # would be quadratic).
        self._buffer: list[_Rows] = []
        self._rows = 0
        # Rows pulled from sources but not yet admitted, first in first out. Admitting exactly the
        # rows needed (not whole chunks) makes the batches independent of how sources cut their
        # chunks: a cached stream and a live one give the same batches for the same seed.
        self._pending: list[_Rows] = []
        self._pending_rows = 0
        self._signature: _Signature | None = None

    # ------------------------------------------------------------------ iteration

    @property
    def exhausted(self) -> tuple[bool, ...]:
        """For each source, whether it has run out."""
        return tuple(self._exhausted)

    @property
    def buffered_rows(self) -> int:
        """Rows currently held (pulled from sources but not yet handed out)."""
        return self._rows

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches, continuing after the last one handed out (or restored)."""
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # All state was updated before this point, so state_dict() now counts this batch.
            yield batch

    def _next_batch(self) -> Batch | None:
        """The next batch, or None at the end of the stream; a pure function of the state."""
        size, capacity = self.batch_size, self.config.shuffle_buffer
        # Refill when a batch cannot be cut, or when the shuffle buffer is at most half full.
        if self._rows < size or 2 * self._rows <= capacity:
            admitted = False
            target = max(size, capacity)
            while self._rows < target:
                if self._pending_rows == 0:
                    pulled_chunk = self._pull()
                    if pulled_chunk is None:
                        break
                    self._append(*pulled_chunk)
                    continue
                self._admit(target - self._rows)
                admitted = True
            if admitted and capacity > 0:
                self._shuffle()
        if self._rows >= size:
            return self._take(size)
        # Only reached once every source is exhausted: the refill stopped short of a batch.
        if self._rows > 0 and self.config.remainder == "keep":
            return self._take(self._rows)
        self._buffer, self._rows = [], 0
        self._pending, self._pending_rows = [], 0
        return None

    def _pick(self) -> int | None:
        """Index of the source to read next, or None when all are exhausted."""
        active = [i for i, done in enumerate(self._exhausted) if not done]
        if not active:
            return None
        if len(active) == 1:
            return active[0]
        # Renormalised over the sources still running, in config order.
        cumulative = torch.cumsum(self._weights[active], 0)
        u = torch.rand((), generator=self._mix_generator, dtype=torch.float64) * cumulative[-1]
        k = int(torch.searchsorted(cumulative, u, right=True))
        return active[min(k, len(active) - 1)]

    def _pull(self) -> tuple[_Rows, int] | None:
        """``(chunk, source index)`` from a randomly picked running source, or None when all are
        exhausted."""
        while True:
            i = self._pick()
            if i is None:
                return None
            it = self._iters[i]
            if it is None:
                it = self._iters[i] = iter(self.sources[i])
            try:
                raw = next(it)
            except StopIteration:
                self._exhausted[i] = True
                self._iters[i] = None
                continue
            return self._normalise(raw, i), i

    def _normalise(self, chunk: Any, i: int) -> _Rows:
        """Validate one chunk of source ``i`` and bring it to the row format of the layout."""
        where = f"activation source {i}"
        if not isinstance(chunk, Mapping):
            raise DataError(f"{where} yielded a {type(chunk).__name__}, expected a dict of tensors")
        meta = chunk.get("meta")
        tensors: dict[str, Tensor] = {}
        for key, value in chunk.items():
            if key == "meta":
                continue
            if not isinstance(key, str):
                raise DataError(f"{where}: batch keys must be strings, got {key!r}")
            if not isinstance(value, Tensor):
                raise DataError(f"{where}: {key!r} is a {type(value).__name__}, expected a tensor")
            tensors[key] = value
        hooks = [k for k in tensors if k not in RESERVED_KEYS]
        if not hooks:
            raise DataError(f"{where} yielded a batch without activations (keys: {sorted(tensors)})")
        for key in hooks:
            if tensors[key].ndim not in (2, 3):
                raise DataError(f"{where}: {key!r} has shape {tuple(tensors[key].shape)}, expected "
                                "(rows, d) or (sequences, context, d)")
        lead = tensors[hooks[0]].shape[0]
        for key, value in tensors.items():
            if value.ndim == 0 or value.shape[0] != lead:
                raise DataError(f"{where}: {key!r} has shape {tuple(value.shape)} but {hooks[0]!r} has "
                                f"{lead} rows; every tensor of a batch must share its leading length")
        if meta is not None:
            if not isinstance(meta, (list, tuple)) or len(meta) != lead:
                n = len(meta) if isinstance(meta, (list, tuple)) else type(meta).__name__
                raise DataError(f"{where}: 'meta' must be a list with one entry per row ({lead}), got {n}")
            meta = list(meta)

        if "mask" not in tensors:
            # A source without a mask marks every position as a real token.
            tensors["mask"] = torch.ones(tensors[hooks[0]].shape[:-1], dtype=torch.bool,
                                         device=tensors[hooks[0]].device)
        mask = tensors["mask"]
        if mask.dtype != torch.bool:
            raise DataError(f"{where}: 'mask' must be a bool tensor, got {mask.dtype}")
        if mask.ndim not in (1, 2):
            raise DataError(f"{where}: 'mask' has shape {tuple(mask.shape)}, expected (rows,) or (sequences, context)")
        for key in hooks:
            if tuple(tensors[key].shape[:-1]) != tuple(mask.shape):
                raise DataError(f"{where}: {key!r} has shape {tuple(tensors[key].shape)}, which does not match "
                                f"'mask' {tuple(mask.shape)} (expected mask shape + (d,))")
        if "tokens" in tensors and tuple(tensors["tokens"].shape) != tuple(mask.shape):
            raise DataError(f"{where}: 'tokens' has shape {tuple(tensors['tokens'].shape)}, expected the "
                            f"mask's shape {tuple(mask.shape)}")

        if self.layout == "sequences":
            if mask.ndim != 2:
                raise DataError(f"{where} yields single tokens ({hooks[0]!r} has shape "
                                f"{tuple(tensors[hooks[0]].shape)}) but the layout is 'sequences', which "
                                "needs whole sequences (e.g. set the source's context_size)")
        else:
            meta = None  # per-sequence meta has no meaning for token rows
            if mask.ndim == 2:
                tensors = {k: v.flatten(0, 1) for k, v in tensors.items()}
            if self.config.drop_masked_tokens:
                keep = tensors["mask"]
                if not bool(keep.all()):
                    tensors = {k: v[keep] for k, v in tensors.items()}
        if self._dtype is not None:
            tensors = {k: v.to(self._dtype) if k not in RESERVED_KEYS else v for k, v in tensors.items()}
        return _Rows(tensors, meta, int(tensors["mask"].shape[0]))

    def _check_signature(self, rows: _Rows, origin: str) -> None:
        if self._signature is None:
            self._signature = _Signature.of(rows, origin)
            return
        sig = self._signature
        extra = [k for k in rows.tensors if k not in sig.shapes]
        missing = [k for k in sig.keys if k not in rows.tensors]
        if extra or missing:
            relation = (f"yields key {extra[0]!r}, which {sig.origin} does not" if extra
                        else f"lacks key {missing[0]!r}, which {sig.origin} yields")
            raise DataError(f"{origin} {relation}; every source must produce the same keys (got "
                            f"{sorted(rows.tensors)}, expected {sorted(sig.keys)})")
        for key, value in rows.tensors.items():
            shape, dtype = sig.shapes[key]
            if tuple(value.shape[1:]) != shape:
                raise DataError(f"{origin}: {key!r} has per-row shape {tuple(value.shape[1:])} but {sig.origin} "
                                f"gave {shape}; every source must produce the same shapes")
            if value.dtype != dtype:
                raise DataError(f"{origin}: {key!r} has dtype {value.dtype} but {sig.origin} gave {dtype} "
                                "(set [activations] dtype to cast all sources to one dtype)")
        if (rows.meta is not None) != sig.has_meta:
            raise DataError(f"{origin} {'yields' if rows.meta is not None else 'lacks'} key 'meta' that "
                            f"{sig.origin} {'lacks' if sig.has_meta else 'yields'}; every source must "
                            "produce the same keys")

    def _append(self, chunk: _Rows, source: int) -> None:
        self._check_signature(chunk, f"activation source {source}")
        if chunk.rows:
            self._pending.append(chunk)
            self._pending_rows += chunk.rows

    def _admit(self, n: int) -> None:
        """Move up to ``n`` rows from the pending FIFO into the buffer."""
        while n > 0 and self._pending:
            head = self._pending[0]
            if head.rows <= n:
                self._pending.pop(0)
                part = head
            else:
                part, rest = head.split(n)
                self._pending[0] = rest
            self._buffer.append(part)
            self._rows += part.rows
            self._pending_rows -= part.rows
            n -= part.rows

    def _consolidate(self) -> _Rows | None:
        if not self._buffer:
            return None
        rows = _concat(self._buffer)
        self._buffer = [rows]
        return rows

    def _shuffle(self) -> None:
        rows = self._consolidate()
        if rows is None:
            return
        permutation = torch.randperm(rows.rows, generator=self._shuffle_generator)
        self._buffer = [rows.index(permutation)]

    def _take(self, n: int) -> Batch:
        rows = self._consolidate()
        if rows is None:  # pragma: no cover - callers check self._rows first
            raise RuntimeError("no rows buffered")
        head, tail = rows.split(n)
        self._buffer = [tail] if tail.rows else []
        self._rows = tail.rows
        batch: Batch = dict(head.tensors)
        if head.meta is not None:
            batch["meta"] = head.meta
        return batch

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The stream position (nested dict of JSON values and tensors).

        Keys: ``format``, ``version``; ``sources`` (each source's own state, config order);
        ``exhausted`` (list of bool); ``mix_generator`` and ``shuffle_generator`` (uint8 torch
        generator states); ``buffer``: ``{"rows": int, "keys": [...], "tensors": {key: (rows, ...)},
        "meta": list | None}`` holding the rows pulled but not yet handed out.
        """
        rows = self._consolidate()
        tensors = {} if rows is None else dict(rows.tensors)
        pending = _concat(self._pending) if self._pending else None
        if pending is not None:
            self._pending = [pending]
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "sources": [source.state_dict() for source in self.sources],
            "exhausted": list(self._exhausted),
            "mix_generator": self._mix_generator.get_state(),
            "shuffle_generator": self._shuffle_generator.get_state(),
            "buffer": {
                "rows": self._rows,
                "keys": list(tensors),
                "tensors": tensors,
                "meta": None if rows is None else rows.meta,
            },
            "pending": {
                "rows": self._pending_rows,
                "tensors": {} if pending is None else dict(pending.tensors),
                "meta": None if pending is None else pending.meta,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (also into a freshly built factory).

        Raises:
            CheckpointError: the state is malformed or was saved with a different number of sources.
        """
        what = "activation stream state"
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise CheckpointError(f"{what}: expected format {_STATE_FORMAT!r}")
        version = state.get("version")
        if not isinstance(version, int) or version > _STATE_VERSION:
            raise CheckpointError(f"{what}: unsupported version {version!r} (this lmsae reads up to {_STATE_VERSION})")
        try:
            source_states = list(state["sources"])
            exhausted = [bool(e) for e in state["exhausted"]]
            mix_state = state["mix_generator"]
            shuffle_state = state["shuffle_generator"]
            buffer = state["buffer"]
            n_rows = int(buffer["rows"])
            keys = list(buffer.get("keys") or buffer["tensors"])
            tensors = {k: buffer["tensors"][k] for k in keys}
            meta = buffer.get("meta")
            # version 1 had no pending area (whole chunks went straight into the buffer)
            pending = state.get("pending") or {"rows": 0, "tensors": {}, "meta": None}
            n_pending = int(pending["rows"])
            pending_tensors = dict(pending["tensors"])
            pending_meta = pending.get("meta")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{what}: missing or malformed entry ({exc!r})") from exc
        n = len(self.sources)
        if len(source_states) != n or len(exhausted) != n:
            raise CheckpointError(f"{what}: saved with {len(source_states)} sources, this run has {n} "
                                  "(the [activations] sources must not change on resume)")
        if not all(isinstance(t, Tensor) for t in (mix_state, shuffle_state, *tensors.values())):
            raise CheckpointError(f"{what}: generator states and buffered rows must be tensors")
        if any(t.ndim == 0 or t.shape[0] != n_rows for t in tensors.values()) or (n_rows and not tensors):
            raise CheckpointError(f"{what}: buffered tensors do not all hold {n_rows} rows")
        if meta is not None and (not isinstance(meta, list) or len(meta) != n_rows):
            raise CheckpointError(f"{what}: buffered meta does not hold {n_rows} entries")
        if (any(not isinstance(t, Tensor) or t.ndim == 0 or t.shape[0] != n_pending for t in pending_tensors.values())
                or (n_pending and not pending_tensors)):
            raise CheckpointError(f"{what}: pending tensors do not all hold {n_pending} rows")

        for source, source_state in zip(self.sources, source_states, strict=True):
            source.load_state_dict(source_state)
        self._iters = [None] * n  # sources continue from their restored positions
        self._exhausted = exhausted
        try:
            self._mix_generator.set_state(mix_state.detach().cpu().to(torch.uint8))
            self._shuffle_generator.set_state(shuffle_state.detach().cpu().to(torch.uint8))
        except RuntimeError as exc:
            raise CheckpointError(f"{what}: invalid generator state ({exc})") from exc
        self._rows = n_rows
        self._signature = None
        if n_rows:
            if self.device is not None:
                tensors = {k: v.to(self.device) for k, v in tensors.items()}
            rows = _Rows(tensors, meta, n_rows)
            self._buffer = [rows]
            self._signature = _Signature.of(rows, "the restored buffer")
        else:
            self._buffer = []
        self._pending_rows = n_pending
        self._pending = []
        if n_pending:
            if self.device is not None:
                pending_tensors = {k: v.to(self.device) for k, v in pending_tensors.items()}
            self._pending = [_Rows(pending_tensors, pending_meta, n_pending)]
            if self._signature is None:
                self._signature = _Signature.of(self._pending[0], "the restored buffer")


def build_activation_stream(
    config: ActivationsConfig,
    context: SourceContext,
    build_source: Callable[[SourceConfig, SourceContext], ActivationStream],
) -> ActivationFactory:
    """Build every source of ``config`` with ``build_source(source_config, context)`` and mix them.

    Sources are given ``context`` with its layout set to ``config.layout`` (the config decides
    the layout). Each source config's ``weight`` (1.0 when it has none) is its mixing weight.
    Rows restored from a checkpoint are moved to ``context.device``.
    """
    context = attrs.evolve(context, layout=config.layout)
    sources = [build_source(source_config, context) for source_config in config.sources]
    weights = [float(getattr(source_config, "weight", 1.0)) for source_config in config.sources]
    stream = ActivationFactory(config, sources, weights, layout=config.layout, device=context.device)
    if config.prefetch > 0:
        from lmsae.activations.prefetch import PrefetchingStream

        return PrefetchingStream(stream, config.prefetch)  # type: ignore[return-value]
    return stream
