"""The dictionary inside the language model: next-token loss with its predictions spliced in.

:func:`splice_losses` runs the language model several times on one batch of token ids and
returns per-token numbers (shape ``(batch, context - 1)``; entry ``t`` is about the prediction of
token ``t + 1`` from the tokens up to ``t``):

- ``clean``: cross-entropy (nats) of the unchanged model;
- ``spliced``: cross-entropy with every output hook point of the dictionary replaced by the
  dictionary's prediction;
- ``ablated``: cross-entropy with every output hook point replaced by zeros;
- ``kl``: ``KL(p_clean || p_spliced) = sum_v p_clean(v) (log p_clean(v) - log p_spliced(v))`` over
  the vocabulary; ``kl_ablated``: the same against the zero-ablated model;
- ``valid``: bool, the positions the averages use: ``mask[t]`` and, with an attention mask,
  ``attention_mask[t + 1]`` (the target is a real token).

Splicing is closed-loop: during the spliced pass, the activations at the dictionary's input hook
points are captured as the pass reaches them, and the prediction at an output hook point is
computed from those captured inputs with :meth:`SparseDictionary.reconstruct_hooks`. A transcoder
reading ``blocks.0.ln2.hook_normalized`` and writing ``blocks.0.hook_mlp_out`` therefore sees the
spliced run's own input, and a dictionary with several outputs sees the effect of its earlier
replacements on its later inputs. Replacements (spliced and ablated) are applied only where
``mask`` is True: BOS and padding positions keep their activation, since a dictionary is not
trained on them.

``mode="per_hook"`` splices (and ablates) one output hook point at a time, the others staying
clean, and reports ``spliced/<hook>``, ``ablated/<hook>``, ``kl/<hook>``, ``kl_ablated/<hook>``
too. The predictions then come from the *clean* pass's inputs, computed once: inputs upstream of
the spliced hook are identical in the clean and the spliced pass (nothing before it changed),
inputs downstream of it are the clean ones, so this mode also works when some input hook point
comes after an output hook point in the forward pass (e.g. a crosscoder reading every layer). The
joint ``spliced``/``ablated``/``kl``/``kl_ablated`` entries are included in this mode only when
the closed loop is possible (the dictionary can predict each output hook point from the inputs
reached before it).

Aggregates over many batches (:class:`SpliceAccumulator`, from sums over all valid positions,
never averages of per-batch ratios):

- ``ce_clean``, ``ce_spliced``, ``ce_ablated``: mean cross-entropy (nats per token);
- ``ce_loss_recovered = (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)``: the standard
  fraction of the loss recovered relative to zero ablation (SAELens' ``ce_loss_score``,
  dictionary_learning's ``frac_recovered``); 1 is a perfect dictionary, 0 is no better than
  zeros. The reference system reported the inverse, ``(ablated - clean) / (ablated - spliced)``;
- ``ce_loss_increase = ce_spliced - ce_clean`` (nats per token);
- ``kl_div``: mean ``KL(clean || spliced)``; ``kl_div_ablated``: mean ``KL(clean || ablated)``;
- ``kl_div_score = (kl_div_ablated - kl_div) / kl_div_ablated`` (SAELens' ``kl_div_score``);
- per hook (``mode="per_hook"``), the same names with ``/<hook>`` appended.

A ratio whose denominator is zero is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lmsae.dictionary.base import SparseDictionary
from lmsae.errors import DataError, LmsaeError, ShapeError

__all__ = [
    "SpliceAccumulator",
    "SpliceMode",
    "SpliceOrderError",
    "evaluate_splice",
    "splice_losses",
    "splice_metrics",
]

SpliceMode = Literal["all", "per_hook"]

#: per-token entries of :func:`splice_losses` that are averaged (joint and, with "/hook", per hook)
_CE_KEYS = ("spliced", "ablated")
_KL_KEYS = ("kl", "kl_ablated")


class SpliceOrderError(LmsaeError):
    """An output hook point was reached before the input hook points its prediction needs."""


class _Splicer:
    """The replacement functions of one spliced forward pass (closed loop).

    Inputs are captured when the pass reaches them; at an output hook point the prediction is
    computed from what has been captured so far. A prediction is reused for later output hook
    points as long as no new input was captured in between (one dictionary call per output
    hook point at most, one in total when all inputs come first).
    """

    def __init__(self, dictionary: SparseDictionary, mask: Tensor, splice: Iterable[str]):
        self.dictionary = dictionary
        self.mask = mask
        self.hooks_in = tuple(dictionary.config.hooks_in)
        self.splice = set(splice)
        self.captured: dict[str, Tensor] = {}
        self.order: list[str] = []
        self._cached: tuple[tuple[str, ...], dict[str, Tensor]] | None = None
        param = next(dictionary.parameters(), None)
        self.device = param.device if param is not None else mask.device
        self.dtype = param.dtype if param is not None else None

    def cast(self, value: Tensor) -> Tensor:
        """``value`` on the dictionary's device and in its dtype."""
        return value.to(device=self.device, dtype=self.dtype or value.dtype)

    def _predict(self, hook: str) -> Tensor:
        key = tuple(sorted(self.captured))
        if self._cached is None or self._cached[0] != key:
            missing = [h for h in self.hooks_in if h not in self.captured]
            inputs = {h: self.cast(v) for h, v in self.captured.items()}
            mask = self.mask.to(self.device)
            try:
                predictions = self.dictionary.reconstruct_hooks(inputs, mask)
            except DataError:
                if missing:
                    raise self._order_error(hook, missing) from None
                raise
            self._cached = (key, predictions)
        predictions = self._cached[1]
        if hook not in predictions:
            missing = [h for h in self.hooks_in if h not in self.captured]
            raise self._order_error(hook, missing)
        return predictions[hook]

    def _order_error(self, hook: str, missing: list[str]) -> SpliceOrderError:
        return SpliceOrderError(
            f"the forward pass reached output hook point {hook!r} before input hook point(s) {missing} of "
            f"the dictionary, so its prediction cannot be computed from the spliced run's own inputs "
            f"(hooks_in must come no later than hooks_out in the forward pass). Use mode=\"per_hook\" "
            f"(splice one output hook at a time, predicting from the clean run's inputs)")

    def __call__(self, act: Tensor, hook: str) -> Tensor:
        self.order.append(hook)
        if hook in self.hooks_in:
            # a copy: later modules must not be able to change what the dictionary reads
            self.captured[hook] = act.detach().clone()
        if hook not in self.splice:
            return act
        prediction = self._predict(hook)
        if prediction.shape != act.shape:
            raise ShapeError(f"the dictionary predicts {hook!r} with shape {tuple(prediction.shape)}, the model's "
                             f"activation has shape {tuple(act.shape)}")
        return torch.where(self.mask.to(act.device)[..., None], prediction.to(act.device, act.dtype), act)


def _zero_at(mask: Tensor) -> Any:
    def replace(act: Tensor, hook: str) -> Tensor:
        return torch.where(mask.to(act.device)[..., None], torch.zeros_like(act), act)

    return replace


def _fixed_at(mask: Tensor, value: Tensor) -> Any:
    def replace(act: Tensor, hook: str) -> Tensor:
        if value.shape != act.shape:
            raise ShapeError(f"the dictionary predicts {hook!r} with shape {tuple(value.shape)}, the model's "
                             f"activation has shape {tuple(act.shape)}")
        return torch.where(mask.to(act.device)[..., None], value.to(act.device, act.dtype), act)

    return replace


def _log_probs(logits: Tensor) -> Tensor:
    # at least float32: KL of nearly equal distributions is a small difference of large sums
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.log_softmax(logits[:, :-1].to(dtype), dim=-1)


def _ce(log_probs: Tensor, targets: Tensor) -> Tensor:
    return -log_probs.gather(-1, targets[..., None]).squeeze(-1)


def _kl(clean: Tensor, other: Tensor) -> Tensor:
    # sum_v p (log p - log q); kl_div with log_target takes exp of the clean log-probs itself
    return F.kl_div(other, clean, log_target=True, reduction="none").sum(-1)


@torch.no_grad()
def splice_losses(lm: Any, dictionary: SparseDictionary, tokens: Tensor, attention_mask: Tensor | None = None,
                  mask: Tensor | None = None, *, mode: SpliceMode = "all") -> dict[str, Tensor]:
    """Per-token losses of ``lm`` on ``tokens`` with ``dictionary`` spliced in (module docstring).

    Args:
        lm: a :class:`lmsae.models.base.LanguageModel` (``logits`` with ``replacements``).
        dictionary: its hook points are the model's hook point names; on any device/dtype
            (inputs are cast to it, predictions cast back).
        tokens: int ``(batch, context)``.
        attention_mask: optional ``(batch, context)``, 0 at padding (right padding).
        mask: optional bool ``(batch, context)``: where the replacements apply and which
            positions count. Default: the attention mask (every position without one). Pass the
            training mask (BOS excluded) of the activation source.
        mode: ``"all"`` or ``"per_hook"``.

    Returns:
        ``{"valid", "clean", "spliced", "ablated", "kl", "kl_ablated"}`` (and per-hook entries in
        ``"per_hook"`` mode), each ``(batch, context - 1)``; ``valid`` is bool, the others
        float32 (float64 for a float64 model) on the model's device.

    Raises:
        SpliceOrderError: in ``"all"`` mode, an output hook point is reached before the input hook
            points its prediction needs (suggests ``mode="per_hook"``); a :class:`LmsaeError`.
        ShapeError: tokens/masks of mismatched shapes, or fewer than 2 positions.
    """
    if mode not in ("all", "per_hook"):
        raise LmsaeError(f"splice mode must be 'all' or 'per_hook', got {mode!r}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ShapeError(f"tokens must have shape (batch, context) with context >= 2, got {tuple(tokens.shape)}")
    for what, m in (("attention_mask", attention_mask), ("mask", mask)):
        if m is not None and tuple(m.shape) != tuple(tokens.shape):
            raise ShapeError(f"{what} has shape {tuple(m.shape)}, tokens have {tuple(tokens.shape)}")
    device = torch.device(getattr(lm, "device", tokens.device))
    tokens = tokens.to(device)
    if mask is None:
        mask = (attention_mask.bool() if attention_mask is not None
                else torch.ones(tokens.shape, dtype=torch.bool))
    mask = mask.to(device).bool()
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    valid = mask[:, :-1].clone()
    if attention_mask is not None:
        valid &= attention_mask[:, 1:].bool()
    targets = tokens[:, 1:]

    hooks_in = tuple(dictionary.config.hooks_in)
    hooks_out = tuple(dictionary.config.hooks_out)
    all_hooks = tuple(dict.fromkeys((*hooks_in, *hooks_out)))
    was_training = dictionary.training
    dictionary.eval()
    try:
        # clean pass: also records the order the hook points fire in, and the clean inputs
        clean_run = _Splicer(dictionary, mask, splice=())
        lp_clean = _log_probs(lm.logits(tokens, attention_mask, replacements={h: clean_run for h in all_hooks}))
        out: dict[str, Tensor] = {"valid": valid, "clean": _ce(lp_clean, targets)}

        def record(suffix: str, replacements: Mapping[str, Any], what: str) -> None:
            lp = _log_probs(lm.logits(tokens, attention_mask, replacements=replacements))
            ce_key, kl_key = ("spliced", "kl") if what == "spliced" else ("ablated", "kl_ablated")
            out[ce_key + suffix] = _ce(lp, targets)
            out[kl_key + suffix] = _kl(lp_clean, lp)

        fired = {h: i for i, h in enumerate(clean_run.order)}
        missing = [h for h in all_hooks if h not in fired]
        if missing:
            raise DataError(f"the language model never reached hook point(s) {missing} during its forward pass")
        in_order = max(fired[h] for h in hooks_in) <= min(fired[h] for h in hooks_out)

        if not (mode == "per_hook" and in_order and len(hooks_out) == 1):  # that case is filled in below
            splicer = _Splicer(dictionary, mask, splice=hooks_out)
            try:
                record("", {h: splicer for h in all_hooks}, "spliced")
            except SpliceOrderError:
                if mode == "all":
                    raise
                # per_hook: the joint pass is impossible for this dictionary and model; omit it
            else:
                zero = _zero_at(mask)
                record("", {h: zero for h in hooks_out}, "ablated")
        if mode == "per_hook":
            inputs = {h: clean_run.cast(clean_run.captured[h]) for h in hooks_in}
            predictions = dictionary.reconstruct_hooks(inputs, mask.to(clean_run.device))
            for hook in hooks_out:
                if hook not in predictions:
                    raise DataError(f"{type(dictionary).__name__}.reconstruct_hooks returned no prediction "
                                    f"for output hook point {hook!r}")
                record(f"/{hook}", {hook: _fixed_at(mask, predictions[hook])}, "spliced")
                record(f"/{hook}", {hook: _zero_at(mask)}, "ablated")
            if in_order and len(hooks_out) == 1:
                # with one output hook reached after every input, the clean inputs are the
                # spliced run's inputs: the closed loop gives exactly these numbers
                (hook,) = hooks_out
                for key in (*_CE_KEYS, *_KL_KEYS):
                    out[key] = out[f"{key}/{hook}"]
    finally:
        dictionary.train(was_training)
    return out


def splice_metrics(sums: Mapping[str, float], n_tokens: float) -> dict[str, float]:
    """Aggregate metrics (module docstring) from ``sums[key]`` = sum over valid positions of the
    per-token entry ``key`` of :func:`splice_losses`, and the number of valid positions."""
    n = float(n_tokens)

    def mean(key: str) -> float:
        return sums[key] / n if n > 0 else math.nan

    def ratio(num: float, den: float) -> float:
        return num / den if den != 0 and math.isfinite(den) else math.nan

    out: dict[str, float] = {"n_tokens": n}
    if "clean" not in sums:
        return out
    clean = mean("clean")
    out["ce_clean"] = clean
    suffixes = [""] + sorted({k[len("spliced"):] for k in sums if k.startswith("spliced/")})
    for suffix in suffixes:
        if "spliced" + suffix not in sums:
            continue
        spliced, ablated = mean("spliced" + suffix), mean("ablated" + suffix)
        kl, kl_ablated = mean("kl" + suffix), mean("kl_ablated" + suffix)
        out["ce_spliced" + suffix] = spliced
        out["ce_ablated" + suffix] = ablated
        out["ce_loss_recovered" + suffix] = ratio(ablated - spliced, ablated - clean)
        out["ce_loss_increase" + suffix] = spliced - clean
        out["kl_div" + suffix] = kl
        out["kl_div_ablated" + suffix] = kl_ablated
        out["kl_div_score" + suffix] = ratio(kl_ablated - kl, kl_ablated)
    return out


class SpliceAccumulator:
    """Sums of the per-token entries of :func:`splice_losses` over many batches (float64)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n_tokens = 0

    def update(self, losses: Mapping[str, Tensor]) -> int:
        """Add one batch; returns its number of valid positions."""
        valid = losses["valid"].bool()
        n = int(valid.sum())
        for key, value in losses.items():
            if key == "valid":
                continue
            self.sums[key] = self.sums.get(key, 0.0) + float(value.double()[valid].sum())
        self.n_tokens += n
        return n

    def metrics(self) -> dict[str, float]:
        """The aggregates (:func:`splice_metrics`)."""
        return splice_metrics(self.sums, self.n_tokens)


def evaluate_splice(lm: Any, dictionary: SparseDictionary, batches: Iterable[Mapping[str, Any]], n_tokens: int, *,
                    mode: SpliceMode = "all") -> dict[str, float]:
    """Aggregate splice metrics over ``batches`` until ``n_tokens`` valid positions are counted.

    Each batch holds ``"tokens"`` ``(batch, context)``, optionally ``"mask"`` (where to splice and
    what counts) and ``"attention_mask"``."""
    acc = SpliceAccumulator()
    for batch in batches:
        acc.update(splice_losses(lm, dictionary, batch["tokens"], batch.get("attention_mask"), batch.get("mask"),
                                 mode=mode))
        if acc.n_tokens >= n_tokens:
            break
    return acc.metrics()
