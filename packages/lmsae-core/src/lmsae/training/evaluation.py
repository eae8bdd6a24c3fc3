"""Reconstruction metrics of a dictionary over a stream of activations.

Definitions (over all evaluated tokens, masked tokens excluded, normalised space):

- ``explained_variance = 1 - sum_t ||x_hat_t - y_t||^2 / sum_t ||y_t - mean(y)||^2`` where
  ``mean(y)`` is the mean over *all* evaluated tokens (one dataset-level number, not a mean of
  per-batch ratios);
- ``mse``: mean over tokens of ``||x_hat_t - y_t||^2``; ``l2_ratio``: mean ``||x_hat_t|| / ||y_t||``;
- ``l0``: mean number of active features per token;
- ``dead_fraction``: fraction of features that never fired on the evaluated tokens;
- ``mean_feature_act``: mean of the non-zero activations.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lmsae.dictionary.base import SparseDictionary
from lmsae.nn.axes import flatten_tokens


@torch.no_grad()
def evaluate_reconstruction(model: SparseDictionary, stream: Iterable[dict[str, Any]], max_tokens: int,
                            device: torch.device | str = "cpu") -> dict[str, float]:
    """Reconstruction metrics of ``model`` over up to ``max_tokens`` tokens of ``stream``."""
    was_training = model.training
    model.eval()
    n = 0
    sq_err = y_sq = l0 = ratio = act_sum = act_count = 0.0
    y_sum: torch.Tensor | None = None
    fired: torch.Tensor | None = None
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
            ratio += float((y_hat.norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-30)).sum())
            act_sum += float(a.double().sum())
            act_count += float(active.sum())
            fired = active.any(0) if fired is None else fired | active.any(0)
            if n >= max_tokens:
                break
    finally:
        model.train(was_training)
    if n == 0 or y_sum is None or fired is None:
        return {"n_tokens": 0.0}
    total_var = y_sq - float(y_sum.pow(2).sum()) / n
    return {
        "n_tokens": float(n),
        "explained_variance": 1.0 - sq_err / max(total_var, 1e-30),
        "mse": sq_err / n,
        "l0": l0 / n,
        "l2_ratio": ratio / n,
        "dead_fraction": float((~fired).double().mean()),
        "mean_feature_act": act_sum / max(act_count, 1.0),
    }
