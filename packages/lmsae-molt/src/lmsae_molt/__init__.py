"""lmsae-molt: MOLT (mixture of linear transforms) for lmsae.

A sparse gate selects, per token, a few low-rank linear maps of the input; the prediction is
the gate-weighted sum of the selected maps applied to the input, ``y = sum_i f_i U_i V_i x + b_D``.
See :mod:`lmsae_molt.model` for the maths, :mod:`lmsae_molt.sharding` for the group-aware
tensor-parallel layout.
"""

from lmsae_molt.config import MOLTConfig
from lmsae_molt.model import MixtureOfLinearTransforms
from lmsae_molt.sharding import GroupedDim, local_feature_indices, shard_parameters, unshard

__all__ = ["GroupedDim", "MOLTConfig", "MixtureOfLinearTransforms", "local_feature_indices", "shard_parameters",
           "unshard"]
