"""Plugin discovery and the registry of named components.

There is no module-global plugin manager: :func:`load_registry` builds a fresh
:class:`Registry` (the CLI builds one per invocation, tests build their own).

Discovery: the core's built-in plugin modules are registered first (distribution
``lmsae-core``), then every entry point of the ``lmsae`` group of the installed distributions.
``LMSAE_DISABLE_PLUGINS=name1,name2`` skips entry points by name (``all`` skips every
third-party plugin); ``LMSAE_TRACE_HOOKS=1`` prints every behaviour-hook call to stderr (the
registry calls registration hooks itself, so they are not traced).

Hooks are found by name: a module function called like a hook in :mod:`lmsae.hookspecs` is that
hook's implementation whether or not it carries the ``@hookimpl`` marker. The registry calls
registration hooks (``lmsae_register_*``) itself, by name; :class:`_PluginManager` makes pluggy
treat behaviour hooks (``lmsae_after_step``, ...) the same way, so an unmarked one is called
instead of being silently skipped. The marker is still needed for pluggy's options
(``@hookimpl(tryfirst=True)``, ...). A name that merely looks like a hook is an error, and so is
a behaviour hook that pluggy could not call (a callable object instead of a function).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import logging
import os
import sys
import types
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import pluggy

from lmsae import __version__, hookspecs
from lmsae._text import closest, did_you_mean, join_names
from lmsae.errors import DuplicateNameError, PluginError, UnknownNameError
from lmsae.records import KINDS, ArchitectureSpec, Kind

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lmsae"
DISABLE_ENV = "LMSAE_DISABLE_PLUGINS"
TRACE_ENV = "LMSAE_TRACE_HOOKS"
CORE_DISTRIBUTION = "lmsae-core"

#: The core's own plugins, registered through the same hooks as third-party ones.
BUILTIN_PLUGINS: tuple[str, ...] = ("lmsae.plugins.core",)

_HOOK_NAMES = frozenset(n for n in dir(hookspecs) if n.startswith("lmsae_"))
#: hooks only pluggy calls (the registry and the CLI call ``lmsae_register_*`` themselves)
_BEHAVIOUR_HOOKS = frozenset(n for n in _HOOK_NAMES if not n.startswith("lmsae_register_"))


@attrs.frozen
class Entry:
    """A registered component and where it came from."""

    kind: str
    name: str
    spec: Any
    plugin: str
    distribution: str
    version: str


@attrs.frozen
class PluginFailure:
    """A plugin that could not be loaded or was rejected."""

    plugin: str
    distribution: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from distribution {self.distribution!r} was not loaded: {self.error}"


@attrs.define
class _PluginInfo:
    name: str
    module: types.ModuleType
    distribution: str
    version: str


def disabled_plugins(env: dict[str, str] | None = None) -> set[str]:
    """Entry-point names listed in ``LMSAE_DISABLE_PLUGINS`` (comma or space separated)."""
    raw = (env if env is not None else os.environ).get(DISABLE_ENV, "")
    return {p.strip() for p in raw.replace(",", " ").split() if p.strip()}


class _PluginManager(pluggy.PluginManager):
    """A pluggy manager that also takes unmarked functions named like an lmsae hook."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name in _HOOK_NAMES and _is_function(inspect.getattr_static(plugin, name, None)):
            return {}  # pluggy fills in the defaults, as for a bare ``@hookimpl``
        return opts


def _is_function(value: Any) -> bool:
    """Whether pluggy can register ``value`` (read statically from a module) as a hook implementation."""
    return inspect.isfunction(value) or isinstance(value, (types.MethodType, staticmethod, classmethod))


def _uncallable_hooks(module: types.ModuleType) -> list[str]:
    """Behaviour-hook names in ``module`` bound to a callable that is not a function: pluggy would
    skip it (registration hooks are called by name, so any callable works for them)."""
    return sorted(attr for attr, value in vars(module).items()
                  if attr in _BEHAVIOUR_HOOKS and callable(value) and not _is_function(value))


def _misspelt_hooks(module: types.ModuleType) -> list[str]:
    """Names in ``module`` that look like hooks (``lmsae_*`` functions) but are not hooks."""
    bad = []
    for attr, value in vars(module).items():
        if attr.startswith("lmsae_") and callable(value) and attr not in _HOOK_NAMES:
            bad.append(attr)
    return sorted(bad)


class Registry:
    """Every installed component by kind and name, with its distribution.

    Build it with :func:`load_registry`.
    """

    def __init__(self) -> None:
        self.pm = _PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, _PluginInfo] = {}
        self.failures: list[PluginFailure] = []
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._converter: Any = None

    # --- registration ------------------------------------------------------------------------

    @property
    def hook(self) -> Any:
        """The pluggy hook relay (``registry.hook.lmsae_after_step(...)``)."""
        return self.pm.hook

    def add_plugin(self, module: types.ModuleType, *, name: str | None = None,
                   distribution: str = "unknown", version: str = "") -> None:
        """Register one plugin module and collect its records.

        Every function named like a hook is registered, marked with ``@hookimpl`` or not (see the
        module docstring). Raises :class:`PluginError` (nothing is kept from the plugin) when it
        misspells a hook, binds a behaviour-hook name to a callable that is not a function,
        returns a record of the wrong type, or registers a name another plugin already has
        (:class:`DuplicateNameError`).
        """
        name = name or module.__name__
        if name in self.plugins:
            raise PluginError(f"plugin {name!r} is registered twice "
                              f"(distributions {self.plugins[name].distribution!r} and {distribution!r})")
        bad = _misspelt_hooks(module)
        if bad:
            hints = "; ".join(f"{b}{did_you_mean(b, _HOOK_NAMES)}" for b in bad)
            raise PluginError(f"plugin {name!r} from distribution {distribution!r} defines functions that are not "
                              f"lmsae hooks: {hints}")
        uncallable = _uncallable_hooks(module)
        if uncallable:
            raise PluginError(f"plugin {name!r} from distribution {distribution!r}: "
                              + "; ".join(f"{module.__name__}.{u} is a {type(getattr(module, u)).__name__}, "
                                          "not a function, so it cannot be called as a hook" for u in uncallable))
        try:
            self.pm.register(module, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            raise PluginError(f"plugin {name!r} from distribution {distribution!r} is invalid: {exc}") from exc
        info = _PluginInfo(name, module, distribution, version)
        try:
            new = self._collect(module, info)
        except PluginError:
            self.pm.unregister(module)
            raise
        self.plugins[name] = info
        for entry in new:
            self._entries[entry.kind][entry.name] = entry
        self._converter = None

    def _collect(self, module: types.ModuleType, info: _PluginInfo) -> list[Entry]:
        new: list[Entry] = []
        seen: dict[tuple[str, str], Entry] = {}
        for kind in KINDS.values():
            impl = getattr(module, kind.hook, None)
            if impl is None:
                continue
            try:
                records = impl()
            except Exception as exc:  # a plugin bug: report it with the plugin's name
                raise PluginError(f"plugin {info.name!r} from distribution {info.distribution!r} failed in "
                                  f"{kind.hook}: {type(exc).__name__}: {exc}") from exc
            for record in records or ():
                entry = self._validate_record(kind, record, info)
                key = (kind.name, entry.name)
                previous = self._entries[kind.name].get(entry.name) or seen.get(key)
                if previous is not None:
                    raise DuplicateNameError(
                        f"{kind.name} {entry.name!r} is registered by both distribution "
                        f"{previous.distribution!r} (plugin {previous.plugin!r}) and distribution "
                        f"{info.distribution!r} (plugin {info.name!r})")
                seen[key] = entry
                new.append(entry)
        return new

    @staticmethod
    def _validate_record(kind: Kind, record: Any, info: _PluginInfo) -> Entry:
        where = f"plugin {info.name!r} from distribution {info.distribution!r}"
        if not isinstance(record, kind.record):
            raise PluginError(f"{where}: {kind.hook} returned {type(record).__name__}, "
                              f"expected {kind.record.__name__}")
        cfg = record.config_class
        if not (isinstance(cfg, type) and issubclass(cfg, kind.base) and attrs.has(cfg)):
            raise PluginError(f"{where}: the config class of a {kind.name} must be an attrs subclass of "
                              f"{kind.base.__name__}, got {cfg!r}")
        name = cfg.name
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise PluginError(f"{where}: {cfg.__name__}.name must be a non-empty string of letters, digits, "
                              f"'-', '_' or '.', got {name!r}")
        if isinstance(record, ArchitectureSpec) and not isinstance(record.model_class, type):
            raise PluginError(f"{where}: architecture {name!r} has a model_class that is not a class")
        return Entry(kind.name, name, record, info.name, info.distribution, info.version)

    # --- lookup ------------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for a kind."""
        return sorted(self._entries[self._kind(kind).name])

    def entries(self, kind: str | None = None) -> list[Entry]:
        """Entries of one kind (or of every kind), sorted by kind then name."""
        kinds = [self._kind(kind).name] if kind else list(KINDS)
        return [self._entries[k][n] for k in kinds for n in sorted(self._entries[k])]

    def restricted(self, distributions: set[str]) -> Registry:
        """A copy holding only the components of ``distributions`` (e.g. for a reference of the
        lmsae packages alone); commands and hooks are shared with this registry."""
        import copy

        out = copy.copy(self)
        out._entries = {k: {n: e for n, e in v.items() if e.distribution in distributions}
                        for k, v in self._entries.items()}
        out._converter = None
        return out

    def entry(self, kind: str, name: str) -> Entry:
        """The entry of ``kind`` called ``name``; :class:`UnknownNameError` lists the choices."""
        k = self._kind(kind)
        try:
            return self._entries[k.name][name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(k.name, name)) from None

    def get(self, kind: str, name: str) -> Any:
        """The spec record of ``kind`` called ``name``."""
        return self.entry(kind, name).spec

    def architecture(self, name: str) -> ArchitectureSpec:
        return self.get("architecture", name)

    def unknown_message(self, kind: str, name: str) -> str:
        k = self._kind(kind)
        choices = self._entries[k.name]
        return f"unknown {k.name.replace('_', ' ')} {name!r}; installed {k.plural}: {join_names(choices)}" + \
            did_you_mean(name, choices)

    @staticmethod
    def _kind(kind: str) -> Kind:
        try:
            return KINDS[kind]
        except KeyError:
            raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}"
                             f"{did_you_mean(kind, KINDS)}") from None

    # --- configuration -----------------------------------------------------------------------

    @property
    def converter(self) -> Any:
        """The cattrs converter for configs, built after discovery (see :mod:`lmsae.config.converter`)."""
        if self._converter is None:
            from lmsae.config.converter import make_converter

            self._converter = make_converter(self)
        return self._converter

    def structure(self, data: Any, cls: type, *, source: str | None = None) -> Any:
        """Build a config object from plain data; raises :class:`lmsae.errors.ConfigError`."""
        from lmsae.config.converter import structure

        return structure(self, data, cls, source=source)

    def unstructure(self, obj: Any) -> Any:
        """Plain data (dicts, lists, scalars) of a config object, tags included."""
        from lmsae.config.converter import unstructure

        return unstructure(self, obj)

    # --- behaviour hooks ---------------------------------------------------------------------

    def enable_tracing(self, stream: Any = None) -> None:
        """Print every behaviour-hook call (pluggy's trace) to ``stream`` (stderr by default)."""
        out = stream or sys.stderr
        self.pm.trace.root.setwriter(lambda msg: out.write(msg))
        self.pm.enable_tracing()


def _distribution_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", ""
    return dist.metadata["Name"] or dist.name, dist.version or ""


def load_registry(
    *,
    entry_points: bool = True,
    plugins: Sequence[types.ModuleType | str] = (),
    disabled: Iterable[str] | None = None,
    strict: bool = False,
) -> Registry:
    """Build a registry: the core's built-ins, installed entry points, then ``plugins``.

    - ``disabled``: entry-point names to skip (default: from ``LMSAE_DISABLE_PLUGINS``;
      ``"all"`` skips every entry point).
    - ``plugins``: extra plugin modules (or import paths) registered after discovery, e.g. by
      tests. Their distribution is reported as ``"local"``.
    - ``strict``: raise the first plugin failure instead of recording it in ``failures``.
      Duplicate names are always errors, even when not strict, because which one wins would be
      arbitrary.
    """
    reg = Registry()
    skip = set(disabled) if disabled is not None else disabled_plugins()
    for mod_name in BUILTIN_PLUGINS:
        reg.add_plugin(importlib.import_module(mod_name), name=mod_name.rsplit(".", 1)[-1],
                       distribution=CORE_DISTRIBUTION, version=__version__)

    def fail(failure: PluginFailure, exc: BaseException) -> None:
        if strict or isinstance(exc, DuplicateNameError):
            if isinstance(exc, PluginError):
                raise exc
            raise PluginError(str(failure)) from exc
        log.warning("%s", failure)
        reg.failures.append(failure)

    if entry_points:
        eps = sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        for ep in eps:
            dist, version = _distribution_of(ep)
            if ep.name in skip or "all" in skip:
                log.info("plugin %r from %r disabled by %s", ep.name, dist, DISABLE_ENV)
                continue
            try:
                module = ep.load()
            except Exception as exc:  # any import error of a third-party plugin is reported, not fatal
                fail(PluginFailure(ep.name, dist, f"import failed: {type(exc).__name__}: {exc}"), exc)
                continue
            if not isinstance(module, types.ModuleType):
                err = PluginError(f"entry point {ep.value!r} must name a module, got {type(module).__name__}")
                fail(PluginFailure(ep.name, dist, str(err)), err)
                continue
            try:
                reg.add_plugin(module, name=ep.name, distribution=dist, version=version)
            except PluginError as exc:
                fail(PluginFailure(ep.name, dist, str(exc)), exc)

    for p in plugins:
        module = importlib.import_module(p) if isinstance(p, str) else p
        reg.add_plugin(module, name=module.__name__, distribution="local", version="")

    if os.environ.get(TRACE_ENV, "").strip() not in ("", "0", "false"):
        reg.enable_tracing()
    return reg


def closest_name(registry: Registry, kind: str, name: str) -> str | None:
    """The registered name of ``kind`` closest to ``name``."""
    return closest(name, registry.names(kind))
