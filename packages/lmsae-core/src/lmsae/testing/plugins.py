"""Helpers to fake installed plugins (modules and entry points) in tests of plugin discovery.

``fake_entry_points(monkeypatch, [FakeEntryPoint("name", loader, "dist-name")])`` makes
:func:`lmsae.registry.load_registry` see exactly those entry points.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, ClassVar

from lmsae import registry as _registry
from lmsae.config import config_class
from lmsae.records import ArchitectureSpec
from lmsae.testing.toy import ToyConfig, ToyDictionary, toy_example, toy_sharding_rules


class FakeDist:
    def __init__(self, name: str, version: str = "1.0"):
        self.metadata = {"Name": name}
        self.name = name
        self.version = version


class FakeEntryPoint:
    def __init__(self, name: str, loader: Callable[[], Any], dist: str, version: str = "1.0"):
        self.name = name
        self.value = f"{dist.replace('-', '_')}.plugin"
        self.group = "lmsae"
        self.dist = FakeDist(dist, version)
        self._loader = loader

    def load(self) -> Any:
        return self._loader()


def module(name: str, **attrs: Any) -> types.ModuleType:
    m = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def arch_spec(tag: str) -> ArchitectureSpec:
    """An architecture spec called ``tag`` (a ToyConfig subclass with another name)."""
    cfg = config_class(type(f"Cfg_{tag.replace('-', '_')}", (ToyConfig,), {"name": tag, "__annotations__": {"name": ClassVar[str]}}))
    return ArchitectureSpec(config_class=cfg, model_class=ToyDictionary, sharding_rules=toy_sharding_rules,
                            example_config=toy_example)


def fake_entry_points(monkeypatch: Any, eps: list[FakeEntryPoint]) -> None:
    """Make plugin discovery see exactly ``eps`` (a pytest ``monkeypatch`` undoes it).

    Only the ``lmsae`` group is faked: other callers of ``importlib.metadata.entry_points`` in the
    process (numba looks up its extensions when it first compiles) get the real answer."""
    real = _registry.md.entry_points

    def entry_points(**params: Any) -> Any:
        if params.get("group") == "lmsae":
            return list(eps)
        return real(**params)

    monkeypatch.setattr(_registry.md, "entry_points", entry_points)


__all__ = ["FakeEntryPoint", "arch_spec", "fake_entry_points", "module"]
