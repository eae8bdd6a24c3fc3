"""Typed errors. Everything a user can cause raises a subclass of :class:`LmsaeError`.

The CLI prints ``str(error)`` on one line (or one line per problem for
:class:`ConfigError`) and exits with :attr:`LmsaeError.exit_code`; a traceback is shown only
with ``--debug``.
"""

from __future__ import annotations

from collections.abc import Sequence


class LmsaeError(Exception):
    """Base class of every error a user can cause (bad config, bad file, bad plugin...)."""

    exit_code: int = 2


class ConfigError(LmsaeError):
    """A configuration is invalid. ``problems`` holds one ``"$.path: message"`` line per problem."""

    def __init__(self, problems: Sequence[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        head = f"invalid configuration{where} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''})"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class PluginError(LmsaeError):
    """A plugin is broken: it failed to import, misspelt a hook, or returned a bad record."""


class DuplicateNameError(PluginError):
    """Two distributions registered the same name for the same kind of component."""


class UnknownNameError(LmsaeError):
    """A name (architecture, source, task...) is not provided by any installed plugin."""


class ShapeError(LmsaeError, ValueError):
    """A tensor has the wrong shape for the operation (names the tensor and both shapes)."""


class DataError(LmsaeError):
    """Activation data or a dataset is missing, malformed or inconsistent."""


class CheckpointError(LmsaeError):
    """A checkpoint or saved dictionary is missing, incomplete or does not match its config."""


class ShardingError(LmsaeError):
    """Sharding rules do not cover exactly the parameters of a model, or do not fit the mesh."""


class StoreError(LmsaeError):
    """A store is unreachable, or a record it needs is missing."""
