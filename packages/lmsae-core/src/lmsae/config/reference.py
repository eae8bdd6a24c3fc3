"""The configuration reference, generated from the config classes (``lmsae config reference``).

Every registered component (task, architecture, source, language model, trainer, writer,
logger, store) has an attrs config class whose fields carry their documentation
(:func:`lmsae.config.fields.option`). :func:`render_reference` writes them all as Markdown: one
section per kind, one table per component (key, type, default, description), plus the shared
tables that several configs nest (``[activations]``, ``[initializer]``, ``[distributed]`` ...),
documented once and linked. The output depends only on the installed components (sorted by
name), so a committed copy can be checked for staleness by a test.

A component's tag (the ``name`` class variable, e.g. ``architecture = "sae"``) is not a field: it
is shown in the component's heading line. A real field called ``name`` (a sweep item's name, a Hub
dataset's configuration name) is a key like any other and has its row.
"""

from __future__ import annotations

import enum
import re
import typing
from collections.abc import Iterable
from typing import Any

import attrs

from lmsae.config.fields import field_doc
from lmsae.records import KIND_BY_BASE, KINDS

__all__ = ["render_reference"]

_KIND_TITLES = [
    ("task", "Tasks (`task = ...`)", "task"),
    ("architecture", "Architectures (`[dictionary] architecture = ...`)", "architecture"),
    ("source", "Activation sources (`[[activations.sources]] type = ...`)", "type"),
    ("language_model", "Language models (`[model] backend = ...`)", "backend"),
    ("trainer", "Trainers (`[trainer] type = ...`)", "type"),
    ("writer", "Activation writers (`[writer] format = ...`)", "format"),
    ("logger", "Loggers (`[[loggers]] type = ...`)", "type"),
    ("store", "Stores (`[store] type = ...`)", "type"),
]


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9-]", "", text.lower().replace(" ", "-"))


def _format_type(t: Any) -> str:
    """A type as written in Python, without module prefixes (deterministic for resolved hints)."""
    import types

    if isinstance(t, str):
        return re.sub(r"\b(?:typing|pathlib|collections\.abc)\.", "", t)
    if t is type(None):
        return "None"
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_format_type(a) for a in args)
    if origin is typing.Literal:
        # sorted: typing caches Literal types by their set of values, so the order a Literal
        # shows depends on which equal Literal was created first
        return "Literal[" + ", ".join(sorted(repr(a) for a in args)) + "]"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_format_type(a) for a in args)}]" if args else name
    if isinstance(t, type):
        return t.__name__
    return str(t)


def _type_text(cls: type, field: attrs.Attribute) -> str:
    try:
        hint = typing.get_type_hints(cls).get(field.name, field.type)
    except Exception:  # noqa: BLE001 - fall back to the annotation as written
        hint = field.type
    return _format_type(hint)


def _tag(cls: type) -> tuple[str, str] | None:
    """(tag key, tag) of a component config class (``("format", "safetensors")``): what a user
    writes to choose it. None for a plain table, and for a base class (whose ``name`` is empty)."""
    kind = next((KIND_BY_BASE[k] for k in cls.__mro__ if k in KIND_BY_BASE), None)
    # a class with a real `name` field has a slot descriptor there, not the tag
    name = getattr(cls, "name", None)
    return (kind.tag, name) if kind is not None and isinstance(name, str) and name else None


def _default_text(field: attrs.Attribute) -> str:
    default = field.default
    if default is attrs.NOTHING:
        return "**required**"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        if default.takes_self:
            return "(computed)"
        try:
            value = default.factory()
        except Exception:  # noqa: BLE001 - a factory that needs context
            return "(computed)"
        return _value_text(field.name, value)
    return _value_text(field.name, default)


def _value_text(key: str, value: Any) -> str:
    if attrs.has(type(value)):  # a nested table whose keys all take their defaults
        tag = _tag(type(value))
        return f"`[{key}]` defaults" + (f' (`{tag[0]} = "{tag[1]}"`)' if tag else "")
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value is None:
        return "unset"
    if isinstance(value, (list, tuple)) and not value:
        return "`[]`"
    if isinstance(value, dict) and not value:
        return "`{}`"
    if isinstance(value, (list, tuple)) and all(attrs.has(type(v)) for v in value):
        names = [(_tag(type(v)) or (None, type(v).__name__))[1] for v in value]
        return "[" + ", ".join(f"`{n}`" for n in names) + "]"
    text = repr(list(value) if isinstance(value, tuple) else value)
    return f"`{text}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _nested(cls: type, field: attrs.Attribute, known: dict[str, type]) -> list[str]:
    """Names of config classes (of ``known``) a field's type mentions."""
    text = _type_text(cls, field)
    return [name for name in known if re.search(rf"\b{name}\b", text)]


def _table(cls: type, known: dict[str, type]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for field in attrs.fields(cls):
        if field.name.startswith("_"):
            continue
        links = [f"[{n}](#{_anchor(n)})" for n in _nested(cls, field, known)]
        doc = field_doc(field) + (f" See {', '.join(links)}." if links else "")
        rows.append(f"| `{field.name}` | `{_cell(_type_text(cls, field))}` | {_default_text(field)} | {_cell(doc)} |")
    if len(rows) == 2:
        rows.append("| — | | | (no options) |")
    return rows


def _walk(t: Any) -> Iterable[Any]:
    yield t
    for arg in typing.get_args(t):
        yield from _walk(arg)


def _nested_classes(cls: type) -> list[type]:
    """attrs classes a config class's fields are typed with (resolved type hints: deterministic,
    whatever modules happen to be imported)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: no nested tables listed
        return []
    out = []
    for field in attrs.fields(cls):
        for t in _walk(hints.get(field.name)):
            if isinstance(t, type) and attrs.has(t) and t not in out:
                out.append(t)
    return out


def _shared_classes(registry: Any) -> dict[str, type]:
    """Config classes nested in component configs that are not components themselves."""
    component_classes = {e.spec.config_class for e in registry.entries() if hasattr(e.spec, "config_class")}
    shared: dict[str, type] = {}
    seen: set[type] = set()
    queue = sorted(component_classes, key=lambda c: (c.__module__, c.__qualname__))
    while queue:
        cls = queue.pop(0)
        for nested in _nested_classes(cls):
            if nested in seen or nested in component_classes:
                continue
            seen.add(nested)
            shared[nested.__name__] = nested
            queue.append(nested)
    return dict(sorted(shared.items()))


def render_reference(registry: Any) -> str:
    """The Markdown configuration reference of every component ``registry`` holds."""
    shared = _shared_classes(registry)
    known = dict(shared)
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated by `lmsae config reference` (the command is in tests/test_docs.py); do not edit by hand "
        "(tests/test_docs.py fails when it is out of date) -->",
        "",
        "Every key a run config accepts, per task and per installed component, with its type, default and "
        "meaning. Tables nest as in TOML: `[activations]` is the `activations` key of a task, "
        "`[[activations.sources]]` the list under it. Unknown keys are errors (with the closest valid key).",
        "",
        "Contents: " + ", ".join(f"[{title.split(' (')[0]}](#{_anchor(title)})" for _, title, _ in _KIND_TITLES)
        + ", [Shared tables](#shared-tables).",
        "",
    ]
    for kind, title, tag in _KIND_TITLES:
        entries = registry.entries(kind)
        if not entries:
            continue
        lines += [f"## {title}", ""]
        for entry in entries:
            spec = entry.spec
            cls = spec.config_class
            summary = getattr(spec, "summary", "") or (cls.__doc__ or "").strip().split("\n\n")[0]
            lines += [f"### {kind.replace('_', ' ')} `{entry.name}`", "",
                      f"{_cell(summary)} (`{tag} = \"{entry.name}\"`, from `{entry.distribution}`)", ""]
            lines += _table(cls, known)
            lines.append("")
    lines += ["## Shared tables", "", "Config tables that several components nest.", ""]
    bases = {k.base: (kind, title) for kind, title, _ in _KIND_TITLES for k in [KINDS[kind]]}
    for name, cls in shared.items():
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        lines += [f"### {name}", "", _cell(doc), ""]
        if cls in bases:
            kind, title = bases[cls]
            lines += [f"A {kind.replace('_', ' ')} table: its tag key chooses one of the "
                      f"[{title.split(' (')[0].lower()}](#{_anchor(title)}), whose own keys are listed there. "
                      "Keys common to all of them:", ""]
        lines += _table(cls, known)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
