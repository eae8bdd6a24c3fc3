"""The language-model interface every backend implements.

A backend turns token ids into activations at named hook points (TransformerLens names such as
``blocks.3.hook_resid_post``), stopping the forward pass at the last layer a run needs, and
computes per-token losses for evaluation (with optional hook replacements for splicing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

#: A replacement applied at a hook point during a forward pass: (activation, hook_name) -> new activation.
HookFn = Callable[[Tensor, str], Tensor]


@runtime_checkable
class LanguageModel(Protocol):
    """What sources, evaluation and analysis need from a language model."""

    #: a short name recorded in caches and stores (e.g. "smollm2-135m")
    name: str
    #: the Hugging Face tokenizer (``tokenizer(text)``, ``decode(ids)``, offsets)
    tokenizer: Any
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int
    d_model: int
    n_layers: int
    n_ctx: int
    d_vocab: int
    device: torch.device

    def hook_dims(self, hook_points: Sequence[str]) -> dict[str, int]:
        """Width of each hook point's activations; :class:`lmsae.errors.DataError` for an unknown hook
        (naming it and suggesting the closest valid name)."""
        ...

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        ...

    def activations(self, tokens: Tensor, hook_points: Sequence[str],
                    attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Activations ``(batch, context, d)`` at ``hook_points`` for token ids ``(batch, context)``,
        running only up to the last layer needed. Padding must not change the activations of real
        tokens (right padding with a causal model)."""
        ...

    def token_losses(self, tokens: Tensor, attention_mask: Tensor | None = None,
                     replacements: Mapping[str, HookFn] | None = None) -> Tensor:
        """Per-token next-token cross-entropy ``(batch, context - 1)`` (position t predicts token t+1),
        with ``replacements`` applied at their hook points during the forward pass."""
        ...

    def logits(self, tokens: Tensor, attention_mask: Tensor | None = None,
               replacements: Mapping[str, HookFn] | None = None) -> Tensor:
        """Logits ``(batch, context, d_vocab)``, with optional hook replacements."""
        ...
