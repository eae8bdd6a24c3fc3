"""The ``crosscoder_heads`` source: joining member sources under renamed keys."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from lmsae.activations.protocol import SourceContext
from lmsae.config.base import SourceConfig
from lmsae.config.fields import config_class, option
from lmsae.errors import CheckpointError, ConfigError, DataError
from lmsae.hookspecs import hookimpl
from lmsae.records import SourceSpec
from lmsae.registry import load_registry
from lmsae.testing.plugins import fake_entry_points, module

from lmsae_crosscoder.sources import CrosscoderHeadsSourceConfig

HOOK = "blocks.3.hook_resid_post"


@config_class
class ListConfig(SourceConfig):
    """Yields fixed chunks: rows = value + chunk index, for every hook point of ``hooks``."""

    name: ClassVar[str] = "test_list"

    hooks: list[str] = option(factory=lambda: [HOOK], doc="Hook points provided.")
    value: float = option(0.0, doc="Offset of every activation.")
    rows: list[int] = option(factory=lambda: [4, 4, 4], doc="Rows of each chunk.")
    mask_every: int = option(0, doc="Mask every n-th row (0: none).")
    token_offset: int = option(0, doc="Added to the token ids.")


class ListSource:
    def __init__(self, config: ListConfig, context: SourceContext):
        self.config = config
        self.hooks = tuple(context.hook_points) or tuple(config.hooks)
        unknown = [h for h in self.hooks if h not in config.hooks]
        if unknown:
            raise DataError(f"test_list has no {unknown}")
        self.position = 0

    def __iter__(self):
        while self.position < len(self.config.rows):
            n = self.config.rows[self.position]
            out: dict[str, Any] = {h: torch.full((n, 3), self.config.value + self.position + i)
                                   for i, h in enumerate(self.hooks)}
            mask = torch.ones(n, dtype=torch.bool)
            if self.config.mask_every:
                mask[:: self.config.mask_every] = False
            out["mask"] = mask
            out["tokens"] = torch.arange(n) + 10 * self.position + self.config.token_offset
            self.position += 1
            yield out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


@hookimpl
def lmsae_register_sources():
    return [SourceSpec(config_class=ListConfig, factory=ListSource, summary="fixed chunks")]


@pytest.fixture
def registry(monkeypatch):
    fake_entry_points(monkeypatch, [])
    return load_registry(plugins=["lmsae_crosscoder.plugin", module("list_plugin", lmsae_register_sources=lmsae_register_sources)])


def build(registry, data: dict, keys: tuple[str, ...]):
    cfg = registry.structure({"type": "crosscoder_heads", **data}, SourceConfig)
    assert isinstance(cfg, CrosscoderHeadsSourceConfig)
    context = SourceContext(hook_points=keys, registry=registry, progress=False)
    return registry.get("source", "crosscoder_heads").factory(cfg, context)


def two_members(a: dict | None = None, b: dict | None = None) -> dict:
    return {"members": [{"keys": {"a." + HOOK: HOOK}, "source": {"type": "test_list", "value": 0.0, **(a or {})}},
                        {"keys": {"b." + HOOK: HOOK}, "source": {"type": "test_list", "value": 100.0, **(b or {})}}]}


def test_members_are_joined_under_their_keys(registry):
    source = build(registry, two_members(b={"mask_every": 2}), ("a." + HOOK, "b." + HOOK))
    chunks = list(source)
    assert len(chunks) == 3
    first = chunks[0]
    assert set(first) == {"a." + HOOK, "b." + HOOK, "mask", "tokens"}
    assert torch.equal(first["a." + HOOK], torch.zeros(4, 3))
    assert torch.equal(first["b." + HOOK], torch.full((4, 3), 100.0))
    assert first["mask"].tolist() == [False, True, False, True]  # the AND of both members' masks
    assert torch.equal(chunks[2]["tokens"], torch.arange(4) + 20)


def test_only_members_with_requested_keys_are_built(registry):
    data = two_members()
    data["members"][0]["keys"]["extra"] = HOOK
    source = build(registry, data, ("extra",))
    assert len(source.sources) == 1 and [k for k in next(iter(source)) if k not in ("mask", "tokens")] == ["extra"]
    token_only = build(registry, two_members(), ())
    assert set(next(iter(token_only))) == {"mask", "tokens"}


def test_state_round_trip_continues_where_it_stopped(registry):
    keys = ("a." + HOOK, "b." + HOOK)
    source = build(registry, two_members(), keys)
    it = iter(source)
    next(it)
    state = source.state_dict()
    assert state == {"chunks": 1, "members": [{"position": 1}, {"position": 1}]}
    rest = list(it)
    fresh = build(registry, two_members(), keys)
    fresh.load_state_dict(state)
    again = list(fresh)
    assert len(again) == len(rest) == 2
    for x, y in zip(rest, again):
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(CheckpointError, match="members"):
        build(registry, two_members(), keys[:1]).load_state_dict(state)


def test_misaligned_or_different_tokens_are_errors(registry):
    keys = ("a." + HOOK, "b." + HOOK)
    with pytest.raises(DataError, match="aligned"):
        list(build(registry, two_members(b={"rows": [4, 5, 4]}), keys))
    with pytest.raises(DataError, match="other tokens"):
        list(build(registry, two_members(b={"token_offset": 1}), keys))
    relaxed = two_members(b={"token_offset": 1})
    relaxed["check_tokens"] = False
    assert len(list(build(registry, relaxed, keys))) == 3
    with pytest.raises(DataError, match="provides no key 'c'"):
        build(registry, two_members(), ("a." + HOOK, "c"))


def test_stream_ends_with_the_shortest_member(registry):
    chunks = list(build(registry, two_members(b={"rows": [4, 4]}), ("a." + HOOK, "b." + HOOK)))
    assert len(chunks) == 2


def test_config_errors(registry):
    with pytest.raises(ConfigError, match="provided by members 0 and 1"):
        registry.structure({"type": "crosscoder_heads", "members": [
            {"keys": {"x": HOOK}, "source": {"type": "test_list"}},
            {"keys": {"x": HOOK}, "source": {"type": "test_list"}}]}, SourceConfig)
    with pytest.raises(ConfigError, match="reserved"):
        registry.structure({"type": "crosscoder_heads", "members": [
            {"keys": {"mask": HOOK}, "source": {"type": "test_list"}}]}, SourceConfig)
    with pytest.raises(ConfigError, match=r"members\[0\]\.sourc"):
        registry.structure({"type": "crosscoder_heads", "members": [
            {"keys": {"x": HOOK}, "sourc": {"type": "test_list"}}]}, SourceConfig)


@pytest.mark.lm
def test_members_with_their_own_language_models(registry):
    """Two different models (tiny random transformers with different seeds, one tokenizer) in one stream."""
    pytest.importorskip("transformer_lens")
    pytest.importorskip("datasets")
    text = {"type": "text", "dataset": {"path": "builtin:python-docs", "split": "train[:2%]"}, "context_size": 16,
            "model_batch_size": 4, "max_sequences": 8}
    data = {"members": [
        {"keys": {"seed0." + HOOK: "blocks.1.hook_resid_post"}, "source": text,
         "model": {"backend": "transformer_lens", "model": "tiny-random", "device": "cpu", "seed": 0}},
        {"keys": {"seed1." + HOOK: "blocks.1.hook_resid_post"}, "source": text,
         "model": {"backend": "transformer_lens", "model": "tiny-random", "device": "cpu", "seed": 1}},
    ]}
    keys = ("seed0." + HOOK, "seed1." + HOOK)
    chunks = list(build(registry, data, keys))
    assert len(chunks) == 2
    a, b = chunks[0][keys[0]], chunks[0][keys[1]]
    assert a.shape == b.shape == (4, 16, 64)
    assert not torch.allclose(a, b)  # two different models
    assert chunks[0]["mask"].shape == (4, 16) and len(chunks[0]["meta"]) == 4
    # each distinct model is loaded once per registry, however often the stream is rebuilt
    again = build(registry, data, keys)
    assert again.sources[0].lm is build(registry, data, keys).sources[0].lm
    assert again.sources[0].lm is not again.sources[1].lm
