"""Lorsa passes the architecture contract for every activation function, positional setting,
QK-norm and gating option."""

from __future__ import annotations

import itertools

from lmsae.records import ArchitectureSpec
from lmsae.testing import ArchitectureContract
from lmsae_lorsa.config import ACT_FNS, LorsaConfig

IN, OUT = "blocks.2.ln1.hook_normalized", "blocks.2.hook_attn_out"


def variants() -> list[LorsaConfig]:
    # A wide JumpReLU kernel around a threshold on the pre-activations' scale, so that one random
    # batch puts some pre-activations inside the kernel and the threshold receives gradient.
    base = dict(hook_point_in=IN, hook_point_out=OUT, d_model=10, n_qk_heads=2, d_qk_head=6, d_sae=12, n_ctx=16,
                top_k=3, jumprelu_init_threshold=0.5, jumprelu_bandwidth=4.0)
    positional = [dict(positional_embedding="rotary", rotary_style="neox"),
                  dict(positional_embedding="rotary", rotary_style="gptj"),
                  dict(positional_embedding="none")]
    out = []
    for act, pos, gating in itertools.product(ACT_FNS, positional, (False, True)):
        out.append(LorsaConfig(**base, **pos, act_fn=act, decoder_norm_gating=gating))
    # QK-norm, partial rotary, NTK-by-parts, a custom scale, no normalisation, one QK head
    out.append(LorsaConfig(**base, act_fn="jumprelu", qk_norm="rms", decoder_norm_gating=True))
    out.append(LorsaConfig(**base, act_fn="topk", qk_norm="rms", positional_embedding="none"))
    out.append(LorsaConfig(**base, act_fn="batchtopk", rotary_dim=4, rotary_style="gptj", rotary_base=500.0))
    out.append(LorsaConfig(**base, act_fn="relu", ntk_by_parts=True, ntk_original_context=8, ntk_factor=4.0,
                           rotary_base=100.0, attn_scale=1.5))
    out.append(LorsaConfig(**base, act_fn="topk", normalization="none"))
    out.append(LorsaConfig(**{**base, "n_qk_heads": 1}, act_fn="topk"))
    return out


class TestLorsa(ArchitectureContract):
    architecture = "lorsa"

    def configs(self, spec: ArchitectureSpec) -> list[LorsaConfig]:
        return [spec.example_config(), *variants()]

    def parameters_allowed_without_gradient(self, config: LorsaConfig) -> set[str]:
        # without RoPE and QK-norm, b_K adds q[t].b_K to every score of row t: the softmax
        # ignores it, so its gradient is exactly zero (up to rounding)
        if config.positional_embedding == "none" and config.qk_norm == "none":
            return {"b_K"}
        return set()
