"""Helpers to declare configuration classes: every field carries a docstring.

A config class is an attrs class built with :func:`config_class`; each field is declared with
:func:`option`, whose ``doc`` is what ``lmsae config reference`` prints. Value checks use the
validators below; they raise :class:`FieldValueError`, which the config loader turns into a
``$.path.field: message`` line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attrs

T = TypeVar("T")

DOC_KEY = "lmsae_doc"


class FieldValueError(ValueError):
    """A field holds a value of the right type but outside its allowed range."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def config_class(cls: type[T] | None = None, *, frozen: bool = True) -> Any:
    """Decorator: a keyword-only attrs class (frozen by default) used as a configuration."""

    def wrap(c: type[T]) -> type[T]:
        return attrs.define(c, kw_only=True, frozen=frozen, slots=True, eq=True)

    return wrap(cls) if cls is not None else wrap


def option(
    default: Any = attrs.NOTHING,
    *,
    doc: str,
    factory: Callable[[], Any] | None = None,
    validator: Callable[[Any, attrs.Attribute, Any], None] | list | None = None,
    converter: Callable[[Any], Any] | None = None,
) -> Any:
    """Declare a config field with its documentation (``doc`` is required and must be non-empty)."""
    if not doc or not doc.strip():
        raise ValueError("every config option needs a docstring (doc=...)")
    if factory is not None:
        return attrs.field(factory=factory, validator=validator, converter=converter, metadata={DOC_KEY: doc})
    return attrs.field(default=default, validator=validator, converter=converter, metadata={DOC_KEY: doc})


def field_doc(field: attrs.Attribute) -> str:
    """The docstring of a config field ('' if it has none)."""
    return field.metadata.get(DOC_KEY, "")


# --- validators ------------------------------------------------------------------------------


def _check(predicate: Callable[[Any], bool], message: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    def validate(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if not predicate(value):
            raise FieldValueError(attribute.name, f"{message}, got {value!r}")

    return validate


def positive() -> Callable[[Any, attrs.Attribute, Any], None]:
    """Value must be > 0 (None passes: optional fields)."""
    return _check(lambda v: v > 0 and not (isinstance(v, float) and math.isnan(v)), "must be > 0")


def non_negative() -> Callable[[Any, attrs.Attribute, Any], None]:
    """Value must be >= 0 (None passes)."""
    return _check(lambda v: v >= 0, "must be >= 0")


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """Value must lie in [low, high] (open ends when requested; None passes)."""

    def ok(v: float) -> bool:
        lo_ok = v > low if low_open else v >= low
        hi_ok = v < high if high_open else v <= high
        return lo_ok and hi_ok

    lb = "(" if low_open else "["
    rb = ")" if high_open else "]"
    return _check(ok, f"must be in {lb}{low}, {high}{rb}")


def steps_or_fraction() -> Callable[[Any, attrs.Attribute, Any], None]:
    """An int >= 0 counts steps; a float in [0, 1] is a fraction of the total steps."""

    def ok(v: Any) -> bool:
        if isinstance(v, bool):
            return False
        if isinstance(v, int):
            return v >= 0
        return 0.0 <= v <= 1.0

    return _check(ok, "must be an int >= 0 (steps) or a float in [0, 1] (fraction of total steps)")


def one_of(*choices: Any) -> Callable[[Any, attrs.Attribute, Any], None]:
    """Value must be one of ``choices``. The loader already checks ``Literal`` types; this also
    catches configs built directly in Python."""

    def validate(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise FieldValueError(attribute.name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")

    return validate


def non_empty() -> Callable[[Any, attrs.Attribute, Any], None]:
    """A string, list or mapping must not be empty."""
    return _check(lambda v: len(v) > 0, "must not be empty")


def each(validator: Callable[[Any, attrs.Attribute, Any], None]):
    """Apply ``validator`` to every element of an iterable value."""

    def validate(instance: Any, attribute: attrs.Attribute, value: Iterable[Any] | None) -> None:
        if value is None:
            return
        for item in value:
            validator(instance, attribute, item)

    return validate
