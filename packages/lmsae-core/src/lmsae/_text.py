"""Small text helpers for error messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice most similar to ``name`` (None if nothing is close)."""
    choices = list(choices)
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not matches:
        lowered = {c.lower(): c for c in choices}
        matches = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
        matches = [lowered[m] for m in matches]
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` or ``""``."""
    c = closest(name, choices)
    return f"; did you mean {c!r}?" if c else ""


def join_names(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names) if names else "(none installed)"
