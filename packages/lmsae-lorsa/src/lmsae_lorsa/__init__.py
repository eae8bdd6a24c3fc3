"""lmsae-lorsa: low-rank sparse attention (Lorsa) for lmsae.

- :class:`~lmsae_lorsa.config.LorsaConfig` / :class:`~lmsae_lorsa.model.LowRankSparseAttention`
  (``[dictionary] architecture = "lorsa"``);
- :func:`~lmsae_lorsa.init.init_from_attention`: QK heads copied from the language model's
  attention layer, OV features in each head's active subspace;
- ``task = "lorsa_init"`` and ``lmsae lorsa init-from-model CONFIG OUT``: an initialised
  Lorsa that ``[pretrained]`` continues training;
- z-patterns (which source tokens a feature reads): ``LowRankSparseAttention.z_pattern`` and
  ``sample_extras``.
"""

from lmsae_lorsa.config import LorsaConfig
from lmsae_lorsa.init import attention_settings, init_from_attention
from lmsae_lorsa.model import LowRankSparseAttention
from lmsae_lorsa.spec import LORSA_SPEC

__all__ = ["LORSA_SPEC", "LorsaConfig", "LowRankSparseAttention", "attention_settings", "init_from_attention"]
__version__ = "0.1.0"
