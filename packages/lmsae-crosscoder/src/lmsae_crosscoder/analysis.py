"""How a crosscoder's features are distributed over its heads.

All per-head decoder norms are in normalised (training) units, ``g_h ||W_D[h, i]||`` (see
:mod:`lmsae_crosscoder.model`): they do not change when normalisation is folded, and they are
comparable across heads whose raw activations have very different scales (early vs late layers).

- :func:`relative_decoder_norms`: each feature's decoder norm per head divided by the sum over
  heads, ``(F, H)``; rows sum to 1 (all zeros for a feature whose decoders are all zero). With two
  heads, column 0 is the "relative decoder norm" of model-diffing work: ~1 specific to head 0,
  ~0 specific to head 1, ~0.5 shared.
- :func:`classify_features`: a head *uses* a feature when its relative norm is at least
  ``threshold``; a feature is *shared* when every head uses it, *specific* to head h when only h
  does, *partial* otherwise (possible with 3 heads or more).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lmsae_crosscoder.model import Crosscoder

__all__ = [
    "HeadDistribution",
    "classify_features",
    "crosscoder_analysis_extras",
    "decoder_cosine_similarity",
    "head_distribution",
    "relative_decoder_norms",
]


def _indices(feature_indices: Any, n_features: int) -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(feature_indices, dtype=np.int64).reshape(-1))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_features):
        raise IndexError(f"feature indices must lie in [0, {n_features}), got min {int(idx.min())}, "
                         f"max {int(idx.max())}")
    return idx


@torch.no_grad()
def relative_decoder_norms(model: Crosscoder) -> torch.Tensor:
    """``(F, H)``: each head's share of the feature's combined decoder norm (rows sum to 1)."""
    norms = model.head_decoder_norms().T.double()  # (F, H)
    total = norms.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, norms / total.clamp_min(1e-300), torch.zeros_like(norms))


@torch.no_grad()
def decoder_cosine_similarity(model: Crosscoder) -> torch.Tensor:
    """``(F, H, H)``: cosine similarity of feature i's decoder rows of every pair of heads (the
    diagonal is 1; 0 where a row is zero). Scale-free, so unchanged by folding."""
    w = model.W_D.detach().double().transpose(0, 1)  # (F, H, d)
    unit = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return unit @ unit.transpose(-1, -2)


def crosscoder_analysis_extras(model: Crosscoder, feature_indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-feature extras for feature analysis, one row per entry of ``feature_indices``:

    - ``decoder_norms`` ``(n, H)``: ``g_h ||W_D[h, i]||`` (normalised units);
    - ``relative_decoder_norms`` ``(n, H)``: the same divided by their sum over heads;
    - ``decoder_cosine_similarity`` ``(n, H, H)``: head-by-head cosine of the decoder rows.
    """
    idx = _indices(feature_indices, model.n_features)
    with torch.no_grad():
        norms = model.head_decoder_norms().T.double()[idx]
    return {
        "decoder_norms": norms.cpu().numpy(),
        "relative_decoder_norms": relative_decoder_norms(model)[idx].cpu().numpy(),
        "decoder_cosine_similarity": decoder_cosine_similarity(model)[idx].cpu().numpy(),
    }


#: category codes of :func:`classify_features`
SHARED, PARTIAL, ZERO = -1, -2, -3


def classify_features(relative: torch.Tensor, threshold: float) -> torch.Tensor:
    """Category of each feature from its relative norms ``(F, H)``: ``SHARED`` (-1) when every head's
    share is >= ``threshold``, the head index h when only head h reaches it, ``PARTIAL`` (-2) when
    several but not all heads do, ``ZERO`` (-3) for a feature without decoder."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    uses = relative >= threshold
    count = uses.sum(dim=-1)
    category = torch.full((relative.shape[0],), PARTIAL, dtype=torch.int64)
    category[count == relative.shape[1]] = SHARED
    single = count == 1
    category[single] = uses[single].to(torch.int64).argmax(dim=-1)
    category[relative.sum(dim=-1) == 0] = ZERO
    return category


class HeadDistribution:
    """Summary of how features spread over heads (what ``lmsae crosscoder heads`` prints).

    Attributes: ``hook_points``; ``relative`` (F, H) float64; ``category`` (F,) int64 (see
    :func:`classify_features`); ``threshold``; ``counts``: {"shared", "partial", "zero",
    <hook>: specific count}; ``heads_used``: histogram of how many heads use each feature (index
    = number of heads); ``first_head_histogram``: (edges, counts) of column 0 of ``relative``.
    """

    def __init__(self, hook_points: Sequence[str], relative: torch.Tensor, threshold: float, bins: int = 10):
        self.hook_points = list(hook_points)
        self.relative = relative
        self.threshold = threshold
        self.category = classify_features(relative, threshold)
        self.counts: dict[str, int] = {"shared": int((self.category == SHARED).sum()),
                                       "partial": int((self.category == PARTIAL).sum()),
                                       "zero": int((self.category == ZERO).sum())}
        for h, hook in enumerate(self.hook_points):
            self.counts[hook] = int((self.category == h).sum())
        used = (relative >= threshold).sum(dim=-1)
        self.heads_used = [int((used == n).sum()) for n in range(len(self.hook_points) + 1)]
        edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
        # the last bin is closed on the right so that a share of exactly 1 is counted
        bucket = torch.bucketize(relative[:, 0].contiguous(), edges[1:-1], right=True)
        self.first_head_histogram = (edges.tolist(), torch.bincount(bucket, minlength=bins).tolist())

    @property
    def n_features(self) -> int:
        return int(self.relative.shape[0])

    def label(self, feature: int) -> str:
        """Category of one feature in words."""
        c = int(self.category[feature])
        return {SHARED: "shared", PARTIAL: "partial", ZERO: "zero"}.get(c, self.hook_points[c] if c >= 0 else "?")

    def to_json(self, per_feature: bool = False) -> dict[str, Any]:
        edges, counts = self.first_head_histogram
        out: dict[str, Any] = {
            "hook_points": self.hook_points, "n_features": self.n_features, "threshold": self.threshold,
            "counts": {"shared": self.counts["shared"], "partial": self.counts["partial"], "zero": self.counts["zero"],
                       "specific": {h: self.counts[h] for h in self.hook_points}},
            "heads_used": self.heads_used,
            "mean_relative_norm": {h: float(self.relative[:, i].mean()) for i, h in enumerate(self.hook_points)},
            "first_head_histogram": {"edges": edges, "counts": counts},
        }
        if per_feature:
            out["features"] = [{"index": i, "relative_decoder_norms": self.relative[i].tolist(),
                                "category": self.label(i)} for i in range(self.n_features)]
        return out


def head_distribution(model: Crosscoder, threshold: float = 0.1, bins: int = 10) -> HeadDistribution:
    """The :class:`HeadDistribution` of ``model``'s features."""
    return HeadDistribution(model.config.hook_points, relative_decoder_norms(model), threshold, bins)
