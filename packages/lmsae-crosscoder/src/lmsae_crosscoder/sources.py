"""The ``crosscoder_heads`` activation source: several sources side by side, one batch key per head.

The core's activation factory *mixes* sources (each chunk comes from one of them), so it cannot
put the activations of two language models into one batch. This source *joins* its members
instead: it reads one chunk from every member, renames the hook points each member provides to
the batch keys the crosscoder uses as heads, and yields one chunk with all of them::

    [[activations.sources]]
    type = "crosscoder_heads"

    [[activations.sources.members]]                       # a cache written from model A
    keys = { "base.blocks.3.hook_resid_post" = "blocks.3.hook_resid_post" }
    source = { type = "cached", path = "runs/cache_base" }

    [[activations.sources.members]]                       # the same hook of model B
    keys = { "chat.blocks.3.hook_resid_post" = "blocks.3.hook_resid_post" }
    source = { type = "cached", path = "runs/cache_chat" }

A member may also run its own language model on text (``model = {...}`` next to a ``text``
source); members without ``model`` use the run's ``[model]``. Each distinct model is loaded once
per registry (i.e. once per run), however often the stream is rebuilt.

Rules: members must yield aligned chunks (same rows in the same order: the same dataset,
context size and chunking); their tokens must be equal (``check_tokens``, on by default, so the
models must share a tokenizer); a token is trained on only where every member's mask is True.
The stream ends when any member ends.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import attrs
import torch

from lmsae.activations.protocol import RESERVED_KEYS, Batch, SourceContext
from lmsae.config.base import Config, LanguageModelConfig, SourceConfig
from lmsae.config.fields import FieldValueError, config_class, non_empty, option
from lmsae.errors import CheckpointError, DataError
from lmsae.records import SourceSpec

__all__ = ["HEADS_SOURCE_SPEC", "CrosscoderHeadsSource", "CrosscoderHeadsSourceConfig", "HeadsMemberConfig"]

log = logging.getLogger(__name__)


@config_class
class HeadsMemberConfig(Config):
    """One member of a ``crosscoder_heads`` source: a source, and which batch keys it provides."""

    keys: dict[str, str] = option(
        doc="Batch key (a crosscoder head, as written in dictionary.hook_points) -> hook point of this member's "
            "source, e.g. { \"chat.blocks.3.hook_resid_post\" = \"blocks.3.hook_resid_post\" }. Map a key to "
            "itself to keep a hook point's name.",
        validator=non_empty())
    source: SourceConfig = option(doc="The member's activation source (a table with its 'type'); its weight is "
                                      "ignored.")
    model: LanguageModelConfig | None = option(
        None, doc="The language model this member's source runs (a [model]-like table); unset: the run's [model].")


def _members_valid(_instance: Any, attribute: attrs.Attribute, members: list[HeadsMemberConfig]) -> None:
    owner: dict[str, int] = {}
    for i, member in enumerate(members):
        for key, hook in member.keys.items():
            if not key or not hook:
                raise FieldValueError(attribute.name, f"member {i} maps {key!r} -> {hook!r}; keys and hook points "
                                                      "must be non-empty")
            if key in RESERVED_KEYS:
                raise FieldValueError(attribute.name, f"member {i} uses the reserved batch key {key!r}")
            if key in owner:
                raise FieldValueError(attribute.name, f"batch key {key!r} is provided by members {owner[key]} and "
                                                      f"{i}; each key must come from one member")
            owner[key] = i


@config_class
class CrosscoderHeadsSourceConfig(SourceConfig):
    """Joins several sources side by side (e.g. two models' activations), renaming their hook points."""

    name: ClassVar[str] = "crosscoder_heads"

    members: list[HeadsMemberConfig] = option(
        doc="The joined sources ([[activations.sources.members]] tables), each with its keys.",
        validator=[non_empty(), _members_valid])
    check_tokens: bool = option(
        True, doc="Fail when the members' token ids differ (they must read the same text with the same "
                  "tokenizer). Turn off only for sources without real tokens (e.g. synthetic data).")


# One loader per distinct member model and registry: a stream is rebuilt several times per run
# (calibration, training, evaluation), and a language model takes seconds to load.
_MODEL_LOADERS: weakref.WeakKeyDictionary[Any, dict[str, Callable[[], Any]]] = weakref.WeakKeyDictionary()


def _member_model_loader(config: LanguageModelConfig, registry: Any) -> Callable[[], Any]:
    if registry is None:
        raise DataError("a crosscoder_heads member with its own model needs the registry in the source context")
    key = json.dumps(registry.unstructure(config), sort_keys=True)
    loaders = _MODEL_LOADERS.setdefault(registry, {})
    if key not in loaders:
        loaded: list[Any] = []

        def load() -> Any:
            if not loaded:
                loaded.append(registry.get("language_model", config.name).factory(config))
            return loaded[0]

        loaders[key] = load
    return loaders[key]


class CrosscoderHeadsSource:
    """An :class:`~lmsae.activations.protocol.ActivationStream` joining member sources.

    Each chunk holds every requested key (``context.hook_points``), ``"mask"`` (the AND of the
    members' masks), and the first member's ``"tokens"`` and ``"meta"`` when it has them.
    Members that provide none of the requested keys are not built.

    Raises:
        DataError: a requested key is provided by no member; members yield chunks of different
            shapes or different tokens.
    """

    def __init__(self, config: CrosscoderHeadsSourceConfig, context: SourceContext):
        self.config = config
        requested = tuple(context.hook_points)
        provided = {key: i for i, m in enumerate(config.members) for key in m.keys}
        missing = [k for k in requested if k not in provided]
        if missing:
            raise DataError(f"the crosscoder_heads source provides no key {missing[0]!r}; its members provide "
                            f"{sorted(provided)} (add it to a member's keys)")
        #: per built member: (member index, [(batch key, hook point of the member)])
        self.plan: list[tuple[int, list[tuple[str, str]]]] = []
        for i, member in enumerate(config.members):
            pairs = [(k, member.keys[k]) for k in requested if provided[k] == i]
            if pairs:
                self.plan.append((i, pairs))
        if not self.plan:  # a token-only stream: the first member provides tokens, mask and meta
            self.plan.append((0, []))
        self.sources: list[Any] = []
        for i, pairs in self.plan:
            member = config.members[i]
            hooks = tuple(dict.fromkeys(hook for _, hook in pairs))
            lm = context.language_model
            if member.model is not None:
                lm = _member_model_loader(member.model, context.registry)
            member_context = attrs.evolve(context, hook_points=hooks, language_model=lm)
            spec = context.registry.get("source", member.source.name)
            self.sources.append(spec.factory(member.source, member_context))
        #: chunks yielded so far
        self.chunks = 0

    def __iter__(self) -> Iterator[Batch]:
        """Yield joined chunks from the current position on."""
        return self._iterate()

    def _iterate(self) -> Iterator[Batch]:
        iterators = [iter(s) for s in self.sources]
        while True:
            chunks = []
            for n, it in enumerate(iterators):
                chunk = next(it, None)
                if chunk is None:
                    if n > 0 or len(iterators) > 1 and self._any_left(iterators[1:]):
                        log.warning("crosscoder_heads: member %d ended before the others after %d chunks; "
                                    "the joined stream ends here", self.plan[n][0], self.chunks)
                    return
                chunks.append(chunk)
            joined = self._join(chunks)
            self.chunks += 1
            yield joined

    @staticmethod
    def _any_left(iterators: list[Iterator[Batch]]) -> bool:
        # only used for the warning: peeking consumes a chunk, but the stream ends anyway
        return any(next(it, None) is not None for it in iterators)

    def _join(self, chunks: list[Batch]) -> Batch:
        out: Batch = {}
        mask: torch.Tensor | None = None
        lead: tuple[int, ...] | None = None
        tokens = None
        first_member = self.plan[0][0]
        for (i, pairs), chunk in zip(self.plan, chunks):
            where = f"crosscoder_heads member {i}"
            for key, hook in pairs:
                if hook not in chunk:
                    raise DataError(f"{where} yielded no {hook!r} (for key {key!r}); it yielded "
                                    f"{sorted(k for k in chunk if k not in RESERVED_KEYS)}")
                out[key] = chunk[hook]
            shape = self._lead_shape(chunk, pairs)
            if lead is None:
                lead = shape
            elif shape != lead:
                raise DataError(f"{where} yields chunks of {shape} rows but member {first_member} yields {lead}; "
                                "joined sources must be aligned (same dataset, context size and chunking, e.g. the "
                                "same model_batch_size)")
            member_mask = chunk.get("mask")
            if member_mask is not None:
                mask = member_mask if mask is None else mask & member_mask.to(mask.device)
            member_tokens = chunk.get("tokens")
            if member_tokens is not None:
                if tokens is None:
                    tokens = member_tokens
                elif self.config.check_tokens and not torch.equal(member_tokens.cpu(), tokens.cpu()):
                    raise DataError(f"{where} read other tokens than member {first_member} in chunk {self.chunks}; "
                                    "the members must read the same text with the same tokenizer (set "
                                    "check_tokens = false only for data without real tokens)")
        if mask is not None:
            out["mask"] = mask
        if tokens is not None:
            out["tokens"] = tokens
        if "meta" in chunks[0]:
            out["meta"] = chunks[0]["meta"]
        return out

    @staticmethod
    def _lead_shape(chunk: Batch, pairs: list[tuple[str, str]]) -> tuple[int, ...]:
        if pairs:
            return tuple(chunk[pairs[0][1]].shape[:-1])
        ref = chunk.get("mask", chunk.get("tokens"))
        return tuple(ref.shape) if ref is not None else ()

    # --- position ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"chunks": joined chunks yielded, "members": [each built member's state]}``."""
        return {"chunks": self.chunks, "members": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (same members, same requested keys)."""
        if not isinstance(state, dict) or not isinstance(state.get("members"), list):
            raise CheckpointError(f"crosscoder_heads source state must hold a 'members' list, got {state!r}")
        chunks = state.get("chunks")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 0:
            raise CheckpointError(f"crosscoder_heads source state 'chunks' must be an int >= 0, got {chunks!r}")
        if len(state["members"]) != len(self.sources):
            raise CheckpointError(f"crosscoder_heads source state has {len(state['members'])} members, this source "
                                  f"builds {len(self.sources)} (the members must not change on resume)")
        for source, member_state in zip(self.sources, state["members"]):
            source.load_state_dict(member_state)
        self.chunks = chunks


def build_crosscoder_heads_source(config: CrosscoderHeadsSourceConfig, context: SourceContext) -> CrosscoderHeadsSource:
    """Source factory for ``type = "crosscoder_heads"``."""
    return CrosscoderHeadsSource(config, context)


HEADS_SOURCE_SPEC = SourceSpec(config_class=CrosscoderHeadsSourceConfig, factory=build_crosscoder_heads_source,
                               summary="several sources side by side under renamed keys (crosscoder heads, e.g. "
                                       "the same hook of two models)")
