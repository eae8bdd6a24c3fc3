"""Scale out with torch.distributed: the process mesh, the collectives the core runs for every
architecture, sharding of state dicts, and the parallel context of a forward pass.

See docs/distributed.md for the axes (``sweep``, ``data``, ``head``, ``model``), the launch
commands and the supported combinations.
"""

from lmsae.distributed.mesh import AXES, DistributedConfig, DistributedError, Mesh, build_mesh
from lmsae.distributed.parallel import ParallelContext, current, parallel

__all__ = ["AXES", "DistributedConfig", "DistributedError", "Mesh", "ParallelContext", "build_mesh", "current",
           "parallel"]
