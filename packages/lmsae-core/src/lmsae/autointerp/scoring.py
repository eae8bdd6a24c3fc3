"""Scoring explanations: detection and fuzzing, as balanced accuracy.

Both scorers reduce to a binary classification of excerpts (positive = activating for
detection, correctly marked for fuzzing). The score is the **balanced accuracy**, the mean of the
true-positive rate and the true-negative rate, so that an explainer answering "all" or "none"
gets 0.5 whatever the mix. When one class is absent the other's rate alone is the score (and
``metrics["n_positive"]``/``["n_negative"]`` say so).

:func:`detection_score` and :func:`fuzzing_score` take a :class:`~lmsae.autointerp.prompts.Trial`
and the model's raw answer; :func:`run_detection` and :func:`run_fuzzing` also build the prompt and
ask the model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from lmsae.autointerp.prompts import (
    Excerpt,
    Trial,
    detection_trial,
    fuzzing_trial,
    parse_judgements,
    parse_selection,
)
from lmsae.errors import LmsaeError

#: ``complete(messages) -> reply text`` (e.g. :meth:`ChatClient.complete`)
Complete = Callable[[list[dict[str, str]]], str]


def binary_metrics(truth: Sequence[bool], predicted: Sequence[bool]) -> dict[str, float]:
    """Confusion counts and rates of ``predicted`` against ``truth`` (equal lengths).

    Keys: ``tp fp tn fn n_positive n_negative accuracy precision recall specificity f1
    balanced_accuracy``. Undefined ratios (no positives, ...) are NaN, except
    ``balanced_accuracy``, which averages the rates of the classes present."""
    if len(truth) != len(predicted):
        raise LmsaeError(f"{len(truth)} labels but {len(predicted)} predictions")
    tp = sum(1 for t, p in zip(truth, predicted) if t and p)
    fn = sum(1 for t, p in zip(truth, predicted) if t and not p)
    tn = sum(1 for t, p in zip(truth, predicted) if not t and not p)
    fp = sum(1 for t, p in zip(truth, predicted) if not t and p)
    pos, neg = tp + fn, tn + fp

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    recall, specificity, precision = ratio(tp, pos), ratio(tn, neg), ratio(tp, tp + fp)
    rates = [r for r in (recall, specificity) if not math.isnan(r)]
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {"tp": float(tp), "fp": float(fp), "tn": float(tn), "fn": float(fn), "n_positive": float(pos),
            "n_negative": float(neg), "accuracy": ratio(tp + tn, pos + neg), "precision": precision,
            "recall": recall, "specificity": specificity, "f1": f1,
            "balanced_accuracy": sum(rates) / len(rates) if rates else math.nan}


def balanced_accuracy(truth: Sequence[bool], predicted: Sequence[bool]) -> float:
    """Mean of the true-positive and true-negative rates (of the classes present), in [0, 1]."""
    return binary_metrics(truth, predicted)["balanced_accuracy"]


@attrs.frozen
class ScoreResult:
    """A scorer's outcome: ``score`` (balanced accuracy), all ``metrics``, the raw ``answer`` and
    one record per excerpt (``number``, ``text``, ``source``, ``truth``, ``predicted``)."""

    score: float
    metrics: dict[str, float]
    answer: str
    examples: list[dict[str, Any]]

    def details(self) -> dict[str, Any]:
        """Plain JSON data for :attr:`Interpretation.details` (NaN written as None)."""
        return {"score": _json_float(self.score),
                "metrics": {k: _json_float(v) for k, v in self.metrics.items()},
                "answer": self.answer, "examples": self.examples}


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _result(trial: Trial, predicted: Sequence[bool], answer: str) -> ScoreResult:
    metrics = binary_metrics(trial.truth, predicted)
    examples = []
    for i, (t, p) in enumerate(zip(trial.truth, predicted)):
        item = trial.items[i] if i < len(trial.items) else {}
        examples.append({"number": i + 1, **item, "truth": bool(t), "predicted": bool(p)})
    return ScoreResult(metrics["balanced_accuracy"], metrics, answer, examples)


def detection_score(trial: Trial, answer: str | Sequence[int]) -> ScoreResult:
    """Score a detection answer: the raw reply (parsed with :func:`parse_selection`) or the
    1-based numbers of the excerpts the model selected."""
    n = len(trial.truth)
    if isinstance(answer, str):
        predicted, raw = parse_selection(answer, n), answer
    else:
        chosen = {int(k) for k in answer}
        predicted, raw = [i in chosen for i in range(1, n + 1)], str(sorted(chosen))
    return _result(trial, predicted, raw)


def fuzzing_score(trial: Trial, answer: str | Sequence[bool | int]) -> ScoreResult:
    """Score a fuzzing answer: the raw reply (parsed with :func:`parse_judgements`) or one 0/1
    judgement per excerpt ("the marks fit the explanation")."""
    n = len(trial.truth)
    if isinstance(answer, str):
        predicted, raw = parse_judgements(answer, n), answer
    else:
        predicted = [bool(v) for v in answer]
        if len(predicted) != n:
            raise LmsaeError(f"expected {n} judgements, got {len(predicted)}")
        raw = str([int(v) for v in predicted])
    return _result(trial, predicted, raw)


def run_detection(complete: Complete, explanation: str, activating: Sequence[Excerpt],
                  non_activating: Sequence[Excerpt], rng: random.Random) -> ScoreResult:
    """Build a detection trial, ask the model and score its answer."""
    if not activating and not non_activating:
        raise LmsaeError("detection needs at least one excerpt")
    trial = detection_trial(explanation, activating, non_activating, rng)
    return detection_score(trial, complete(trial.messages))


def run_fuzzing(complete: Complete, explanation: str, correct: Sequence[Excerpt], wrong: Sequence[Excerpt],
                threshold: float, rng: random.Random) -> ScoreResult:
    """Build a fuzzing trial, ask the model and score its answer."""
    trial = fuzzing_trial(explanation, correct, wrong, threshold, rng)
    if not trial.truth:
        raise LmsaeError("fuzzing needs at least one excerpt")
    return fuzzing_score(trial, complete(trial.messages))
