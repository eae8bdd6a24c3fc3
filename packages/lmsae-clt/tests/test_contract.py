"""The CLT passes the architecture contract for every activation × gating × cross-layer init."""

from __future__ import annotations

from lmsae.records import ArchitectureSpec
from lmsae.testing import ArchitectureContract
from lmsae_clt.config import ACT_FNS, CLTConfig

IN = [f"blocks.{i}.ln2.hook_normalized" for i in range(3)]
OUT = [f"blocks.{i}.hook_mlp_out" for i in range(3)]


def variants() -> list[CLTConfig]:
    # A wide JumpReLU kernel around a threshold on the pre-activations' scale, so that one random
    # batch puts some pre-activations inside the kernel and the threshold receives gradient.
    base = {"hook_points_in": IN, "hook_points_out": OUT, "d_model": 12, "d_sae": 16,
            "jumprelu_init_threshold": 0.5, "jumprelu_bandwidth": 4.0}
    out = []
    for act in ACT_FNS:
        k = 6 if act in ("layertopk", "batchlayertopk") else 3
        for gating in (False, True):
            for zero in (False, True):
                out.append(CLTConfig(**base, act_fn=act, top_k=k, decoder_norm_gating=gating,
                                     init_cross_layer_decoders_zero=zero))
    # another output width, the sparse decode path forced on / off, an expansion factor, 1 layer, no normalisation
    out.append(CLTConfig(**base, d_out=20, act_fn="jumprelu", decoder_norm_gating=True))
    out.append(CLTConfig(**base, act_fn="batchlayertopk", top_k=4, sparse_decode_density=1.0, decoder_norm_gating=True))
    out.append(CLTConfig(**base, act_fn="relu", sparse_decode_density=0.0))
    out.append(CLTConfig(**{**base, "d_sae": None}, expansion_factor=1.5, act_fn="topk", top_k=2))
    out.append(CLTConfig(**{**base, "hook_points_in": IN[:1], "hook_points_out": OUT[:1]}, act_fn="layertopk", top_k=3))
    out.append(CLTConfig(**base, act_fn="topk", top_k=3, normalization="none"))
    return out


class TestCLT(ArchitectureContract):
    architecture = "clt"
    batch_size = 32

    def configs(self, spec: ArchitectureSpec) -> list[CLTConfig]:
        return [spec.example_config(), *variants()]
