"""Read configuration files (TOML, YAML, JSON), apply ``--set`` overrides, write TOML."""

from __future__ import annotations

import json
import pathlib
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

import tomli_w
import yaml

from lmsae.errors import ConfigError

SUFFIXES = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}


def read_config_file(path: str | pathlib.Path) -> dict[str, Any]:
    """The plain data of a config file; the format follows the suffix."""
    p = pathlib.Path(path)
    fmt = SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise ConfigError([f"$: unsupported config file type {p.suffix or '(none)'!r}; "
                           f"use one of {', '.join(sorted(SUFFIXES))}"], source=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["$: file not found"], source=str(p)) from None
    except OSError as exc:
        raise ConfigError([f"$: cannot read file: {exc.strerror or exc}"], source=str(p)) from None
    try:
        if fmt == "toml":
            data = tomllib.loads(text)
        elif fmt == "yaml":
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        msg = " ".join(str(exc).split())
        raise ConfigError([f"$: not valid {fmt.upper()}: {msg}"], source=str(p)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"$: the file must hold a table/mapping at the top, got {type(data).__name__}"],
                          source=str(p))
    return data


def parse_override_value(text: str) -> Any:
    """A ``--set`` value: parsed as a TOML value (``1e-3``, ``true``, ``[1, 2]``, ``"x"``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a copy of ``data``.

    Integer segments index arrays (``sources.0.weight=2``). Missing tables are created; setting a
    key below a scalar is an error naming the path.
    """
    import copy

    out = copy.deepcopy(data)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected KEY.PATH=VALUE")
            continue
        key, _, raw = item.partition("=")
        parts = [k for k in key.strip().split(".")]
        if not all(parts):
            problems.append(f"--set {item!r}: empty key segment in {key!r}")
            continue
        value = parse_override_value(raw.strip())
        node: Any = out
        path = "$"
        try:
            for part in parts[:-1]:
                node, path = _child(node, part, path, create=True), path + "." + part
            _assign(node, parts[-1], value, path)
        except _OverrideError as exc:
            problems.append(f"{exc.path}: --set {item!r}: {exc.message}")
    if problems:
        raise ConfigError(problems, source="--set")
    return out


class _OverrideError(Exception):
    def __init__(self, path: str, message: str):
        self.path, self.message = path, message


def _child(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        idx = _index(node, part, path)
        return node[idx]
    if isinstance(node, dict):
        if part not in node:
            if not create:
                raise _OverrideError(path + "." + part, "no such key")
            node[part] = {}
        child = node[part]
        if not isinstance(child, (dict, list)):
            raise _OverrideError(path + "." + part, f"is a {type(child).__name__}, not a table")
        return child
    raise _OverrideError(path, f"is a {type(node).__name__}, not a table")


def _index(node: list, part: str, path: str) -> int:
    try:
        idx = int(part)
    except ValueError:
        raise _OverrideError(path, f"is an array; use an integer index, not {part!r}") from None
    if not -len(node) <= idx < len(node):
        raise _OverrideError(path, f"index {idx} out of range (array has {len(node)} items)")
    return idx


def _assign(node: Any, part: str, value: Any, path: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, path)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise _OverrideError(path, f"is a {type(node).__name__}, not a table")


def _drop_none(value: Any) -> Any:
    # TOML has no null: a None field is simply left out (its default is None).
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def _scalars_first(value: Any) -> Any:
    # TOML needs plain keys before sub-tables inside a table.
    if isinstance(value, Mapping):
        plain = {k: _scalars_first(v) for k, v in value.items() if not isinstance(v, Mapping)}
        tables = {k: _scalars_first(v) for k, v in value.items() if isinstance(v, Mapping)}
        return {**plain, **tables}
    if isinstance(value, list):
        return [_scalars_first(v) for v in value]
    return value


def dumps_toml(data: Mapping[str, Any]) -> str:
    """TOML text of plain config data (None values omitted)."""
    return tomli_w.dumps(_scalars_first(_drop_none(data)))


def dump_config_file(data: Mapping[str, Any], path: str | pathlib.Path) -> None:
    """Write plain config data to ``path`` (format from the suffix), atomically."""
    from lmsae.training.state_io import atomic_write_bytes

    p = pathlib.Path(path)
    fmt = SUFFIXES.get(p.suffix.lower(), "json")
    if fmt == "toml":
        text = dumps_toml(data)
    elif fmt == "yaml":
        text = yaml.safe_dump(_drop_none(data), sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    atomic_write_bytes(p, text.encode("utf-8"))
