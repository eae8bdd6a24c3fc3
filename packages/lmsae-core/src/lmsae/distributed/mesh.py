"""The process mesh: named axes ``sweep``, ``data``, ``head`` and ``model``, built in one place.

A run's ``[distributed]`` table gives the size of each axis; their product must be the number of
processes ``torchrun`` started (``WORLD_SIZE``). Ranks are laid out with ``model`` innermost::

    rank = ((sweep * D + data) * H + head) * M + model

so the processes that share a batch and split its features are neighbours. One process group is
created for every combination of axes with a size above 1 (e.g. ``("model",)``, ``("data",)``,
``("data", "model")``), each holding the ranks that differ only along those axes; a collective
"over data and model" uses the combined group. Groups are made collectively by every rank, in
the same order, when the mesh is built — never later.

With every size 1 the mesh is :meth:`Mesh.single`: no process group, every collective a no-op,
so the same config and code run in one process.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist

from lmsae.config import Config, config_class, option
from lmsae.config.fields import positive
from lmsae.errors import ConfigError, LmsaeError

__all__ = ["AXES", "DistributedConfig", "DistributedError", "Mesh", "build_mesh", "environment_world"]

#: mesh axes, outermost first
AXES: tuple[str, ...] = ("sweep", "data", "head", "model")


class DistributedError(LmsaeError):
    """The process mesh cannot be built (sizes do not match the launch, no backend...)."""


@config_class
class DistributedConfig(Config):
    """Process mesh of a run (the ``[distributed]`` table). Launch with ``torchrun --nproc-per-node N``
    where N is the product of the sizes; with every size 1 (the default) the run is single-process."""

    name: ClassVar[str] = "distributed"

    data: int = option(1, doc="Data-parallel processes: each reads a distinct shard of the activations and "
                              "holds a full replica of its features; gradients are summed over them.",
                       validator=positive())
    model: int = option(1, doc="Feature-parallel processes: each holds 1/model of the features (the "
                               "architecture's sharding rules) and computes their encoder and decoder; TopK and "
                               "BatchTopK select exactly as one process would.", validator=positive())
    head: int = option(1, doc="Head-parallel processes (crosscoder heads): each holds 1/head of the heads.",
                       validator=positive())
    sweep: int = option(1, doc="Sweep processes (task = 'sweep'): each trains a share of the sweep's items.",
                        validator=positive())
    backend: Literal["auto", "gloo", "nccl"] = option(
        "auto", doc="torch.distributed backend: 'auto' is nccl when the run's device is CUDA, else gloo.")
    timeout_s: float = option(300.0, doc="Seconds a collective may wait for the other processes before the run "
                                         "fails (a process that died never leaves the others hanging longer).",
                              validator=positive())

    @property
    def sizes(self) -> dict[str, int]:
        return {axis: int(getattr(self, axis)) for axis in AXES}

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes.values())


def environment_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (``(0, 1, 0)`` outside it)."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None

    return read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0)


class Mesh:
    """Sizes, this process's coordinates and the process groups of every axis combination."""

    def __init__(self, sizes: Mapping[str, int], rank: int = 0,
                 groups: Mapping[tuple[str, ...], Any] | None = None, backend: str | None = None):
        unknown = set(sizes) - set(AXES)
        if unknown:
            raise DistributedError(f"unknown mesh axes {sorted(unknown)}; the axes are {list(AXES)}")
        self.sizes = {axis: int(sizes.get(axis, 1)) for axis in AXES}
        self.world_size = math.prod(self.sizes.values())
        if not 0 <= rank < self.world_size:
            raise DistributedError(f"rank {rank} outside a mesh of {self.world_size} processes")
        self.rank = int(rank)
        self.coords = self._coords(rank)
        self._groups = dict(groups or {})
        self.backend = backend

    @classmethod
    def single(cls) -> Mesh:
        """The one-process mesh: every size 1, no groups."""
        return cls({})

    def _coords(self, rank: int) -> dict[str, int]:
        coords = {}
        for axis in reversed(AXES):
            coords[axis] = rank % self.sizes[axis]
            rank //= self.sizes[axis]
        return {axis: coords[axis] for axis in AXES}

    def rank_of(self, coords: Mapping[str, int]) -> int:
        """The global rank at ``coords`` (missing axes: this process's coordinate)."""
        rank = 0
        for axis in AXES:
            c = int(coords.get(axis, self.coords[axis]))
            if not 0 <= c < self.sizes[axis]:
                raise DistributedError(f"coordinate {axis}={c} outside size {self.sizes[axis]}")
            rank = rank * self.sizes[axis] + c
        return rank

    # --- queries -----------------------------------------------------------------------------

    def size(self, *axes: str) -> int:
        """Product of the sizes of ``axes``."""
        self._check(axes)
        return math.prod(self.sizes[a] for a in axes)

    def coord(self, axis: str) -> int:
        self._check((axis,))
        return self.coords[axis]

    def group(self, *axes: str) -> Any:
        """Process group of the ranks that differ from this one only along ``axes`` (None when that
        set holds this process alone: collectives over it are no-ops)."""
        self._check(axes)
        key = tuple(a for a in AXES if a in axes and self.sizes[a] > 1)
        if not key:
            return None
        return self._groups[key]

    def group_ranks(self, *axes: str) -> list[int]:
        """Global ranks of :meth:`group` (this process's), in group-rank order."""
        self._check(axes)
        varying = [a for a in AXES if a in axes]
        ranks = []
        for combo in itertools.product(*(range(self.sizes[a]) for a in varying)):
            ranks.append(self.rank_of(dict(zip(varying, combo))))
        return ranks

    @property
    def is_primary(self) -> bool:
        """Global rank 0: the process that writes logs, stores and final files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        shown = " x ".join(f"{a}={self.sizes[a]}" for a in AXES if self.sizes[a] > 1) or "single process"
        return f"{shown} ({self.world_size} process{'es' if self.world_size != 1 else ''}, {self.backend or 'none'})"

    def _check(self, axes: Iterable[str]) -> None:
        bad = [a for a in axes if a not in AXES]
        if bad:
            raise DistributedError(f"unknown mesh axis {bad[0]!r}; the axes are {list(AXES)}")

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def __repr__(self) -> str:
        return f"Mesh({self.describe()}, rank {self.rank}, coords {self.coords})"


def _resolve_backend(config: DistributedConfig, device: torch.device | str | None) -> str:
    if config.backend != "auto":
        return config.backend
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return "nccl" if dev.type == "cuda" else "gloo"


def build_mesh(config: DistributedConfig | None, device: torch.device | str | None = None,
               key: str = "$.distributed") -> Mesh:
    """The run's mesh from its ``[distributed]`` table and the torchrun environment.

    Initialises the default process group when it is not yet (``env://`` from torchrun) and creates
    every axis-combination group. Raises :class:`~lmsae.errors.ConfigError` when the sizes do not
    multiply to ``WORLD_SIZE``.
    """
    config = config if config is not None else DistributedConfig()
    rank, world, local_rank = environment_world()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    if config.world_size != world:
        sizes = " * ".join(f"{a} {config.sizes[a]}" for a in AXES)
        launch = ("a single process (not under torchrun)" if world == 1 and "WORLD_SIZE" not in os.environ
                  else f"{world} process{'es' if world != 1 else ''}")
        raise ConfigError([f"{key}: {sizes} = {config.world_size} processes, but the run was launched as {launch}; "
                           f"start it with `torchrun --nproc-per-node {config.world_size} -m lmsae run ...` or "
                           "change the sizes"])
    if world == 1:
        return Mesh.single()
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this PyTorch build")
    backend = _resolve_backend(config, device)
    if not dist.is_initialized():
        if backend == "nccl" and torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=config.timeout_s))
    else:
        backend = str(dist.get_backend())
    mesh = Mesh(config.sizes, rank=rank, backend=backend)
    live = [a for a in AXES if mesh.sizes[a] > 1]
    groups: dict[tuple[str, ...], Any] = {}
    timeout = datetime.timedelta(seconds=config.timeout_s)
    # every rank creates every group, in one fixed order (new_group is collective)
    for n in range(1, len(live) + 1):
        for combo in itertools.combinations(live, n):
            fixed = [a for a in AXES if a not in combo]
            for outer in itertools.product(*(range(mesh.sizes[a]) for a in fixed)):
                base = dict(zip(fixed, outer))
                ranks = [mesh.rank_of({**base, **dict(zip(combo, inner))})
                         for inner in itertools.product(*(range(mesh.sizes[a]) for a in combo))]
                group = dist.new_group(ranks=ranks, timeout=timeout)
                if rank in ranks:
                    groups[combo] = group
    mesh._groups = groups
    return mesh
