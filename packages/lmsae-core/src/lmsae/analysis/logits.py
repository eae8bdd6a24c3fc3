"""Direct logit attribution (DLA): which output tokens a feature's decoder direction promotes.

For each feature and each output hook point h of the dictionary, its write direction d
(``model.decoder_directions()[h][i]``, raw residual-stream units) is pushed through the language
model's final normalisation and unembedding as if it were a residual-stream vector:

    logits(d) = unembed(ln_final(d)) - unembed(ln_final(0))

"Through the final norm" means: d is normalised like a residual vector (LayerNorm centres it and
divides by its standard deviation, RMSNorm divides by its root mean square; the norm's weight is
applied, or lives in W_U when TransformerLens folded it), so the direction's length does not
matter. The second term removes what every direction gets regardless of d: the norm's bias and
the unembedding bias (with ``fold_ln`` the former is folded into the latter, so this makes the
result the same with and without folding); nothing else is subtracted. ``include_bias=True``
keeps them (the reference implementation's ``unembed(ln_final(d))``).

A dictionary with several output hooks (e.g. a cross-layer transcoder) gets the sum of the logits
of its per-hook directions, each normalised separately.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lmsae.errors import LmsaeError
from lmsae.stores.base import LogitAttribution, TokenLogit

__all__ = ["direct_logit_attribution", "direction_logits"]


def _hooked(lm: Any) -> Any:
    hooked = getattr(lm, "hooked", None)
    if hooked is None or not hasattr(hooked, "unembed"):
        raise LmsaeError(f"direct logit attribution needs a TransformerLens model (backend = \"transformer_lens\"); "
                         f"{type(lm).__name__} has no unembedding to attribute to")
    return hooked


@torch.no_grad()
def direction_logits(lm: Any, directions: Tensor, *, include_bias: bool = False) -> Tensor:
    """Logits of residual-stream directions ``(n, d_model)`` -> float32 ``(n, d_vocab)`` (see the
    module docstring for the exact definition)."""
    hooked = _hooked(lm)
    # a model without normalisation (normalization_type None) has no ln_final
    final_norm: Callable[[Tensor], Tensor] = getattr(hooked, "ln_final", None)
    if final_norm is None:
        final_norm = nn.Identity()
    W_U = hooked.unembed.W_U
    if directions.ndim != 2 or directions.shape[1] != W_U.shape[0]:
        raise LmsaeError(f"directions must be (n, d_model={W_U.shape[0]}), got {tuple(directions.shape)}; does the "
                         "dictionary write to this model's residual stream?")
    x = directions.to(device=W_U.device, dtype=W_U.dtype)[:, None, :]  # (n, pos=1, d_model)
    logits = hooked.unembed(final_norm(x))[:, 0].float()
    if not include_bias:
        zero = torch.zeros_like(x[:1])
        logits = logits - hooked.unembed(final_norm(zero))[:, 0].float()
    return logits


def _token_strings(tokenizer: Any) -> Callable[[int], str]:
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            try:
                cache[token_id] = tokenizer.decode([token_id])
            except (IndexError, KeyError, OverflowError, TypeError, ValueError):
                # ids beyond the tokenizer's vocabulary (embedding matrices padded to a round size)
                cache[token_id] = f"<id {token_id}>"
        return cache[token_id]

    return text


@torch.no_grad()
def direct_logit_attribution(model: Any, lm: Any, top_k: int = 10, batch: int = 512, *,
                             include_bias: bool = False) -> list[LogitAttribution]:
    """The ``top_k`` most promoted and most suppressed tokens of every feature of ``model``.

    ``model`` is a :class:`~lmsae.dictionary.SparseDictionary` providing ``decoder_directions()``;
    ``lm`` a TransformerLens-backed language model (``lm.hooked``, ``lm.tokenizer``). Features
    are processed ``batch`` at a time. ``top_positive`` is ordered from the largest logit down,
    ``top_negative`` from the most negative up; tokens are decoded one by one with the tokenizer.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    directions = model.decoder_directions()
    if not directions:
        raise LmsaeError(f"{type(model).__name__} returned no decoder directions")
    n = {int(d.shape[0]) for d in directions.values()}
    if len(n) != 1:
        raise LmsaeError(f"decoder directions disagree on the number of features: "
                         f"{ {h: tuple(d.shape) for h, d in directions.items()} }")
    n_features = n.pop()
    text = _token_strings(lm.tokenizer)
    out: list[LogitAttribution] = []
    for start in range(0, n_features, batch):
        stop = min(start + batch, n_features)
        logits = sum(direction_logits(lm, d[start:stop], include_bias=include_bias) for d in directions.values())
        k = min(top_k, logits.shape[1])
        top = torch.topk(logits, k, dim=1)
        bottom = torch.topk(logits, k, dim=1, largest=False)
        top_v, top_i = top.values.cpu().tolist(), top.indices.cpu().tolist()
        bot_v, bot_i = bottom.values.cpu().tolist(), bottom.indices.cpu().tolist()
        for row in range(stop - start):
            out.append(LogitAttribution(
                index=start + row,
                top_positive=[TokenLogit(t, text(t), v) for t, v in zip(top_i[row], top_v[row])],
                top_negative=[TokenLogit(t, text(t), v) for t, v in zip(bot_i[row], bot_v[row])]))
    return out
