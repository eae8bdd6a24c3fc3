"""Run a stream in a background thread so that producing batches (a language-model forward pass,
reading a cache) overlaps with consuming them (a training step).

Torch releases the GIL inside its kernels, so the two really run at the same time. The position
reported by :meth:`PrefetchingStream.state_dict` is the one right after the last batch handed to
the consumer, not after the batches read ahead, so checkpoints stay exact.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from lmsae.activations.protocol import ActivationStream, Batch

_END = object()


class PrefetchingStream:
    """Wraps an :class:`ActivationStream`, keeping up to ``depth`` batches ready."""

    def __init__(self, stream: ActivationStream, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.stream = stream
        self.depth = depth
        self._state: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        self._stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = self._stop

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self.stream:
                    # the stream's own position right after this batch: what a checkpoint taken
                    # after the consumer received it must hold
                    if not put((batch, self.stream.state_dict())):
                        return
                put((_END, None))
            except BaseException as exc:  # surfaced in the consumer's thread
                put((exc, None))

        self._thread = threading.Thread(target=produce, name="lmsae-prefetch", daemon=True)
        self._thread.start()
        try:
            while True:
                item, state = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                self._state = state
                yield item
        finally:
            stop.set()
            # wait for the producer to leave its current batch: it may be inside a forward pass
            # of a language model that the caller is about to use
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(timeout=60)

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out (the wrapped stream's own state before that)."""
        return self._state if self._state is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self._state = None

    def close(self) -> None:
        """Stop the producer thread (it also stops when the consumer drops the iterator)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __getattr__(self, name: str) -> Any:
        # expose the wrapped stream's attributes (e.g. a source's ground truth)
        return getattr(self.stream, name)
