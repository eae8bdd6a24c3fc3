"""The ``text`` activation source: documents -> tokens -> context windows -> LM activations.

Users select it with ``[[activations.sources]] type = "text"`` and a nested ``dataset`` table;
the run config must have a ``[model]`` table (the language model comes from
``SourceContext.language_model``).

Pipeline per chunk: read documents of this rank's shard (:func:`lmsae.data.load_documents`),
tokenize ``tokenize_batch`` of them at a time (``lm.tokenize``, no special tokens), cut windows
(:func:`lmsae.data.pack` or :func:`lmsae.data.pad_truncate`), run the LM on
``model_batch_size`` windows under ``no_grad`` and yield their activations with tokens, a
training mask and per-sequence meta.

The position is the number of windows emitted plus the :class:`~lmsae.data.WindowState` of the
next window (document, token offset). Resuming starts reading documents at that document, so
nothing before it is tokenized again and the LM never runs on skipped windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lmsae.activations.protocol import RESERVED_KEYS, Batch, SourceContext
from lmsae.config.base import SourceConfig
from lmsae.config.fields import FieldValueError, config_class, each, non_negative, one_of, option, positive
from lmsae.data.datasets import DatasetConfig, iter_texts, load_documents, shard_bounds, take_shard
from lmsae.data.windows import Window, WindowIterator, WindowState, pack, pad_truncate, training_mask
from lmsae.errors import CheckpointError, DataError

__all__ = ["TextSource", "TextSourceConfig", "build_text_source"]


@config_class
class TextSourceConfig(SourceConfig):
    """Activations of a language model (the run's [model]) on a text dataset."""

    name: ClassVar[str] = "text"

    dataset: DatasetConfig = option(doc="The text dataset ([activations.sources.dataset] table).")
    context_size: int = option(128, doc="Tokens per sequence (BOS included).", validator=positive())
    windows: Literal["pack", "pad"] = option(
        "pack", doc="'pack': concatenate documents separated by EOS and cut full windows (no padding; the "
                    "last incomplete window is dropped); 'pad': one document per window, truncated or padded.",
        validator=one_of("pack", "pad"))
    prepend_bos: bool = option(True, doc="Start every window with the model's BOS token.")
    model_batch_size: int = option(
        8, doc="Sequences per language-model forward pass (and per chunk yielded).", validator=positive())
    max_sequences: int | None = option(
        None, doc="Stop after this many sequences in total (split over data-parallel ranks); unset reads "
                  "the dataset once.",
        validator=positive())
    mask_bos: bool = option(True, doc="Do not train on the BOS token prepended to each window.")
    mask_eos: bool = option(False, doc="Do not train on EOS tokens (kept by default; padding is always masked).")
    ignore_token_ids: list[int] = option(
        factory=list, doc="Token ids never trained on (masked wherever they occur).",
        validator=each(non_negative()))
    tokenize_batch: int = option(256, doc="Documents tokenized at once.", validator=positive())

    def __attrs_post_init__(self) -> None:
        if self.prepend_bos and self.context_size < 2:
            raise FieldValueError("context_size",
                                  f"must be >= 2 with prepend_bos (BOS + a token), got {self.context_size}")


class TextSource:
    """An :class:`~lmsae.activations.protocol.ActivationStream` of LM activations on text.

    Each chunk holds ``B <= model_batch_size`` sequences (only the last chunk may be smaller):

    - ``{hook}``: float32 ``(B, T, d_hook)`` on the CPU for every hook in ``context.hook_points``;
    - ``"tokens"``: int64 ``(B, T)``; ``"mask"``: bool ``(B, T)``, True on tokens to train on
      (:func:`lmsae.data.training_mask` with this source's settings: the source owns which of its
      tokens are trained on; the model's own mask settings apply only where the model builds
      batches from text itself);
    - ``"meta"``: one dict per sequence, ``{"dataset": path, "document_index": index of the
      window's first document in the unsharded dataset, "offset": token offset in it,
      "shard": rank}``.

    The activation factory flattens chunks to tokens in the ``"tokens"`` layout.

    Raises:
        DataError: the run has no language model, a hook point is unknown to it (its message
            names the closest valid hook), the context is longer than the model's, or the model
            lacks a special token the windows need; dataset problems (see
            :func:`lmsae.data.load_documents`).
    """

    def __init__(self, config: TextSourceConfig, context: SourceContext):
        if context.language_model is None:
            raise DataError("the 'text' source needs a [model] table in the run config (the language model "
                            "whose activations it computes)")
        # no hook point: a token-only stream (tokens, masks, metadata; the model never runs)
        hook_points = tuple(context.hook_points)
        reserved = [h for h in hook_points if h in RESERVED_KEYS]
        if reserved:
            raise DataError(f"hook point name(s) {reserved} collide with reserved batch keys {sorted(RESERVED_KEYS)}")
        rank, world = context.shard
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"context.shard must be (rank, world) with 0 <= rank < world, got {context.shard}")

        lm = context.language_model()
        # Fail before any data is read: unknown hooks raise DataError naming the closest valid one.
        self.hook_dims: dict[str, int] = dict(lm.hook_dims(hook_points))
        if config.context_size > lm.n_ctx:
            raise DataError(f"context_size {config.context_size} exceeds the model's context length {lm.n_ctx}")
        if config.prepend_bos and lm.bos_token_id is None:
            raise DataError(f"model {lm.name!r} has no BOS token; set prepend_bos = false in the text source")
        if config.windows == "pack" and lm.eos_token_id is None:
            raise DataError(f"model {lm.name!r} has no EOS token to separate packed documents; "
                            "use windows = 'pad'")

        self.config = config
        self.lm = lm
        self.hook_points = hook_points
        self.progress = context.progress
        self._rank, self._world = rank, world
        # sharded here rather than by load_documents: meta reports indices in the unsharded dataset
        self.documents, self._first_document = take_shard(load_documents(config.dataset), context.shard)
        #: sequences this rank reads in total (None: until the documents run out)
        self.max_sequences: int | None = None
        if config.max_sequences is not None:
            lo, hi = shard_bounds(config.max_sequences, context.shard)
            self.max_sequences = hi - lo
        #: windows emitted so far
        self.windows = 0
        #: position of the next window in this rank's documents
        self.next_window = WindowState()

    # --- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        """Yield chunks from the current position on."""
        return self._iterate()

    def _token_streams(self, first: int) -> Iterator[list[int]]:
        texts: list[str] = []
        for _, text in iter_texts(self.documents, self.config.dataset.text_column, start=first):
            texts.append(text)
            if len(texts) == self.config.tokenize_batch:
                yield from self.lm.tokenize(texts)
                texts = []
        if texts:
            yield from self.lm.tokenize(texts)

    def _window_iterator(self) -> WindowIterator:
        start = self.next_window
        streams = self._token_streams(start.document)
        if self.config.windows == "pack":
            return pack(streams, self.config.context_size, bos_id=self.lm.bos_token_id, eos_id=self.lm.eos_token_id,
                        prepend_bos=self.config.prepend_bos, add_eos=True, start=start)
        return pad_truncate(streams, self.config.context_size, bos_id=self.lm.bos_token_id,
                            pad_id=self.lm.pad_token_id, prepend_bos=self.config.prepend_bos, start=start)

    def _iterate(self) -> Iterator[Batch]:
        windows = self._window_iterator()
        bar = self._progress_bar()
        try:
            while self.max_sequences is None or self.windows < self.max_sequences:
                room = self.config.model_batch_size
                if self.max_sequences is not None:
                    room = min(room, self.max_sequences - self.windows)
                taken: list[Window] = []
                for window in windows:
                    taken.append(window)
                    if len(taken) == room:
                        break
                if not taken:
                    return
                chunk = self._chunk(taken)
                # Advance before yielding: a state_dict() taken while the consumer holds this
                # chunk must count it as consumed.
                self.windows += len(taken)
                self.next_window = windows.state
                if bar is not None:
                    bar.update(len(taken))
                yield chunk
                if len(taken) < room:
                    return  # the documents ran out
        finally:
            if bar is not None:
                bar.close()

    def _progress_bar(self) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.max_sequences, initial=self.windows, unit="seq", dynamic_ncols=True,
                    desc=f"text {self.config.dataset.path}" + (f" [rank {self._rank}]" if self._world > 1 else ""))

    def _chunk(self, taken: list[Window]) -> Batch:
        tokens = torch.stack([w.tokens for w in taken])
        attention_mask = torch.stack([w.attention_mask for w in taken])
        device = torch.device(self.lm.device)
        acts: dict[str, Tensor] = {}
        if self.hook_points:  # no hook point requested: a token-only stream, the model never runs
            with torch.no_grad():
                acts = self.lm.activations(tokens.to(device), self.hook_points,
                                           attention_mask=attention_mask.to(device))
        out: Batch = {}
        for hook in self.hook_points:
            if hook not in acts:
                raise DataError(f"model {self.lm.name!r} returned no activations for hook point {hook!r}")
            value = acts[hook]
            expected = (*tokens.shape, self.hook_dims[hook])
            if tuple(value.shape) != expected:
                raise DataError(f"model {self.lm.name!r} returned {hook!r} with shape {tuple(value.shape)}, "
                                f"expected {expected}")
            out[hook] = value.detach().to(device="cpu", dtype=torch.float32)
        out["tokens"] = tokens
        out["mask"] = self._mask(tokens, attention_mask)
        path = self.config.dataset.path
        out["meta"] = [{"dataset": path, "document_index": self._first_document + w.meta["document_index"],
                        "offset": w.meta["offset"], "shard": self._rank} for w in taken]
        return out

    def _mask(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        cfg = self.config
        mask = training_mask(tokens, attention_mask, bos_id=self.lm.bos_token_id, eos_id=self.lm.eos_token_id,
                             prepend_bos=cfg.prepend_bos, mask_bos=cfg.mask_bos, mask_eos=cfg.mask_eos,
                             ignore_token_ids=cfg.ignore_token_ids)
        return mask

    def skip(self, n: int) -> int:
        """Advance past up to ``n`` windows without running the model (tokenisation only).

        Returns how many were skipped (fewer when the documents or ``max_sequences`` run out).
        Used to resume an interrupted activation generation.
        """
        limit = n if self.max_sequences is None else min(n, self.max_sequences - self.windows)
        if limit <= 0:
            return 0
        windows = self._window_iterator()
        skipped = 0
        for _ in windows:
            skipped += 1
            if skipped >= limit:
                break
        self.windows += skipped
        self.next_window = windows.state
        return skipped

    # --- position ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"windows": emitted, "document": int, "offset": int, "shard": [rank, world]}``:
        the next window starts at token ``offset`` of document ``document`` of this rank."""
        return {"windows": self.windows, **self.next_window.to_dict(), "shard": [self._rank, self._world]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; the next iteration continues there.

        Raises:
            CheckpointError: the state is malformed, was saved by another data-parallel layout,
                or lies past ``max_sequences``.
        """
        if not isinstance(state, dict):
            raise CheckpointError(f"text source state must be a dict, got {type(state).__name__}")
        windows = state.get("windows")
        if isinstance(windows, bool) or not isinstance(windows, int) or windows < 0:
            raise CheckpointError(f"text source state 'windows' must be an int >= 0, got {windows!r}")
        position = WindowState.from_dict(state)
        shard = state.get("shard")
        if shard is not None and list(shard) != [self._rank, self._world]:
            raise CheckpointError(f"text source state was saved by shard {list(shard)} (rank, world) but this is "
                                  f"shard {[self._rank, self._world]}; resume with the same data-parallel layout")
        if self.max_sequences is not None and windows > self.max_sequences:
            raise CheckpointError(f"text source position {windows} is past max_sequences ({self.max_sequences} "
                                  "on this rank)")
        if self.config.windows == "pad" and position.offset != 0:
            raise CheckpointError(f"text source state has offset {position.offset}, but 'pad' windows start at "
                                  "document beginnings (was it saved with windows = 'pack'?)")
        self.windows = windows
        self.next_window = position

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dataset={self.config.dataset.path!r}, model={self.lm.name!r}, "
                f"windows={self.windows}, next={self.next_window})")


def build_text_source(config: TextSourceConfig, context: SourceContext) -> TextSource:
    """Source factory for ``type = "text"``: ``factory(config, context)``."""
    return TextSource(config, context)
