"""The architecture record of the crosscoder: sharding rules, example config, analysis extras."""

from __future__ import annotations

from lmsae.records import ArchitectureSpec

from lmsae_crosscoder.analysis import crosscoder_analysis_extras
from lmsae_crosscoder.config import CrosscoderConfig
from lmsae_crosscoder.model import Crosscoder

__all__ = ["CROSSCODER_SPEC", "crosscoder_example_config", "crosscoder_sharding_rules"]


def crosscoder_sharding_rules(config: CrosscoderConfig) -> dict[str, dict[str, int]]:
    """Heads are split over the 'head' mesh axis, features over 'model'.

    ``b_E`` (features only) is replicated over 'head': under head parallelism each head rank
    computes its partial sum ``x_h W_E[h]``, the partial sums are all-reduced over 'head', then
    ``b_E`` is added once. The buffer ``head_norm_weight`` (H,) is not a parameter; it follows
    the heads (dim 0 on 'head').
    """
    rules: dict[str, dict[str, int]] = {
        "W_E": {"head": 0, "model": 2},
        "b_E": {"model": 0},
        "W_D": {"head": 0, "model": 1},
        "b_D": {"head": 0},
    }
    if config.act_fn == "jumprelu":
        rules["activation.log_threshold"] = {"model": 0}
    return rules


def crosscoder_example_config() -> CrosscoderConfig:
    """A small TopK crosscoder over two layers' residual streams (16 dims, 64 features, k=4)."""
    return CrosscoderConfig(hook_points=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], d_model=16,
                            expansion_factor=4.0, act_fn="topk", top_k=4)


CROSSCODER_SPEC = ArchitectureSpec(
    config_class=CrosscoderConfig,
    model_class=Crosscoder,
    sharding_rules=crosscoder_sharding_rules,
    example_config=crosscoder_example_config,
    summary="crosscoder: one sparse code shared by several hook points or models (ReLU, JumpReLU, TopK, BatchTopK)",
    analysis_extras=crosscoder_analysis_extras,
)
