"""Test helpers for distributed training on CPU: spawn gloo processes, and check that a sharded run
matches a single-process one.

:func:`run_distributed` starts ``world_size`` processes (``spawn``: the function must be importable,
i.e. defined at module level of an installed module) with ``torch.distributed`` initialised on
gloo, and raises with every failing rank's traceback.

:func:`check_parallel_training` is the architecture-independent check: a dictionary (of any
installed architecture, or of a plugin module passed as ``plugins=``; float64) trained ``steps`` steps
on a mesh (e.g. ``{"model": 2}``, ``{"data": 2}``, ``{"head": 2}``) ends with the same weights as
one process trained on the same global batches. Use it in a plugin's tests::

    from lmsae.testing.distributed import check_parallel_training

    def test_feature_parallel_matches_one_process(tmp_path):
        check_parallel_training("my_arch", MyConfig.example(), {"model": 2}, tmp_path)

A plugin under development that is not installed (no entry point yet) is passed by module, as
to :func:`lmsae.registry.load_registry`: ``plugins=["my_package.plugin"]``.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import traceback
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["check_parallel_training", "fail_on_rank", "free_port", "run_distributed"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, error_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    except BaseException:
        pathlib.Path(error_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, error_dir: str | os.PathLike) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; raise on any failure."""
    import torch.multiprocessing as mp

    error_dir = pathlib.Path(error_dir)
    error_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(_worker, args=(world_size, free_port(), str(error_dir), fn, args), nprocs=world_size,
                           start_method="spawn", join=True)
    except Exception as exc:
        reports = "\n".join(p.read_text() for p in sorted(error_dir.glob("rank*.txt")))
        raise RuntimeError(f"a distributed worker failed:\n{reports or exc}") from exc


def fail_on_rank(rank: int, world_size: int, failing_rank: int, message: str) -> None:
    """A worker for :func:`run_distributed` that raises ``ValueError(message)`` on ``failing_rank``
    while the others wait in a collective (it must not hang them)."""
    import torch.distributed as dist

    if rank == failing_rank:
        raise ValueError(message)
    dist.all_reduce(torch.ones(1))


# --- the training check --------------------------------------------------------------------------


def _plugin_paths(plugins: Sequence[types.ModuleType | str]) -> tuple[str, ...]:
    """Import paths of ``plugins``: the spawned workers import them again, so a module object must
    be importable by its name (defined in a file on ``sys.path``, not built at run time)."""
    import importlib.util

    paths = []
    for p in plugins:
        if isinstance(p, str):
            paths.append(p)
            continue
        name = p.__name__
        spec = getattr(p, "__spec__", None)
        try:
            found = importlib.util.find_spec(name) if spec is not None else None
        except (ImportError, ValueError):
            found = None
        if found is None or found.origin != spec.origin:
            raise ValueError(f"plugin module {name!r} cannot be imported by name in the spawned worker "
                             "processes; define the plugin in a module on sys.path and pass its import path")
        paths.append(name)
    return tuple(paths)


def _build(architecture: str, config: Mapping[str, Any], seed: int,
           plugins: Sequence[str] = ()) -> tuple[Any, Any, Any]:
    from lmsae.config.base import DictionaryConfig
    from lmsae.registry import load_registry

    registry = load_registry(plugins=plugins)
    cfg = registry.structure({**config, "architecture": architecture}, DictionaryConfig)
    spec = registry.architecture(architecture)
    torch.manual_seed(seed)
    model = spec.model_class(cfg).to(torch.float64)
    reset = getattr(model, "reset_parameters", None)
    if callable(reset):
        reset(torch.Generator().manual_seed(seed))
    return registry, spec, model


def _batches(model: Any, n_steps: int, batch_size: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for step in range(n_steps):
        batch = model.example_batch(batch_size, torch.Generator().manual_seed(seed + step))
        out.append({k: (v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                    for k, v in batch.items()})
    return out


def _rows(batch: Mapping[str, Any], index: int, count: int) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1:
            n = v.shape[0]
            if n % count:
                raise ValueError(f"batch of {n} rows does not split over {count} data ranks")
            v = v[index * (n // count):(index + 1) * (n // count)]
        out[k] = v
    return out


def _trainer_config(overrides: Mapping[str, Any], steps: int, tokens_per_step: int) -> Any:
    from lmsae.training.trainer import StandardTrainerConfig

    # Adam: sign-SGD (the default optimizer) turns rounding-level gradient differences near zero
    # into full steps, which a float comparison of two runs would flag
    base = {"optimizer": "adam", "total_training_tokens": steps * tokens_per_step, "lr": 1e-2, "lr_warmup_steps": 0,
            "lr_cooldown_steps": 0, "log_every": 1, "sparsity_warmup_steps": 0}
    return StandardTrainerConfig(**{**base, **dict(overrides)})


def _tokens(batch: Mapping[str, Any]) -> int:
    mask = batch.get("mask")
    if mask is not None:
        return int(mask.numel())
    return int(next(v for v in batch.values() if isinstance(v, torch.Tensor) and v.is_floating_point()).shape[0])


def _train(model: Any, batches: list[dict[str, Any]], trainer_overrides: Mapping[str, Any], steps: int,
           mesh: Any = None, rules: Any = None, tokens_per_step: int | None = None) -> dict[str, float]:
    from lmsae.training.trainer import Trainer

    per_step = tokens_per_step if tokens_per_step is not None else _tokens(batches[0])
    trainer = Trainer(_trainer_config(trainer_overrides, steps, per_step), model, progress=False, mesh=mesh,
                      sharding_rules=rules)
    result = trainer.fit(batches)
    return {k: float(v) for k, v in result.metrics.items()}


def _distributed_worker(rank: int, world_size: int, architecture: str, config: dict, sizes: dict, steps: int,
                        batch_size: int, trainer_overrides: dict, seed: int, out_dir: str,
                        plugins: tuple[str, ...] = ()) -> None:
    from safetensors.torch import save_file

    from lmsae.distributed.mesh import DistributedConfig, build_mesh
    from lmsae.distributed.models import gather_state, shard_model

    mesh = build_mesh(DistributedConfig(**sizes))
    registry, spec, full = _build(architecture, config, seed, plugins)
    batches = _batches(full, steps, batch_size, seed)
    per_step = _tokens(batches[0])
    local = [_rows(b, mesh.coord("data"), mesh.size("data")) for b in batches]
    shard = shard_model(full, spec, mesh)
    rules = spec.sharding_rules(full.config)
    metrics = _train(shard, local, trainer_overrides, steps, mesh=mesh, rules=rules, tokens_per_step=per_step)
    state = gather_state(shard, rules, mesh)
    if mesh.is_primary:
        save_file({k: v.contiguous() for k, v in state.items()}, str(pathlib.Path(out_dir, "distributed.safetensors")))
        pathlib.Path(out_dir, "distributed.json").write_text(json.dumps(metrics))


def check_parallel_training(architecture: str, config: Any, sizes: Mapping[str, int], tmp_path: str | os.PathLike,
                            *, steps: int = 3, batch_size: int = 8, trainer: Mapping[str, Any] | None = None,
                            seed: int = 0, rtol: float = 1e-7, atol: float = 1e-9,
                            plugins: Sequence[types.ModuleType | str] = ()) -> dict[str, Any]:
    """Train ``architecture`` (``config``: its config object or a plain dict) for ``steps`` steps in
    one process and on a mesh of ``sizes``; assert that the final weights (gathered to the
    canonical layout) and the logged metrics agree. Returns both metric dicts.

    ``plugins``: plugin modules (or import paths) registered after the installed ones, as in
    :func:`lmsae.registry.load_registry`, e.g. an architecture that is not installed yet. Every
    worker process imports them again, so they must be importable by name."""
    from safetensors.torch import load_file

    from lmsae.registry import load_registry

    plugin_paths = _plugin_paths(plugins)
    registry = load_registry(plugins=plugin_paths)  # here first: an unknown architecture fails before spawning
    registry.architecture(architecture)
    plain = config if isinstance(config, Mapping) else registry.unstructure(config)
    plain = {k: v for k, v in dict(plain).items() if k != "architecture"}
    if plain.get("normalization", "dataset") == "dataset" and not plain.get("dataset_norms"):
        plain["normalization"] = "none"  # no calibration pass here: train on the raw example batches
    trainer = dict(trainer or {})
    out = pathlib.Path(tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    world = 1
    for n in sizes.values():
        world *= int(n)
    run_distributed(_distributed_worker, world, architecture, plain, dict(sizes), steps, batch_size, trainer, seed,
                    str(out), plugin_paths, error_dir=out / "errors")
    _, _, full = _build(architecture, plain, seed, plugin_paths)
    batches = _batches(full, steps, batch_size, seed)
    single_metrics = _train(full, batches, trainer, steps)
    got = load_file(str(out / "distributed.safetensors"))
    want = full.state_dict()
    if set(got) != set(want):
        raise AssertionError(f"state entries differ: distributed {sorted(got)} vs single {sorted(want)}")
    for name, value in want.items():
        torch.testing.assert_close(got[name], value.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{architecture} {dict(sizes)}: {name} differs: {m}")
    dist_metrics = json.loads((out / "distributed.json").read_text())
    for key in ("metrics/explained_variance", "metrics/l0", "metrics/mse", "losses/overall_loss"):
        if key in single_metrics:
            a, b = dist_metrics[key], single_metrics[key]
            if abs(a - b) > 1e-6 * max(1.0, abs(b)):
                raise AssertionError(f"{architecture} {dict(sizes)}: {key} {a} (distributed) vs {b} (single)")
    return {"single": single_metrics, "distributed": dist_metrics}
