"""Automatic interpretation of dictionary features with a chat model (EleutherAI-style).

- :mod:`~lmsae.autointerp.client`: an OpenAI-compatible chat-completions client (retries,
  backoff, Retry-After; standard library only).
- :mod:`~lmsae.autointerp.prompts`: stored samples -> text excerpts; explanation, detection and
  fuzzing prompts and robust parsing of the answers.
- :mod:`~lmsae.autointerp.scoring`: detection and fuzzing scores (balanced accuracy).

The ``autointerp`` task (:mod:`lmsae.tasks.autointerp`) runs them over the features in a store.
"""

from lmsae.autointerp.client import ChatClient, ChatError
from lmsae.autointerp.prompts import (
    AnswerFormatError,
    Excerpt,
    Trial,
    detection_trial,
    explanation_messages,
    fuzzing_trial,
    load_tokenizer,
    parse_explanation,
    parse_judgements,
    parse_selection,
    render_sample,
    token_pieces,
)
from lmsae.autointerp.scoring import (
    ScoreResult,
    balanced_accuracy,
    binary_metrics,
    detection_score,
    fuzzing_score,
    run_detection,
    run_fuzzing,
)

__all__ = [
    "AnswerFormatError",
    "ChatClient",
    "ChatError",
    "Excerpt",
    "ScoreResult",
    "Trial",
    "balanced_accuracy",
    "binary_metrics",
    "detection_score",
    "detection_trial",
    "explanation_messages",
    "fuzzing_score",
    "fuzzing_trial",
    "load_tokenizer",
    "parse_explanation",
    "parse_judgements",
    "parse_selection",
    "render_sample",
    "run_detection",
    "run_fuzzing",
    "token_pieces",
]
