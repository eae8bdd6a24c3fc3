"""The configuration reference, generated from the config classes (``lmsae config reference``).

Every registered component (task, architecture, source, language model, trainer, writer,
logger, store) has an attrs config class whose fields carry their documentation
(:func:`lmsae.config.fields.option`). :func:`render_reference` writes them all as Markdown: one
section per kind, one table per component (key, type, default, description), plus the shared
tables that several configs nest (``[activations]``, ``[initializer]``, ``[distributed]`` ...),
documented once and linked. The output depends only on the installed components (sorted by
name), so a committed copy can be checked for staleness by a test.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import Any

import attrs

from lmsae.config.fields import field_doc

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


def _type_text(field: attrs.Attribute) -> str:
    t = field.type
    text = t if isinstance(t, str) else getattr(t, "__name__", repr(t))
    text = text.replace("typing.", "").replace("pathlib.", "")
    text = re.sub(r"Literal\[OPTIMIZERS\]|Literal\[[A-Z_]+\]", "one of the names listed", text)
    return text


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
        return _value_text(value)
    return _value_text(default)


def _value_text(value: Any) -> str:
    if attrs.has(type(value)):
        name = getattr(type(value), "name", None)
        return f"`{name}` defaults" if isinstance(name, str) else "defaults"
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
        names = [getattr(type(v), "name", type(v).__name__) for v in value]
        return "[" + ", ".join(f"`{n}`" for n in names) + "]"
    text = repr(list(value) if isinstance(value, tuple) else value)
    return f"`{text}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _nested(field: attrs.Attribute, known: dict[str, type]) -> list[str]:
    """Names of config classes (of ``known``) a field's type mentions."""
    text = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    return [name for name in known if re.search(rf"\b{name}\b", str(text))]


def _table(cls: type, known: dict[str, type], skip: Iterable[str] = ()) -> list[str]:
    skip = set(skip)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for field in attrs.fields(cls):
        if field.name in skip or field.name.startswith("_"):
            continue
        links = [f"[{n}](#{_anchor(n)})" for n in _nested(field, known)]
        doc = field_doc(field) + (f" See {', '.join(links)}." if links else "")
        rows.append(f"| `{field.name}` | `{_cell(_type_text(field))}` | {_default_text(field)} | {_cell(doc)} |")
    if len(rows) == 2:
        rows.append("| — | | | (no options) |")
    return rows


def _shared_classes(registry: Any) -> dict[str, type]:
    """Config classes nested in component configs that are not components themselves."""
    from lmsae.activations.factory import ActivationsConfig
    from lmsae.distributed.mesh import DistributedConfig
    from lmsae.training.initializer import InitializerConfig

    shared: dict[str, type] = {"ActivationsConfig": ActivationsConfig, "InitializerConfig": InitializerConfig,
                               "DistributedConfig": DistributedConfig}
    seen: set[type] = set(shared.values())
    queue = list(shared.values())
    component_classes = {e.spec.config_class for e in registry.entries() if hasattr(e.spec, "config_class")}
    for entry in registry.entries():
        spec = entry.spec
        if hasattr(spec, "config_class"):
            queue.append(spec.config_class)
    while queue:
        cls = queue.pop()
        for field in attrs.fields(cls):
            text = field.type if isinstance(field.type, str) else ""
            for name, candidate in _importable_configs().items():
                if candidate in seen or candidate in component_classes:
                    continue
                if re.search(rf"\b{name}\b", str(text)):
                    shared[name] = candidate
                    seen.add(candidate)
                    queue.append(candidate)
    return dict(sorted(shared.items()))


def _importable_configs() -> dict[str, type]:
    """Every attrs config class defined in the lmsae package modules already imported."""
    import sys

    from lmsae.config.base import Config

    found: dict[str, type] = {}
    for module_name, module in list(sys.modules.items()):
        if not (module_name == "lmsae" or module_name.startswith("lmsae.") or module_name.startswith("lmsae_")):
            continue
        for value in list(vars(module).values()):
            if (isinstance(value, type) and attrs.has(value) and value is not Config
                    and (issubclass(value, Config) or value.__name__.endswith("Config"))):
                found.setdefault(value.__name__, value)
    return found


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
            lines += _table(cls, known, skip=("name",))
            lines.append("")
    lines += ["## Shared tables", "", "Config tables that several components nest.", ""]
    from lmsae.records import KINDS

    bases = {k.base: (kind, title) for kind, title, _ in _KIND_TITLES for k in [KINDS[kind]]}
    for name, cls in shared.items():
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        lines += [f"### {name}", "", _cell(doc), ""]
        if cls in bases:
            kind, title = bases[cls]
            lines += [f"A {kind.replace('_', ' ')} table: its tag key chooses one of the "
                      f"[{title.split(' (')[0].lower()}](#{_anchor(title)}), whose own keys are listed there. "
                      "Keys common to all of them:", ""]
        lines += _table(cls, known, skip=("name",))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
