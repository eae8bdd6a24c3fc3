"""The shipped architecture contract, on every activation function x gating x init, with 2 and 3 heads."""

from __future__ import annotations

import itertools

from lmsae.testing import ArchitectureContract

from lmsae_crosscoder.config import CrosscoderConfig

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


def contract_configs() -> list[CrosscoderConfig]:
    configs = []
    for act_fn, gating, init in itertools.product(("relu", "jumprelu", "topk", "batchtopk"), (False, True),
                                                  ("identical", "independent")):
        configs.append(CrosscoderConfig(hook_points=HOOKS[:2], d_model=8, d_sae=24, act_fn=act_fn, top_k=4,
                                        decoder_norm_gating=gating, init=init,
                                        jumprelu_init_threshold=0.5, jumprelu_bandwidth=2.0))
    # three heads, the same hook of two "models" under aliased keys, and the default expansion factor
    configs.append(CrosscoderConfig(hook_points=HOOKS, d_model=8, d_sae=24, act_fn="batchtopk", top_k=3,
                                    decoder_norm_gating=True, init="independent"))
    configs.append(CrosscoderConfig(hook_points=["base.blocks.3.hook_resid_post", "chat.blocks.3.hook_resid_post"],
                                    d_model=6, act_fn="jumprelu", decoder_norm_gating=True,
                                    jumprelu_init_threshold=0.5, jumprelu_bandwidth=2.0))
    return configs


class TestCrosscoder(ArchitectureContract):
    architecture = "crosscoder"

    def configs(self, spec):
        return contract_configs()

