"""Token sequences -> fixed-size context windows, and the mask of tokens to train on.

Two ways to cut documents into windows of ``context_size`` tokens:

- :func:`pack` concatenates documents (each followed by EOS) and cuts the stream into full
  windows; with ``prepend_bos`` every window is ``[BOS] + context_size - 1`` stream tokens, so a
  window never starts mid-stream without a BOS. Nothing is padded; the stream's last incomplete
  window is dropped.
- :func:`pad_truncate` puts one document in each window (``[BOS] + document``), truncated to
  ``context_size`` or right-padded with ``pad_id`` (``attention_mask`` 0 on padding).

Both return a :class:`WindowIterator` whose :attr:`~WindowIterator.state` is the position of the
next window as a :class:`WindowState` (document index, token offset in that document). A window
depends only on the documents from that position on, so resuming is exact and cheap: start the
documents at ``state.document`` and pass ``start=state``; nothing before it is re-read.

:func:`training_mask` says which positions of a window are trained on. Padding is recognised
only from ``attention_mask`` (never from ``pad_id``, which often equals ``eos_id``), so EOS
tokens are kept unless ``mask_eos`` asks otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import attrs
import torch
from torch import Tensor

from lmsae.errors import CheckpointError, DataError

__all__ = ["Window", "WindowIterator", "WindowState", "pack", "pad_truncate", "training_mask"]


@attrs.frozen
class WindowState:
    """Position of the next window: it starts at token ``offset`` of document ``document``.

    In :func:`pack`, ``offset == len(document)`` points at the EOS appended to that document.
    """

    document: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        """``{"document": int, "offset": int}`` (JSON-friendly)."""
        return {"document": self.document, "offset": self.offset}

    @classmethod
    def from_dict(cls, state: Any) -> WindowState:
        """Inverse of :meth:`to_dict`.

        Raises:
            CheckpointError: the state is not ``{"document": int >= 0, "offset": int >= 0}``.
        """
        if not isinstance(state, dict):
            raise CheckpointError(f"a window state must be a dict, got {type(state).__name__}")
        values = []
        for key in ("document", "offset"):
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise CheckpointError(f"window state {key!r} must be an int >= 0, got {v!r}")
            values.append(v)
        return cls(*values)


class Window(NamedTuple):
    """One context window.

    ``tokens``: int64 ``(context_size,)``; ``attention_mask``: int64 ``(context_size,)``, 1 on real
    tokens (BOS included) and 0 on padding; ``meta``: ``{"document_index": document of the first
    token after BOS, "offset": that token's offset in its document}``.
    """

    tokens: Tensor
    attention_mask: Tensor
    meta: dict[str, int]


class WindowIterator(Iterator[Window]):
    """An iterator of :class:`Window` whose :attr:`state` is the position of the next window.

    The state is updated before each window is returned, so a state read after receiving ``n``
    windows resumes with window ``n + 1``.
    """

    def __init__(self, start: WindowState, generate: Callable[[WindowIterator], Iterator[Window]]):
        self.state = start
        # the generator receives this object so that it can update the state as it goes
        self._windows = generate(self)

    def __next__(self) -> Window:
        return next(self._windows)

    def __iter__(self) -> WindowIterator:
        return self


def _as_list(tokens: Any) -> list[int]:
    if isinstance(tokens, Tensor):
        return tokens.reshape(-1).tolist()
    return list(tokens)


def _check_ids(context_size: int, prepend_bos: bool, bos_id: int | None) -> int:
    """Validate the common arguments; returns the number of document tokens per window."""
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise ValueError(f"context_size must be an int >= 1, got {context_size!r}")
    if prepend_bos:
        if bos_id is None:
            raise DataError("prepend_bos needs a BOS token id, but bos_id is None (the model has no BOS token; "
                            "set prepend_bos = false)")
        if context_size < 2:
            raise ValueError(f"context_size must be >= 2 with prepend_bos (BOS + at least one token), "
                             f"got {context_size}")
    return context_size - 1 if prepend_bos else context_size


def pack(
    token_streams: Iterable[Sequence[int] | Tensor],
    context_size: int,
    *,
    bos_id: int | None,
    eos_id: int | None,
    prepend_bos: bool = True,
    add_eos: bool = True,
    start: WindowState = WindowState(),
) -> WindowIterator:
    """Concatenate documents and cut the stream into windows of exactly ``context_size`` tokens.

    The stream is ``doc_0 + [EOS] + doc_1 + [EOS] + ...`` (EOS only with ``add_eos``). Window
    ``k`` holds stream tokens ``[k*n, (k+1)*n)`` with ``n = context_size - 1`` after a BOS when
    ``prepend_bos``, else ``n = context_size`` stream tokens. The last incomplete window is
    dropped (the stream's tail is shorter than ``n``), so every window is full and
    ``attention_mask`` is all ones.

    Args:
        token_streams: token ids of each document (lists or 1-D tensors, without special
            tokens), starting with document ``start.document``.
        context_size: tokens per window, BOS included.
        bos_id: BOS id (needed with ``prepend_bos``).
        eos_id: EOS id (needed with ``add_eos``).
        start: where to resume: the first document given is ``start.document`` and its first
            ``start.offset`` tokens are skipped.

    Raises:
        DataError: a needed special id is missing, or ``start.offset`` lies past the end of its
            document (the documents do not match the saved state).
    """
    n_body = _check_ids(context_size, prepend_bos, bos_id)
    if add_eos and eos_id is None:
        raise DataError("add_eos needs an EOS token id, but eos_id is None")
    return WindowIterator(start, partial(_pack, token_streams=token_streams, n_body=n_body, bos_id=bos_id,
                                         eos_id=eos_id, prepend_bos=prepend_bos, add_eos=add_eos, start=start))


def _pack(owner: WindowIterator, *, token_streams: Iterable[Any], n_body: int, bos_id: int | None,
          eos_id: int | None, prepend_bos: bool, add_eos: bool, start: WindowState) -> Iterator[Window]:
    head = [bos_id] if prepend_bos else []
    ones = torch.ones(n_body + len(head), dtype=torch.long)
    pieces: list[list[int]] = []
    need = n_body
    win_doc = win_off = 0
    doc = start.document
    for i, raw in enumerate(token_streams):
        seq = _as_list(raw)
        if add_eos:
            seq.append(eos_id)
        pos = start.offset if i == 0 else 0
        if pos > len(seq):
            raise DataError(f"cannot resume at token {pos} of document {doc}: it has only {len(seq)} tokens"
                            f"{' (EOS included)' if add_eos else ''}; the documents differ from the saved run")
        while pos < len(seq):
            if need == n_body:
                win_doc, win_off = doc, pos
            take = min(need, len(seq) - pos)
            pieces.append(seq[pos:pos + take])
            pos += take
            need -= take
            if need == 0:
                tokens = head + [t for piece in pieces for t in piece]
                # state first: a state read after receiving this window must point past it
                owner.state = WindowState(doc, pos) if pos < len(seq) else WindowState(doc + 1, 0)
                yield Window(torch.tensor(tokens, dtype=torch.long), ones.clone(),
                             {"document_index": win_doc, "offset": win_off})
                pieces, need = [], n_body
        doc += 1


def pad_truncate(
    token_streams: Iterable[Sequence[int] | Tensor],
    context_size: int,
    *,
    bos_id: int | None,
    pad_id: int,
    prepend_bos: bool = True,
    start: WindowState = WindowState(),
) -> WindowIterator:
    """One document per window: ``[BOS] + document`` truncated to ``context_size`` or
    right-padded with ``pad_id`` (``attention_mask`` 0 on the padding).

    Empty documents are skipped (a window of BOS and padding has nothing to train on); their
    indices are still counted, so ``meta["document_index"]`` is always the document's index.

    Args:
        token_streams: token ids of each document, starting with document ``start.document``.
        start: where to resume (``start.offset`` must be 0).

    Raises:
        DataError: ``prepend_bos`` without a BOS id.
        CheckpointError: ``start.offset`` is not 0.
    """
    n_body = _check_ids(context_size, prepend_bos, bos_id)
    if start.offset != 0:
        raise CheckpointError(f"pad/truncate windows always start at a document's beginning; got offset {start.offset}")
    return WindowIterator(start, partial(_pad, token_streams=token_streams, context_size=context_size,
                                         n_body=n_body, bos_id=bos_id, pad_id=pad_id, prepend_bos=prepend_bos,
                                         start=start))


def _pad(owner: WindowIterator, *, token_streams: Iterable[Any], context_size: int, n_body: int,
         bos_id: int | None, pad_id: int, prepend_bos: bool, start: WindowState) -> Iterator[Window]:
    head = [bos_id] if prepend_bos else []
    for doc, raw in enumerate(token_streams, start=start.document):
        seq = _as_list(raw)
        if not seq:
            continue
        real = head + seq[:n_body]
        tokens = torch.full((context_size,), pad_id, dtype=torch.long)
        tokens[:len(real)] = torch.tensor(real, dtype=torch.long)
        attention_mask = torch.zeros(context_size, dtype=torch.long)
        attention_mask[:len(real)] = 1
        owner.state = WindowState(doc + 1, 0)
        yield Window(tokens, attention_mask, {"document_index": doc, "offset": 0})


def training_mask(
    tokens: Tensor,
    attention_mask: Tensor | None,
    *,
    bos_id: int | None,
    eos_id: int | None,
    prepend_bos: bool = True,
    mask_bos: bool = True,
    mask_eos: bool = False,
    ignore_token_ids: Iterable[int] = (),
) -> Tensor:
    """Which tokens to train on: a bool tensor shaped like ``tokens`` (``(..., context)``).

    A position is False when it is padding (``attention_mask`` 0; padding is never inferred
    from token ids, since ``pad_id`` often equals ``eos_id``), when it is the BOS the windowing
    prepended (position 0 with ``prepend_bos``) and ``mask_bos``, when it is EOS and
    ``mask_eos``, or when its id is in ``ignore_token_ids``. Everything else, EOS included by
    default, is True.

    Raises:
        DataError: with ``prepend_bos`` and a ``bos_id``, position 0 does not hold BOS (the
            windows were not made with ``prepend_bos``).
    """
    keep = (torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None
            else attention_mask.to(device=tokens.device).bool().clone())
    if prepend_bos and tokens.shape[-1] > 0:
        if bos_id is not None and bool((tokens[..., 0] != bos_id).any()):
            raise DataError(f"prepend_bos is set but position 0 does not always hold BOS (id {bos_id}); "
                            "the windows were made without prepend_bos")
        if mask_bos:
            keep[..., 0] = False
    if mask_eos and eos_id is not None:
        keep &= tokens != eos_id
    ignored = list(ignore_token_ids)
    if ignored:
        keep &= ~torch.isin(tokens, torch.tensor(ignored, dtype=tokens.dtype, device=tokens.device))
    return keep
