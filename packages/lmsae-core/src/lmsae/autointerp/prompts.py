"""Turning stored samples into text excerpts, and building and parsing the three kinds of prompt.

- :func:`render_sample` decodes a :class:`~lmsae.stores.base.Sample` window around its peak into
  :class:`Excerpt` segments (text piece + the feature's activation on it).
- Explanation: :func:`explanation_messages` shows excerpts with the strongest tokens marked
  ``<<like this>>`` and asks for a short phrase; :func:`parse_explanation` cleans the answer.
- Detection: :func:`detection_trial` mixes activating and non-activating excerpts without marks
  and asks which ones the explanation fits (answer: a list of excerpt numbers).
- Fuzzing: :func:`fuzzing_trial` marks tokens in every excerpt, correctly in half and at random
  tokens in the other half, and asks for a 0/1 judgement per excerpt.

A :class:`Trial` carries the messages and the ground truth; :mod:`lmsae.autointerp.scoring`
compares the model's answer with it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from lmsae.errors import LmsaeError

OPEN, CLOSE = "<<", ">>"
#: shown for a newline inside an excerpt, so that each excerpt stays on one line of the prompt
NEWLINE = "↵"


class AnswerFormatError(LmsaeError):
    """The explainer's answer could not be read in the requested format."""


# --- tokenizers ------------------------------------------------------------------------------


def load_tokenizer(model_config: Any, registry: Any = None) -> Any:
    """A tokenizer for ``model_config`` without loading the model's weights.

    TransformerLens configs: ``"tiny-random"`` -> :class:`ByteTokenizer`; ``"smollm2-135m"`` ->
    the converted Hugging Face directory (or the GGUF file's tokenizer before the first
    conversion); a local directory or a Hugging Face name -> ``AutoTokenizer``. Other backends
    fall back to building the model through ``registry`` and taking its ``tokenizer``.
    """
    from lmsae.models.transformer_lens import ByteTokenizer

    name = getattr(model_config, "model", None)
    if name == "tiny-random":
        return ByteTokenizer()
    if isinstance(name, str) and name:
        from transformers import AutoTokenizer

        if name == "smollm2-135m":
            from lmsae.models import smollm2

            cache_dir = getattr(model_config, "cache_dir", None)
            if smollm2.is_converted(cache_dir):
                return AutoTokenizer.from_pretrained(str(smollm2.converted_dir(cache_dir)))
            gguf = smollm2.gguf_path()
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        path = Path(name).expanduser()
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise LmsaeError(f"could not load a tokenizer for model {name!r} (offline, it must be a local "
                             f"directory or in the Hugging Face cache): {e}") from None
    if registry is not None:
        lm = registry.get("language_model", model_config.name).factory(model_config)
        tokenizer = getattr(lm, "tokenizer", None)
        if tokenizer is not None:
            return tokenizer
    raise LmsaeError(f"cannot find a tokenizer for the language model config {type(model_config).__name__}")


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds, in order (``"".join`` of the pieces is the decoded text).

    Decoding prefixes, rather than single tokens, gets byte-level BPE spaces and SentencePiece
    word starts right; a token that ends inside a multi-byte character gets ``""`` and the token
    completing the character gets all of it."""
    pieces: list[str] = []
    committed = ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]))
        if text.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")  # incomplete character: wait for the next token
            continue
        if text.startswith(committed):
            pieces.append(text[len(committed):])
        else:  # the decoder rewrote earlier text (rare); fall back to the token alone
            pieces.append(tokenizer.decode([int(ids[i])]))
            text = committed + pieces[-1]
        committed = text
    return pieces


# --- excerpts --------------------------------------------------------------------------------


@attrs.frozen
class Excerpt:
    """A window of text with the feature's activation on each piece.

    ``pieces`` and ``activations`` have equal length (activations >= 0; a piece carries the
    largest activation of the tokens that make it up). ``source`` says where it came from
    (the sampling name, or ``"feature 12"`` for another feature's context)."""

    pieces: tuple[str, ...] = attrs.field(converter=tuple)
    activations: tuple[float, ...] = attrs.field(converter=lambda v: tuple(float(x) for x in v))
    source: str = ""

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)

    @property
    def text(self) -> str:
        """The excerpt without marks."""
        return _clean("".join(self.pieces))

    def strong(self, threshold: float) -> list[bool]:
        """Which pieces reach ``threshold`` × this excerpt's max activation (none when it is 0)."""
        peak = self.max_activation
        if peak <= 0:
            return [False] * len(self.pieces)
        return [a > 0 and a >= threshold * peak for a in self.activations]

    def marked(self, mask: Sequence[bool]) -> str:
        """The excerpt with the pieces in ``mask`` wrapped in ``<< >>`` (adjacent pieces share one pair)."""
        out: list[str] = []
        inside = False
        for piece, on in zip(self.pieces, mask):
            if on and not inside:
                out.append(OPEN)
            elif not on and inside:
                out.append(CLOSE)
            inside = bool(on)
            out.append(piece)
        if inside:
            out.append(CLOSE)
        return _clean("".join(out))

    def highlighted(self, threshold: float) -> str:
        """The excerpt with its strongest pieces marked (see :meth:`strong`)."""
        return self.marked(self.strong(threshold))


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", NEWLINE).replace("\t", " ").strip()


def render_sample(tokenizer: Any, sample: Any, window: int, *, source: str = "",
                  zero_activations: bool = False, skip_ids: Sequence[int] | None = None) -> Excerpt:
    """The ±``window`` tokens around the sample's peak as an :class:`Excerpt`.

    Special tokens (``skip_ids``, default the tokenizer's ``all_special_ids``) are dropped.
    ``zero_activations`` renders another feature's context as a non-activating excerpt."""
    tokens = np.asarray(sample.tokens).astype(np.int64).reshape(-1)
    acts = np.asarray(sample.activations, dtype=np.float64).reshape(-1)
    if acts.shape != tokens.shape:
        raise LmsaeError(f"sample has {tokens.size} tokens but {acts.size} activations")
    # the window is centred on the sample's own peak, also when rendered as another feature's
    # non-activating context (its activations are then zeroed for display)
    peak = int(np.argmax(acts)) if acts.size else 0
    if zero_activations:
        acts = np.zeros_like(acts)
    lo, hi = max(0, peak - window), min(tokens.size, peak + window + 1)
    special = {int(i) for i in (skip_ids if skip_ids is not None else getattr(tokenizer, "all_special_ids", []))}
    keep = [i for i in range(lo, hi) if int(tokens[i]) not in special]
    ids = [int(tokens[i]) for i in keep]
    pieces = token_pieces(tokenizer, ids)
    merged_pieces: list[str] = []
    merged_acts: list[float] = []
    carry = 0.0
    for piece, i in zip(pieces, keep):
        a = max(float(acts[i]), 0.0)
        if piece == "":  # part of a character: its activation goes to the piece that completes it
            carry = max(carry, a)
            continue
        merged_pieces.append(piece)
        merged_acts.append(max(a, carry))
        carry = 0.0
    return Excerpt(merged_pieces, merged_acts, source)


# --- prompts ---------------------------------------------------------------------------------

EXPLAIN_SYSTEM = (
    "You are helping to interpret a single feature of a language model: a unit that responds to "
    "particular tokens in particular contexts. You will see excerpts of text on which the feature is "
    "active. In each excerpt the tokens where it responds most strongly are marked between << and >>.\n"
    "Work out what the marked tokens, together with the text around them, have in common: a word or "
    "word part, a topic, a grammatical role, a pattern of formatting, or what the model is about to "
    "write next.\n"
    "Reply with the explanation only: one short phrase of at most fifteen words, on one line, with no "
    "preamble and no list of the examples.")

DETECT_SYSTEM = (
    "You are testing an explanation of a language-model feature. You will get the explanation and a "
    "numbered list of text excerpts. The feature is active somewhere in some of the excerpts and silent "
    "in all of the others.\n"
    "Using only the explanation, decide in which excerpts the feature is active.\n"
    "Reply with a JSON list of the numbers of those excerpts, for example [2, 5], and nothing else. "
    "Reply [] if it is active in none of them.")

FUZZ_SYSTEM = (
    "You are testing an explanation of a language-model feature. You will get the explanation and a "
    "numbered list of text excerpts in which some tokens are marked between << and >>. In some excerpts "
    "the marks are on the tokens where the feature is active; in the others they were placed on "
    "arbitrary tokens.\n"
    "For every excerpt, answer 1 if the marked tokens are ones the explanation describes, and 0 if they "
    "are not.\n"
    "Reply with a JSON list of 0s and 1s, one per excerpt in order, for example [1, 0, 1], and nothing else.")


def _numbered(lines: Sequence[str]) -> str:
    return "\n".join(f"Excerpt {i}: {line}" for i, line in enumerate(lines, start=1))


def explanation_messages(excerpts: Sequence[Excerpt], highlight_threshold: float) -> list[dict[str, str]]:
    """System + user messages asking for an explanation of the feature active on ``excerpts``."""
    user = (f"{_numbered([e.highlighted(highlight_threshold) for e in excerpts])}\n\n"
            "What do the marked tokens have in common? Answer with a short phrase.")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


_PREFIX = re.compile(r"^\s*(?:\**\s*)?(?:final\s+)?(?:explanation|answer|feature|description)\s*\**\s*[:\-–]\s*\**",
                     re.IGNORECASE)
_QUOTES = (("\"", "\""), ("'", "'"), ("`", "`"), ("“", "”"), ("‘", "’"), ("**", "**"))


def parse_explanation(answer: str) -> str:
    """The explanation in a free-text answer: the first non-empty line, without an
    ``Explanation:``-style prefix, surrounding quotes or trailing full stop. A JSON object with
    an ``explanation`` (or ``final_explanation``) key is also accepted.

    Raises :class:`AnswerFormatError` when nothing is left."""
    text = answer.strip()
    text = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", text).strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            for key in ("final_explanation", "explanation", "answer"):
                if isinstance(data.get(key), str) and data[key].strip():
                    text = data[key].strip()
                    break
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if _PREFIX.match(line) and not _PREFIX.sub("", line).strip() and len(lines) > 1:
        line = lines[1]  # "Explanation:" alone on its line, the answer below it
    line = _PREFIX.sub("", line).strip().rstrip(".").strip()
    changed = True
    while changed:
        changed = False
        for a, b in _QUOTES:
            inner = line[len(a): len(line) - len(b)]
            # only a pair around the whole line: '"cat" and "dog"' keeps its quotes
            if len(line) > len(a) + len(b) and line.startswith(a) and line.endswith(b) and b not in inner:
                line = inner.strip()
                changed = True
    line = line.rstrip(".").strip()
    if not line:
        raise AnswerFormatError(f"the explainer gave no explanation: {answer[:120]!r}")
    return line


@attrs.frozen
class Trial:
    """One scoring prompt and its ground truth.

    ``truth[i]`` is whether excerpt ``i + 1`` is a positive (activating for detection, correctly
    marked for fuzzing); ``items[i]`` describes it (``text``, ``source``) for the record."""

    messages: list[dict[str, str]]
    truth: tuple[bool, ...] = attrs.field(converter=lambda v: tuple(bool(x) for x in v))
    items: tuple[dict[str, Any], ...] = attrs.field(converter=tuple, factory=tuple)


def detection_trial(explanation: str, activating: Sequence[Excerpt], non_activating: Sequence[Excerpt],
                    rng: random.Random) -> Trial:
    """Shuffled activating and non-activating excerpts, without marks."""
    pool = [(e, True) for e in activating] + [(e, False) for e in non_activating]
    rng.shuffle(pool)
    lines = [e.text for e, _ in pool]
    user = f"Explanation: {explanation}\n\n{_numbered(lines)}\n\nIn which excerpts is the feature active?"
    items = [{"text": line, "source": e.source} for line, (e, _) in zip(lines, pool)]
    return Trial([{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": user}],
                 [t for _, t in pool], items)


def mislabel(excerpt: Excerpt, threshold: float, rng: random.Random) -> list[bool] | None:
    """A mask marking as many random pieces as :meth:`Excerpt.strong` marks, but chosen among pieces
    where the feature is silent (below ``threshold`` × max, not whitespace). None when the excerpt
    has no such piece."""
    strong = excerpt.strong(threshold)
    n = max(1, sum(strong))
    peak = excerpt.max_activation
    quiet = [i for i, (p, a) in enumerate(zip(excerpt.pieces, excerpt.activations))
             if p.strip() and not strong[i] and a < threshold * peak]
    silent = [i for i in quiet if excerpt.activations[i] == 0.0]
    candidates = silent if len(silent) >= n else quiet  # prefer tokens where it is fully off
    if not candidates:
        return None
    chosen = set(rng.sample(candidates, min(n, len(candidates))))
    return [i in chosen for i in range(len(excerpt.pieces))]


def fuzzing_trial(explanation: str, correct: Sequence[Excerpt], wrong: Sequence[Excerpt], threshold: float,
                  rng: random.Random) -> Trial:
    """``correct`` excerpts marked at their strong tokens, ``wrong`` ones marked at random silent
    tokens (those without any silent token are dropped), shuffled."""
    pool: list[tuple[Excerpt, str, bool]] = [(e, e.highlighted(threshold), True) for e in correct]
    for e in wrong:
        mask = mislabel(e, threshold, rng)
        if mask is not None:
            pool.append((e, e.marked(mask), False))
    rng.shuffle(pool)
    lines = [line for _, line, _ in pool]
    user = (f"Explanation: {explanation}\n\n{_numbered(lines)}\n\n"
            "For each excerpt, do the marked tokens fit the explanation?")
    items = [{"text": line, "source": e.source} for e, line, _ in pool]
    return Trial([{"role": "system", "content": FUZZ_SYSTEM}, {"role": "user", "content": user}],
                 [t for _, _, t in pool], items)


# --- parsing list answers ----------------------------------------------------------------------


def _json_list(answer: str) -> list[Any] | None:
    """The last ``[...]`` in the answer that parses as a JSON list (models sometimes think first)."""
    for match in reversed(re.findall(r"\[[^\[\]]*\]", answer)):
        try:
            value = json.loads(match)
        except ValueError:
            continue
        if isinstance(value, list):
            return value
    return None


def parse_selection(answer: str, n: int) -> list[bool]:
    """Which of ``n`` excerpts an answer selects: a JSON list of 1-based numbers (``[1, 3]``), or
    numbers in text (``"1, 3 and 4"``), or ``"none"``. Numbers outside 1..n are ignored."""
    values = _json_list(answer)
    if values is None:
        numbers = re.findall(r"\d+", answer)
        if numbers:
            values = numbers
        elif re.search(r"\bnone\b|\bno excerpts?\b", answer, re.IGNORECASE):
            values = []
        else:
            raise AnswerFormatError(f"expected a list of excerpt numbers, got {answer[:120]!r}")
    chosen = set()
    for v in values:
        try:
            k = int(v)
        except (TypeError, ValueError):
            continue
        if 1 <= k <= n:
            chosen.add(k)
    return [i in chosen for i in range(1, n + 1)]


_YES = {"1", "true", "yes", "y", "correct"}
_NO = {"0", "false", "no", "n", "incorrect"}


def parse_judgements(answer: str, n: int) -> list[bool]:
    """``n`` yes/no judgements: a JSON list of 0/1 (or booleans, or "yes"/"no"), else the 0s and
    1s found in the text in order. Raises :class:`AnswerFormatError` unless exactly ``n`` are found."""
    values = _json_list(answer)
    if values is None:
        values = re.findall(r"\b[01]\b|\btrue\b|\bfalse\b", answer, re.IGNORECASE)
    out: list[bool] = []
    for v in values:
        key = str(v).strip().lower()
        if isinstance(v, bool):
            out.append(v)
        elif key in _YES:
            out.append(True)
        elif key in _NO:
            out.append(False)
        else:
            raise AnswerFormatError(f"expected a list of 0s and 1s, got {answer[:120]!r}")
    if len(out) != n:
        raise AnswerFormatError(f"expected {n} judgements, got {len(out)}: {answer[:120]!r}")
    return out
