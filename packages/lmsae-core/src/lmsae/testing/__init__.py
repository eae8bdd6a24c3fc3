"""The testing kit: the architecture contract plugins subclass, and a toy architecture.

``lmsae.testing`` needs pytest (``pip install lmsae-core[test]``); nothing in the core imports it.
"""

from lmsae.testing.contract import MESH_AXES, ArchitectureContract

__all__ = ["MESH_AXES", "ArchitectureContract"]
