"""Store configurations (``[store] type = "local" | "mongo"``) and how tasks open a store."""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, ClassVar

from lmsae.config import StoreConfig, config_class, option
from lmsae.config.fields import positive

if TYPE_CHECKING:  # pragma: no cover
    from lmsae.registry import Registry
    from lmsae.stores.base import Store

STORE_DIR_ENV = "LMSAE_STORE_DIR"


def default_store_directory() -> pathlib.Path:
    """``$LMSAE_STORE_DIR``, else ``$XDG_DATA_HOME/lmsae/store``, else ``~/.local/share/lmsae/store``."""
    if os.environ.get(STORE_DIR_ENV):
        return pathlib.Path(os.environ[STORE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return pathlib.Path(base) / "lmsae" / "store"


@config_class
class LocalStoreConfig(StoreConfig):
    """The embedded store: one SQLite database file (arrays stored as safetensors blobs); no server."""

    name: ClassVar[str] = "local"

    directory: pathlib.Path | None = option(
        None, doc="Directory of the store (default: $LMSAE_STORE_DIR, else ~/.local/share/lmsae/store).")

    def resolved_directory(self) -> pathlib.Path:
        return (self.directory or default_store_directory()).expanduser()


@config_class
class MongoStoreConfig(StoreConfig):
    """A MongoDB server (for teams sharing results)."""

    name: ClassVar[str] = "mongo"

    uri: str | None = option(None, doc="MongoDB connection string; unset: $MONGO_URI, else "
                                       "mongodb://localhost:27017/ (a URI written here always wins).")
    database: str = option("lmsae", doc="Database name.")
    timeout_ms: int = option(3000, doc="Give up connecting after this many milliseconds (never hang).",
                             validator=positive())


def open_store(registry: Registry, config: StoreConfig | None) -> Store:
    """Open the store a config describes (the local default when ``config`` is None)."""
    config = config if config is not None else LocalStoreConfig()
    return registry.get("store", config.name).factory(config)
