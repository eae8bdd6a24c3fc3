"""Store specs provided by the core: ``local`` (embedded SQLite) and ``mongo`` (pymongo).

The lead wires :data:`STORE_SPECS` into the core plugin's ``lmsae_register_stores`` hook. The
MongoDB backend is imported inside its factory, so importing lmsae never imports pymongo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmsae.records import StoreSpec
from lmsae.stores.configs import LocalStoreConfig, MongoStoreConfig
from lmsae.stores.local import LocalStore

if TYPE_CHECKING:  # pragma: no cover
    from lmsae.stores.mongo import MongoStore

__all__ = ["STORE_SPECS", "open_mongo_store"]


def open_mongo_store(config: MongoStoreConfig) -> MongoStore:
    """Open a :class:`lmsae.stores.mongo.MongoStore` (StoreError when pymongo is missing or the
    server is unreachable)."""
    from lmsae.stores.mongo import MongoStore

    return MongoStore(config)


STORE_SPECS = [
    StoreSpec(LocalStoreConfig, LocalStore,
              summary="embedded store: one SQLite database in a directory, no server"),
    StoreSpec(MongoStoreConfig, open_mongo_store,
              summary="MongoDB server (pymongo), for teams sharing results"),
]
