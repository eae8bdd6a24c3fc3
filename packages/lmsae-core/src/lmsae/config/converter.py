"""Turn plain data (from TOML/YAML/JSON) into typed config objects, and back.

Rules, all enforced here so that no config class has to repeat them:

- unknown keys are errors (with the closest valid key);
- scalars are strict: ``1.5`` is not an int, ``"3"`` is not an int, ``1`` is not a bool; an int
  is accepted where a float is expected, and so is a numeric string (YAML reads ``1e-3`` as a
  string);
- tables and arrays are strict too: a string is neither a table nor an array of its characters,
  a table is not an array of its keys, and ``[a, b]`` fills a ``tuple[X, Y]`` only with two values;
- fields typed with a kind's base config (``DictionaryConfig``, ``SourceConfig``, ...) are tagged
  unions over the installed plugins: the tag key (``architecture``, ``type``, ...) picks the
  class; an unknown tag lists the installed names and the closest one;
- every problem becomes one line ``$.path.to.key: message``; all problems are reported at once.
"""

from __future__ import annotations

import collections.abc
import enum
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.cols import list_structure_factory

from lmsae._text import did_you_mean, join_names
from lmsae.config.fields import FieldValueError
from lmsae.errors import ConfigError
from lmsae.records import KIND_BY_BASE, Kind

if typing.TYPE_CHECKING:  # pragma: no cover
    from lmsae.registry import Registry


class _KeyProblem(Exception):
    """A problem located at ``key`` below the current path."""

    def __init__(self, key: str | None, message: str):
        self.key = key
        self.message = message
        super().__init__(message)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        if attrs.has(tp):
            return "a table"
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
                "list": "an array", "dict": "a table", "tuple": "an array"}.get(tp.__name__, tp.__name__)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, set, frozenset, typing.Sequence):
        return "an array"
    if origin in (dict, Mapping, typing.Mapping):
        return "a table"
    return str(tp)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    return f"{type(value).__name__} {value!r}"


# --- strict scalar hooks ---------------------------------------------------------------------


def _structure_int(value: Any, _tp: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e6 written for a token count is fine; 1.5 is not
        raise TypeError(f"expected an integer, got {_describe(value)}")
    return value


def _structure_float(value: Any, _tp: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {_describe(value)}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise TypeError(f"expected a number, got {_describe(value)}")


def _structure_bool(value: Any, _tp: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean (true/false), got {_describe(value)}")
    return value


def _structure_str(value: Any, _tp: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_describe(value)}")
    return value


def _structure_path(value: Any, _tp: Any) -> pathlib.Path:
    if not isinstance(value, (str, pathlib.Path)):
        raise TypeError(f"expected a path string, got {_describe(value)}")
    return pathlib.Path(value)


def _structure_literal(value: Any, tp: Any) -> Any:
    choices = typing.get_args(tp)
    if value in choices and type(value) in {type(c) for c in choices}:
        return value
    hint = did_you_mean(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""
    raise ValueError(f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}")


_TABLE_ORIGINS = (dict, Mapping, collections.abc.MutableMapping)
_ARRAY_ORIGINS = (list, collections.abc.MutableSequence)


def _is_checked_container(tp: Any) -> bool:
    """Config tables (attrs classes), dicts, lists and fixed-length tuples: the containers whose
    cattrs hooks would otherwise iterate a string as an array, take a table's keys as an array,
    or fail on a wrong-typed value with a raw ``AttributeError``."""
    if isinstance(tp, type) and attrs.has(tp):
        return tp not in KIND_BY_BASE  # tagged unions check their value themselves
    origin = typing.get_origin(tp) or tp
    if origin is tuple:  # only tuple[X, Y]; tuple[X, ...] and a bare tuple keep cattrs' hook
        args = typing.get_args(tp)
        return bool(args) and args[-1] is not Ellipsis
    return origin in _TABLE_ORIGINS or origin in _ARRAY_ORIGINS


def _checked_container_hook(tp: Any, conv: cattrs.Converter) -> Any:
    """cattrs' own hook for ``tp``, behind a check that the value is a table or an array."""
    origin = typing.get_origin(tp) or tp
    length = None  # the number of values of a fixed-length tuple
    if isinstance(tp, type) and attrs.has(tp):
        inner, table = conv.gen_structure_attrs_fromdict(tp), True
    elif origin in _TABLE_ORIGINS:
        inner, table = conv.gen_structure_mapping(tp), True
    elif origin is tuple:
        inner, table = conv.gen_structure_hetero_tuple(tp), False
        length = len(typing.get_args(tp))
    else:
        inner, table = list_structure_factory(tp, conv), False

    def hook(value: Any, t: Any) -> Any:
        if table and not isinstance(value, Mapping):
            raise TypeError(f"expected a table, got {_describe(value)}")
        if not table and not isinstance(value, (list, tuple)):
            raise TypeError(f"expected an array, got {_describe(value)}")
        if length is not None and len(value) != length:
            raise TypeError(f"expected an array of {length} values "
                            f"({', '.join(_type_name(a) for a in typing.get_args(tp))}), got {len(value)}: {value!r}")
        return inner(value, t)

    return hook


def make_converter(registry: Registry) -> cattrs.Converter:
    """A converter that knows the installed plugins (tags resolve through ``registry``)."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(pathlib.Path, _structure_path)
    conv.register_unstructure_hook(pathlib.Path, str)
    conv.register_structure_hook_func(lambda t: typing.get_origin(t) is Literal, _structure_literal)
    conv.register_structure_hook_func(_is_enum, _structure_enum)
    conv.register_structure_hook_factory(_is_checked_container, lambda t: _checked_container_hook(t, conv))
    conv.register_unstructure_hook_func(_is_enum, lambda v: v.value)

    def is_union(t: Any) -> bool:
        return typing.get_origin(t) in (Union, types.UnionType)

    def structure_union(value: Any, tp: Any) -> Any:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise TypeError(f"expected {_type_name(tp)}, got null")
        candidates = [a for a in args if a is not type(None)]
        # exact scalar type first, so 2 stays an int in `int | float` and 2.5 a float
        candidates.sort(key=lambda a: 0 if isinstance(a, type) and type(value) is a else 1)
        errors = []
        for arg in candidates:
            try:
                return conv.structure(value, arg)
            except Exception as exc:  # try the next member of the union
                errors.append(exc)
        if len(candidates) == 1:
            raise errors[0]
        raise TypeError(f"expected {_type_name(tp)}, got {_describe(value)}")

    conv.register_structure_hook_func(is_union, structure_union)

    for base, kind in KIND_BY_BASE.items():
        # a predicate, not a type: a type-keyed hook would also catch the concrete subclasses
        conv.register_structure_hook_func(lambda t, b=base: t is b, _tagged_structure(conv, registry, kind))
        conv.register_unstructure_hook_func(lambda t, b=base: t is b, _tagged_unstructure(conv))
    return conv


def _structure_enum(value: Any, tp: Any) -> Any:
    _structure_literal(value, Literal[tuple(m.value for m in tp)])
    return tp(value)


def _is_enum(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, enum.Enum)


def _tagged_structure(conv: cattrs.Converter, registry: Registry, kind: Kind):
    def hook(value: Any, _tp: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a table with a {kind.tag!r} key, got {_describe(value)}")
        data = dict(value)
        tag = data.pop(kind.tag, kind.default_tag)
        names = registry.names(kind.name)
        if tag is None:
            raise _KeyProblem(kind.tag, f"missing key; installed {kind.plural}: {join_names(names)}")
        if not isinstance(tag, str):
            raise _KeyProblem(kind.tag, f"expected a string, got {_describe(tag)}")
        if tag not in names:
            raise _KeyProblem(kind.tag, registry.unknown_message(kind.name, tag))
        cls = registry.get(kind.name, tag).config_class
        return conv.structure(data, cls)

    return hook


def _tagged_unstructure(conv: cattrs.Converter):
    def hook(obj: Any) -> Any:
        kind = _kind_of(type(obj))
        data = conv.unstructure(obj, unstructure_as=type(obj))
        if kind is None:
            return data
        return {kind.tag: type(obj).name, **data}

    return hook


def _kind_of(cls: type) -> Kind | None:
    for klass in cls.__mro__:
        if klass in KIND_BY_BASE:
            return KIND_BY_BASE[klass]
    return None


# --- errors ----------------------------------------------------------------------------------


def _segment(key: Any) -> str:
    if isinstance(key, int):
        return f"[{key}]"
    key = str(key)
    if key.replace("_", "a").isalnum():
        return f".{key}"
    return f"[{key!r}]"


def _problems(exc: BaseException, path: str, tp: Any = None) -> list[str]:
    out: list[str] = []
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        for sub in exc.exceptions:
            sub_path, sub_tp = path, None
            for note in getattr(sub, "__notes__", []):
                if isinstance(note, AttributeValidationNote):
                    sub_path, sub_tp = path + _segment(note.name), note.type
                elif isinstance(note, IterableValidationNote):
                    sub_path, sub_tp = path + _segment(note.index), note.type
            if isinstance(sub, KeyError) and not isinstance(sub, (ClassValidationError, IterableValidationError)):
                out.append(f"{sub_path}: required key missing (expected {_type_name(sub_tp)})")
            else:
                out.extend(_problems(sub, sub_path, sub_tp))
        return out
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = [f.name for f in attrs.fields(exc.cl)]
        kind = _kind_of(exc.cl)
        for key in sorted(exc.extra_fields):
            out.append(f"{path}{_segment(key)}: unknown key{did_you_mean(key, valid)} "
                       f"(valid keys: {', '.join(([kind.tag] if kind else []) + valid)})")
        return out
    if isinstance(exc, _KeyProblem):
        where = path + (_segment(exc.key) if exc.key else "")
        return [f"{where}: {exc.message}"]
    if isinstance(exc, FieldValueError):
        return [f"{path}{_segment(exc.field)}: {exc.message}"]
    if isinstance(exc, ConfigError):
        return [p if p.startswith("$") else f"{path}: {p}" for p in exc.problems]
    if isinstance(exc, (TypeError, ValueError)):
        msg = str(exc)
        if tp is not None and "expected" not in msg:
            msg = f"expected {_type_name(tp)}: {msg}"
        return [f"{path}: {msg}"]
    return [f"{path}: {type(exc).__name__}: {exc}"]


def structure(registry: Registry, data: Any, cls: type, *, source: str | None = None) -> Any:
    """``data`` as an instance of ``cls``; every problem is collected into one :class:`ConfigError`."""
    try:
        return registry.converter.structure(data, cls)
    except Exception as exc:  # turn any structuring failure into located, readable problems
        problems = _problems(exc, "$", cls)
        raise ConfigError(problems or [f"$: {exc}"], source=source) from None


def unstructure(registry: Registry, obj: Any) -> Any:
    """Plain data for ``obj`` (tags of plugin classes included, so it structures back)."""
    kind = _kind_of(type(obj))
    if kind is not None:
        return registry.converter.unstructure(obj, unstructure_as=kind.base)
    return registry.converter.unstructure(obj)
