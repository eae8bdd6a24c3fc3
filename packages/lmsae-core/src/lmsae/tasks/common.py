"""Pieces shared by the tasks that read activations and build dictionaries."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from lmsae.activations.factory import ActivationsConfig, build_activation_stream
from lmsae.activations.protocol import SourceContext
from lmsae.config.base import LanguageModelConfig, SourceConfig
from lmsae.dictionary.base import SparseDictionary
from lmsae.errors import DataError, LmsaeError
from lmsae.registry import Registry


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` picks CUDA when available, else the CPU; anything else is passed to torch."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise LmsaeError(f"invalid device {spec!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmsaeError(f"device {spec!r} requested but CUDA is not available (use device = \"auto\" or \"cpu\")")
    return device


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_loader(registry: Registry, config: LanguageModelConfig | None):
    """A zero-argument function that loads the run's language model on first call and then returns
    the same instance (None when the run has no [model] table)."""
    if config is None:
        return None
    loaded: list[Any] = []

    def load() -> Any:
        if not loaded:
            spec = registry.get("language_model", config.name)
            loaded.append(spec.factory(config))
        return loaded[0]

    return load


def stream_builder(registry: Registry, activations: ActivationsConfig, hook_points: tuple[str, ...], *,
                   seed_offset: int = 0, progress: bool = True, language_model: Any = None,
                   shard: tuple[int, int] = (0, 1)):
    """A function that builds a fresh activation stream from the config (every call starts over).

    ``language_model`` is a loader from :func:`model_loader` (sources that read text need it)."""

    def build_source(source_config: SourceConfig, context: SourceContext) -> Any:
        spec = registry.get("source", source_config.name)
        return spec.factory(source_config, context)

    def make() -> Any:
        context = SourceContext(hook_points=hook_points, layout=activations.layout,
                                seed=activations.seed + seed_offset, registry=registry, progress=progress,
                                language_model=language_model, shard=shard)
        return build_activation_stream(activations, context, build_source)

    return make


@torch.no_grad()
def estimate_dataset_norms(batches: Iterable[dict[str, Any]], hook_points: Iterable[str]) -> tuple[dict[str, float], int]:
    """Average per-token L2 norm of each hook point over ``batches`` (masked tokens excluded).

    Returns ``(norms, n_tokens)``.
    """
    hooks = list(hook_points)
    sums = {h: 0.0 for h in hooks}
    n = 0
    for batch in batches:
        mask = batch.get("mask")
        for h in hooks:
            if h not in batch:
                raise DataError(f"calibration batch has no hook point {h!r}")
            norms = batch[h].double().norm(dim=-1)
            if mask is not None:
                norms = norms[mask.bool()]
            sums[h] += float(norms.sum())
        n += int(mask.sum()) if mask is not None else int(batch[hooks[0]].shape[0])
    if n == 0:
        raise DataError("calibration batches hold no (unmasked) tokens")
    norms = {h: s / n for h, s in sums.items()}
    bad = [h for h, v in norms.items() if not math.isfinite(v) or v <= 0]
    if bad:
        raise DataError(f"activations of hook point(s) {bad} have zero or non-finite norm")
    return norms, n


def take(stream: Iterable[Any], n: int) -> list[Any]:
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) >= n:
            break
    return out


def hook_points_of(model: SparseDictionary) -> tuple[str, ...]:
    return tuple(model.config.hook_points)


def training_summary(result: Any, final: dict[str, float], seconds: float, *,
                     tokens_before: int = 0) -> dict[str, Any]:
    """What a train run (and each sweep item) writes to training_summary.json: the held-out
    evaluation when there is one, else the last training window; ``result`` is a TrainResult.

    ``seconds`` is this process's time and ``tokens_before`` the tokens a resumed run had trained
    before it started: ``tokens`` counts the whole run, ``run_tokens`` this process's share, and
    ``tokens_per_second`` is ``run_tokens / seconds`` (a resumed run's earlier tokens took time
    this process did not measure)."""
    window = result.metrics
    if final:
        source = "held-out evaluation"
        ev, l0, dead, mse = final["explained_variance"], final["l0"], final["dead_fraction"], final["mse"]
        n_eval = final["n_tokens"]
    else:
        source = "last training window"
        ev = window.get("metrics/explained_variance", float("nan"))
        l0 = window.get("metrics/l0", float("nan"))
        dead = window.get("metrics/dead_fraction", float("nan"))
        mse = window.get("metrics/mse", float("nan"))
        n_eval = 0.0
    run_tokens = result.tokens - tokens_before
    return {"reason": result.reason, "message": result.message, "steps": result.steps,
            "total_steps": result.total_steps, "tokens": result.tokens, "run_tokens": run_tokens,
            "seconds": round(seconds, 2), "tokens_per_second": run_tokens / max(seconds, 1e-9),
            "metrics_source": source,
            "explained_variance": ev, "l0": l0, "dead_fraction": dead, "mse": mse, "eval_tokens": n_eval}
