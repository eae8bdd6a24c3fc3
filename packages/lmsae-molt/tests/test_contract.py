"""The shipped architecture contract on every activation function x decoder-norm gating, with several
rank groups, a different output width, one rank group and no decoder bias."""

from __future__ import annotations

import itertools

from lmsae.testing import ArchitectureContract

from lmsae_molt.config import MOLTConfig

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def contract_configs() -> list[MOLTConfig]:
    configs = []
    for act_fn, gating in itertools.product(("relu", "jumprelu", "topk", "batchtopk"), (False, True)):
        configs.append(MOLTConfig(hook_point_in=IN, hook_point_out=OUT, d_model=8, d_out=6,
                                  rank_counts={1: 6, 2: 4, 4: 2}, act_fn=act_fn, top_k=3,
                                  decoder_norm_gating=gating, jumprelu_init_threshold=0.5, jumprelu_bandwidth=2.0))
    # one rank group, same width, no decoder bias; a MOLT reconstructing its own input
    configs.append(MOLTConfig(hook_point_in=IN, hook_point_out=OUT, d_model=6, rank_counts={"3": 5}, act_fn="topk",
                              top_k=2, use_decoder_bias=False))
    configs.append(MOLTConfig(hook_point_in=IN, hook_point_out=IN, d_model=6, rank_counts={"1": 4, "6": 2},
                              act_fn="jumprelu", decoder_norm_gating=True, jumprelu_init_threshold=0.5,
                              jumprelu_bandwidth=2.0))
    return configs


class TestMOLT(ArchitectureContract):
    architecture = "molt"

    def configs(self, spec):
        return contract_configs()
