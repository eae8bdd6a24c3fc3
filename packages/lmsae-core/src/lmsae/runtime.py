"""What a task receives besides its config: the registry, where the config came from, and how
to report."""

from __future__ import annotations

import pathlib
import sys
from typing import IO, Any

import attrs

from lmsae.registry import Registry


@attrs.define
class RunContext:
    """Passed to every task factory as ``factory(config, context)``."""

    registry: Registry
    config_path: pathlib.Path | None = None
    debug: bool = False
    #: where human-readable reports go (the CLI uses stdout)
    out: IO[str] = attrs.field(factory=lambda: sys.stdout)
    #: whether progress bars are shown
    progress: bool = True

    def echo(self, text: str = "") -> None:
        print(text, file=self.out)
        self.out.flush()

    def hook(self) -> Any:
        return self.registry.hook
