"""Reconstruction metrics of a dictionary over a stream of activations.

Definitions (over all evaluated tokens, masked tokens excluded, in the dictionary's normalised
space; for a dictionary with folded normalisation that is the raw activation space):

- ``explained_variance = 1 - sum_t ||x_hat_t - y_t||^2 / sum_t ||y_t - mean(y)||^2`` where
  ``mean(y)`` is the mean over *all* evaluated tokens (one dataset-level number, not a mean of
  per-batch ratios);
- ``mse``: mean over tokens of ``||x_hat_t - y_t||^2``; ``l2_ratio``: mean ``||x_hat_t|| / ||y_t||``
  (over the tokens whose label is not exactly 0);
- ``l0``: mean number of active features per token;
- ``dead_fraction``: fraction of features that never fired on the evaluated tokens;
- ``mean_feature_act``: mean of the non-zero activations.

Feature density (:func:`reconstruction_statistics`, :func:`density_histogram`): a feature's
density is the fraction of evaluated tokens on which it is active (> 0). For a dictionary with
several feature axes (layers, heads), every element of ``feature_dims`` is a separate feature
here, as in ``dead_fraction``. The histogram bins ``log10(density)`` into equal-width bins from
``log10(1e-7)`` to ``0``; densities below 1e-7 (but > 0) fall into the first bin, and features
that never fired are counted separately, so ``histogram.sum() + never_fired == number of
features``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import numpy as np
import torch

from lmsae.dictionary.base import SparseDictionary
from lmsae.errors import LmsaeError
from lmsae.nn.axes import flatten_tokens

__all__ = [
    "DENSITY_LOW",
    "DensityHistogram",
    "ReconstructionStatistics",
    "density_histogram",
    "evaluate_reconstruction",
    "reconstruction_statistics",
]

#: lower end of the density histogram
DENSITY_LOW = 1e-7


@attrs.frozen
class ReconstructionStatistics:
    """What :func:`reconstruction_statistics` measures.

    ``metrics``: the scalar metrics (module docstring) plus ``n_tokens``; ``fire_counts``: int64
    ``(n_feature_units,)``, on how many evaluated tokens each feature (each element of
    ``feature_dims``, flattened) was active; ``n_tokens``: evaluated tokens.
    """

    metrics: dict[str, float]
    fire_counts: torch.Tensor
    n_tokens: int


@attrs.frozen
class DensityHistogram:
    """Histogram of ``log10(feature density)``.

    ``counts`` int64 ``(bins,)``; ``edges`` float64 ``(bins + 1,)`` in log10 units (from
    ``log10(low)`` to 0); ``never_fired``: features with density 0 (not in ``counts``).
    ``counts.sum() + never_fired == n_features``.
    """

    counts: np.ndarray
    edges: np.ndarray
    never_fired: int
    n_features: int


def density_histogram(fire_counts: torch.Tensor | np.ndarray, n_tokens: int, bins: int = 50,
                      low: float = DENSITY_LOW) -> DensityHistogram:
    """Histogram of ``log10(fire_counts / n_tokens)`` over ``bins`` equal-width bins in
    ``[log10(low), 0]`` (module docstring)."""
    if bins < 1:
        raise LmsaeError(f"density histogram needs at least one bin, got {bins}")
    if not 0 < low < 1:
        raise LmsaeError(f"density histogram lower end must be in (0, 1), got {low}")
    counts = np.asarray(fire_counts.cpu() if isinstance(fire_counts, torch.Tensor) else fire_counts,
                        dtype=np.float64).reshape(-1)
    edges = np.linspace(np.log10(low), 0.0, bins + 1)
    fired = counts > 0
    if n_tokens <= 0:
        return DensityHistogram(np.zeros(bins, dtype=np.int64), edges, int(counts.size), int(counts.size))
    log_density = np.log10(counts[fired] / n_tokens)
    # clip: densities below `low` go to the first bin, density 1 to the last (np.histogram's last
    # bin is closed on the right)
    hist, _ = np.histogram(np.clip(log_density, edges[0], edges[-1]), bins=edges)
    return DensityHistogram(hist.astype(np.int64), edges, int((~fired).sum()), int(counts.size))


@torch.no_grad()
def reconstruction_statistics(model: SparseDictionary, stream: Iterable[dict[str, Any]], max_tokens: int,
                              device: torch.device | str = "cpu") -> ReconstructionStatistics:
    """Reconstruction metrics and per-feature fire counts of ``model`` over up to ``max_tokens``
    tokens of ``stream`` (whole batches: the last one may go past ``max_tokens``)."""
    was_training = model.training
    model.eval()
    n = 0
    sq_err = y_sq = l0 = ratio = ratio_tokens = act_sum = act_count = 0.0
    y_sum: torch.Tensor | None = None
    fire_counts: torch.Tensor | None = None
    dtype = next(model.parameters()).dtype
    try:
        for batch in stream:
            batch = {k: (v.to(device, dtype=dtype if v.is_floating_point() else None) if isinstance(v, torch.Tensor)
                         else v) for k, v in batch.items()}
            nb = model.normalize(batch)
            x, extras = model.prepare_input(nb)
            label = model.prepare_label(nb)
            mask = nb.get("mask")
            acts = model.encode(x, mask=mask, **extras)
            recon = model.decode(acts, **extras)
            a = flatten_tokens(acts, model.feature_axes(x), mask)
            y = flatten_tokens(label, model.output_axes(x), mask).reshape(a.shape[0], -1).double()
            y_hat = flatten_tokens(recon, model.output_axes(x), mask).reshape(a.shape[0], -1).double()
            n += y.shape[0]
            sq_err += float((y_hat - y).pow(2).sum())
            y_sq += float(y.pow(2).sum())
            y_sum = y.sum(0) if y_sum is None else y_sum + y.sum(0)
            active = a > 0
            l0 += float(active.reshape(a.shape[0], -1).sum())
            y_norm = y.norm(dim=-1)
            nonzero = y_norm > 0  # a token whose label is exactly 0 has no ratio
            ratio += float(torch.where(nonzero, y_hat.norm(dim=-1) / y_norm.clamp_min(1e-30),
                                       torch.zeros_like(y_norm)).sum())
            ratio_tokens += float(nonzero.sum())
            act_sum += float(a.double().sum())
            act_count += float(active.sum())
            counts = active.reshape(a.shape[0], -1).sum(0, dtype=torch.int64)
            fire_counts = counts if fire_counts is None else fire_counts + counts
            if n >= max_tokens:
                break
    finally:
        model.train(was_training)
    if n == 0 or y_sum is None or fire_counts is None:
        return ReconstructionStatistics({"n_tokens": 0.0}, torch.zeros(0, dtype=torch.int64), 0)
    total_var = y_sq - float(y_sum.pow(2).sum()) / n
    metrics = {
        "n_tokens": float(n),
        "explained_variance": 1.0 - sq_err / max(total_var, 1e-30),
        "mse": sq_err / n,
        "l0": l0 / n,
        "l2_ratio": ratio / max(ratio_tokens, 1.0),
        "dead_fraction": float((fire_counts == 0).double().mean()),
        "mean_feature_act": act_sum / max(act_count, 1.0),
    }
    return ReconstructionStatistics(metrics, fire_counts.cpu(), n)


def evaluate_reconstruction(model: SparseDictionary, stream: Iterable[dict[str, Any]], max_tokens: int,
                            device: torch.device | str = "cpu") -> dict[str, float]:
    """Reconstruction metrics of ``model`` over up to ``max_tokens`` tokens of ``stream``."""
    return reconstruction_statistics(model, stream, max_tokens, device=device).metrics
