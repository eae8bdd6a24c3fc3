"""The testing kit: the contracts plugins subclass, and a toy architecture.

- :class:`ArchitectureContract` (:mod:`lmsae.testing.contract`): every check a dictionary
  architecture must pass;
- :class:`StoreContract` (:mod:`lmsae.testing.store_contract`): every check a store backend must
  pass;
- :mod:`lmsae.testing.distributed` and :mod:`lmsae.testing.shard_step`: sharded training
  checks on CPU; :mod:`lmsae.testing.toy`: a small architecture plugin for tests.

``lmsae.testing`` needs pytest (``pip install lmsae-core[test]``); nothing in the core imports it.
"""

import pytest

# the store contract states its checks as plain asserts: let pytest explain the values on failure
pytest.register_assert_rewrite("lmsae.testing.store_contract")

from lmsae.testing.contract import MESH_AXES, ArchitectureContract
from lmsae.testing.store_contract import StoreContract

__all__ = ["MESH_AXES", "ArchitectureContract", "StoreContract"]
