"""The built-in SAE / transcoder passes the architecture contract, for every variant."""

from __future__ import annotations

import types

from lmsae.dictionary.sae import SAE_SPEC, SAEConfig
from lmsae.hookspecs import hookimpl
from lmsae.records import ArchitectureSpec
from lmsae.registry import load_registry
from lmsae.testing import ArchitectureContract


@hookimpl
def _register():
    return [SAE_SPEC]


# A stand-in plugin module until the core plugin registers SAE_SPEC itself; once it does, the
# installed registration is used (registering it twice would be a duplicate-name error).
_sae_testplugin = types.ModuleType("lmsae_sae_testplugin")
_sae_testplugin.lmsae_register_architectures = _register  # type: ignore[attr-defined]

_PLUGINS = () if "sae" in load_registry().names("architecture") else (_sae_testplugin,)

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def variants() -> list[SAEConfig]:
    """Every activation × gating, plus transcoders, GLU, input-side decoder bias, no decoder bias."""
    # A wide JumpReLU kernel and a threshold on the pre-activations' scale, so that one random
    # batch puts some pre-activations inside the kernel and the threshold receives gradient.
    base = dict(hook_point_in="blocks.0.hook_resid_post", d_model=16, d_sae=48, top_k=4,
                jumprelu_init_threshold=0.5, jumprelu_bandwidth=4.0)
    out = []
    for act in ("relu", "jumprelu", "topk", "batchtopk"):
        for gating in (False, True):
            out.append(SAEConfig(**base, act_fn=act, decoder_norm_gating=gating))
            out.append(SAEConfig(**base, act_fn=act, decoder_norm_gating=gating, use_glu_encoder=True,
                                 apply_decoder_bias_to_input=True))
    tc = {**base, "hook_point_in": IN, "hook_point_out": OUT}
    for act in ("relu", "jumprelu", "topk", "batchtopk"):
        out.append(SAEConfig(**tc, d_out=24, act_fn=act, decoder_norm_gating=act != "relu"))
        # same width: b_D subtracted from the input with different in/out scales exercises the
        # δ correction of fold_scales, GLU bias included
        out.append(SAEConfig(**tc, act_fn=act, decoder_norm_gating=act in ("jumprelu", "topk"),
                             apply_decoder_bias_to_input=True, use_glu_encoder=True))
    out.append(SAEConfig(**base, act_fn="jumprelu", use_decoder_bias=False))
    out.append(SAEConfig(**tc, d_out=8, act_fn="topk", use_decoder_bias=False, use_glu_encoder=True))
    out.append(SAEConfig(**{**base, "d_sae": None}, expansion_factor=2.5, act_fn="relu", normalization="none"))
    return out


class TestSAE(ArchitectureContract):
    architecture = "sae"
    plugins = _PLUGINS
    batch_size = 32

    def configs(self, spec: ArchitectureSpec) -> list[SAEConfig]:
        return [spec.example_config(), *variants()]
