"""Training metrics, accumulated over a logging window and reported under stable names.

Definitions (all on normalised activations, masked tokens excluded):

- ``metrics/explained_variance``: per batch, ``1 - sum_t ||x_hat_t - y_t||^2 / sum_t ||y_t - mean(y)||^2``
  (the mean over the batch's tokens; sums over every output axis), averaged over the window's
  batches.
- ``metrics/l0``: active features per token (summed over layers/heads for multi-output dictionaries).
- ``metrics/l2_norm_error``: mean ``||x_hat_t - y_t||``; ``metrics/l2_norm_error_ratio`` divides by
  mean ``||y_t||``; ``metrics/l2_ratio``: mean ``||x_hat_t|| / ||y_t||`` over the tokens whose
  label is not exactly 0 (shrinkage, 1 is ideal).
- ``metrics/mean_feature_act``: mean of the non-zero feature activations.
- ``metrics/dead_fraction``: fraction of features that have not fired for ``dead_threshold``
  tokens (or since the start, while fewer tokens than that have been seen).
- ``sparsity/above_1e-1`` ...: number of features whose firing frequency over the window is above /
  below the value; ``sparsity/k`` the current k of a TopK activation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lmsae.nn.axes import flatten_tokens

FREQUENCY_ABOVE = (1e-1, 1e-2)
FREQUENCY_BELOW = (1e-5, 1e-6, 1e-7)


def _flat(t: Tensor, axes: Sequence[str], mask: Tensor | None) -> Tensor:
    """(n_tokens, everything else flattened)."""
    f = flatten_tokens(t, axes, mask)
    return f.reshape(f.shape[0], -1)


@torch.no_grad()
def batch_statistics(feature_acts: Tensor, feature_axes: Sequence[str], reconstruction: Tensor,
                     label: Tensor, output_axes: Sequence[str], mask: Tensor | None) -> dict[str, Tensor]:
    """Sums over one batch that :class:`MetricWindow` accumulates (all float64 on the acts' device)."""
    acts = flatten_tokens(feature_acts.detach(), feature_axes, mask)  # (n, *feature_dims)
    # per-token reductions in the activations' own precision (float32 or float64; half types are
    # upcast to float32), then float64 for the sums over tokens: no float64 copy of the batch
    y = _flat(label.detach(), output_axes, mask)
    x_hat = _flat(reconstruction.detach(), output_axes, mask)
    work = torch.promote_types(torch.promote_types(y.dtype, x_hat.dtype), torch.float32)
    y, x_hat = y.to(work), x_hat.to(work)
    n = y.shape[0]
    err = torch.linalg.vector_norm(x_hat - y, dim=-1).double().square()
    var = torch.linalg.vector_norm(y - y.mean(0, keepdim=True), dim=-1).double().square()
    active = acts > 0
    y_norm = torch.linalg.vector_norm(y, dim=-1).double()
    x_norm = torch.linalg.vector_norm(x_hat, dim=-1).double()
    return {
        "n_tokens": torch.tensor(float(n), dtype=torch.float64, device=y.device),
        "sq_err": err.sum(),
        "explained_variance": (1 - err.sum() / var.sum().clamp_min(1e-30)) if n > 1 else torch.zeros((), dtype=torch.float64, device=y.device),
        "l0": active.sum(dtype=torch.float64),
        "l2_error": err.sqrt().sum(),
        "label_norm": y_norm.sum(),
        # tokens whose label is exactly 0 have no ratio: left out (they made the mean explode)
        "l2_ratio": torch.where(y_norm > 0, x_norm / y_norm.clamp_min(1e-30), torch.zeros_like(y_norm)).sum(),
        "l2_ratio_tokens": (y_norm > 0).sum(dtype=torch.float64),
        "act_sum": acts.sum(dtype=torch.float64),
        "act_count": active.sum(dtype=torch.float64),
        "feature_count": active.sum(0, dtype=torch.float64),  # (*feature_dims,)
    }


@torch.no_grad()
def distributed_batch_statistics(feature_acts: Tensor, feature_axes: Sequence[str], reconstruction: Tensor,
                                 label: Tensor, output_axes: Sequence[str], mask: Tensor | None,
                                 mesh: Any) -> dict[str, Tensor]:
    """:func:`batch_statistics` of the GLOBAL batch under a process mesh (same keys, same values up
    to rounding): tokens are split over ``data`` ranks, features over ``model`` ranks, output heads
    over ``head`` ranks (per-token errors are summed over heads before any square root). The
    explained variance uses the variance over the whole global batch."""
    from lmsae.distributed.collectives import all_gather, all_reduce

    dg, mg, hg = mesh.group("data"), mesh.group("model"), mesh.group("head")
    acts = flatten_tokens(feature_acts.detach(), feature_axes, mask)
    y = _flat(label.detach(), output_axes, mask).double()
    x_hat = _flat(reconstruction.detach(), output_axes, mask).double()
    n = y.shape[0]
    per_token = torch.stack([(x_hat - y).pow(2).sum(-1), y.pow(2).sum(-1), x_hat.pow(2).sum(-1)])
    err, y_sq, x_sq = all_reduce(per_token, hg)
    y_norm = y_sq.sqrt()
    sums = torch.stack([
        torch.tensor(float(n), dtype=torch.float64, device=y.device), err.sum(), err.sqrt().sum(), y_norm.sum(),
        torch.where(y_norm > 0, x_sq.sqrt() / y_norm.clamp_min(1e-30), torch.zeros_like(y_norm)).sum(), y_sq.sum(),
        (y_norm > 0).sum(dtype=torch.float64)])
    sums = all_reduce(sums, dg)
    y_sum = all_reduce(y.sum(0), dg)
    n_global = float(sums[0])
    centred = all_reduce(y_sum.pow(2).sum().reshape(1), hg)[0] / max(n_global, 1.0)
    var = sums[5] - centred
    active = acts > 0
    feature_sums = all_reduce(torch.stack([active.reshape(n, -1).sum().double(), acts.double().sum()]),
                              mesh.group("data", "model"))
    feature_count = all_gather(all_reduce(active.sum(0).double(), dg), mg, dim=-1)
    zero = torch.zeros((), dtype=torch.float64, device=y.device)
    return {
        "n_tokens": sums[0],
        "sq_err": sums[1],
        "explained_variance": (1 - sums[1] / var.clamp_min(1e-30)) if n_global > 1 else zero,
        "l0": feature_sums[0],
        "l2_error": sums[2],
        "label_norm": sums[3],
        "l2_ratio": sums[4],
        "l2_ratio_tokens": sums[6],
        "act_sum": feature_sums[1],
        "act_count": feature_sums[0],
        "feature_count": feature_count,
    }


class MetricWindow:
    """Accumulates batch statistics and scalar values between two logging steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n_batches = 0
        self.sums: dict[str, Tensor] = {}
        # scalars and maxima stay tensors (float64) until compute(): no host sync per step
        self.scalars: dict[str, Tensor] = {}
        self.maxima: dict[str, Tensor] = {}

    def add_batch(self, stats: Mapping[str, Tensor], losses: Mapping[str, Tensor | float]) -> None:
        self.n_batches += 1
        for k, v in stats.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        for k, v in losses.items():
            v = v.detach().to(torch.float64) if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64)
            self.scalars[k] = self.scalars[k] + v.to(self.scalars[k].device) if k in self.scalars else v

    def add_max(self, name: str, value: Tensor | float) -> None:
        v = value.detach().to(torch.float64) if isinstance(value, Tensor) else torch.tensor(float(value),
                                                                                           dtype=torch.float64)
        self.maxima[name] = torch.maximum(self.maxima[name], v.to(self.maxima[name].device)) if name in self.maxima \
            else v

    def compute(self) -> dict[str, float]:
        """Window averages under their stable names (empty when nothing was added)."""
        if self.n_batches == 0:
            return {}
        s = {k: v for k, v in self.sums.items()}
        nb = self.n_batches
        n = float(s["n_tokens"])
        out: dict[str, float] = {f"losses/{k}": float(v) / nb for k, v in self.scalars.items()}
        out["metrics/explained_variance"] = float(s["explained_variance"]) / nb
        out["metrics/l0"] = float(s["l0"]) / max(n, 1.0)
        out["metrics/mse"] = float(s["sq_err"]) / max(n, 1.0)
        out["metrics/l2_norm_error"] = float(s["l2_error"]) / max(n, 1.0)
        out["metrics/l2_norm_error_ratio"] = float(s["l2_error"]) / max(float(s["label_norm"]), 1e-30)
        out["metrics/l2_ratio"] = float(s["l2_ratio"]) / max(float(s.get("l2_ratio_tokens", n)), 1.0)
        out["metrics/mean_feature_act"] = float(s["act_sum"]) / max(float(s["act_count"]), 1.0)
        freq = s["feature_count"] / max(n, 1.0)
        for v in FREQUENCY_ABOVE:
            out[f"sparsity/above_{v:.0e}".replace("e-0", "e-")] = float((freq > v).sum())
        for v in FREQUENCY_BELOW:
            out[f"sparsity/below_{v:.0e}".replace("e-0", "e-")] = float((freq < v).sum())
        out.update({k: float(v) for k, v in self.maxima.items()})
        return out

    def state_dict(self) -> dict:
        return {"n_batches": self.n_batches, "sums": dict(self.sums),
                "scalars": {k: float(v) for k, v in self.scalars.items()},
                "maxima": {k: float(v) for k, v in self.maxima.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.n_batches = int(state["n_batches"])
        self.sums = {k: v.clone() for k, v in state["sums"].items()}
        self.scalars = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in state["scalars"].items()}
        self.maxima = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in state["maxima"].items()}
