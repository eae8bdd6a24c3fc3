"""Per-feature extras for feature analysis (``ArchitectureSpec.analysis_extras``).

All values describe the transform's map ``U_i V_i`` in the dictionary's current units (raw units
once normalisation is folded, as the train task saves it):

- ``rank`` ``(n,)``: the transform's rank r_i (its rank group);
- ``frobenius_norm`` ``(n,)``: ``||U_i V_i||_F`` (the decoder norm);
- ``top_singular_value`` ``(n,)``: σ_1, the largest gain of the map;
- ``stable_rank`` ``(n,)``: ``||U_i V_i||_F^2 / σ_1^2`` in [1, r_i], how many directions the transform
  really uses (1: a rank-1 map whatever r_i; r_i: all singular values equal).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmsae_molt.model import MixtureOfLinearTransforms

__all__ = ["molt_analysis_extras"]


def molt_analysis_extras(model: MixtureOfLinearTransforms, feature_indices: Sequence[int]) -> dict[str, np.ndarray]:
    """One row per entry of ``feature_indices`` (canonical indices); see the module docstring."""
    idx = torch.as_tensor(np.asarray(feature_indices, dtype=np.int64).reshape(-1))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= model.n_features):
        raise IndexError(f"feature indices must lie in [0, {model.n_features}), got min {int(idx.min())}, "
                         f"max {int(idx.max())}")
    with torch.no_grad():
        top = model.singular()
        frob = top.values.square().sum(-1).sqrt()
        sigma1 = top.values[:, 0]
        stable = torch.where(sigma1 > 0, frob.square() / sigma1.square().clamp_min(1e-300), torch.ones_like(frob))
    return {
        "rank": model.feature_ranks()[idx].numpy(),
        "frobenius_norm": frob[idx].numpy(),
        "top_singular_value": sigma1[idx].numpy(),
        "stable_rank": stable[idx].numpy(),
    }
