"""Feature parallelism of Lorsa: shards on a process mesh compute exactly the single-process model.

A shard holds ``n_qk_heads / m`` QK heads with their OV groups (``d_sae / m`` features). Two gloo
processes on the CPU run every case on two layouts: ``model`` (heads and features split over the
2 processes) and ``data`` (sequences split, BatchTopK global over the data group); with
``LMSAE_TEST_DISTRIBUTED_WORLD=4`` four processes add ``data+model`` (a 2 x 2 mesh). Each process
builds the shard the core trainer would (``shard_config`` + ``shard_state`` of the sharding rules),
runs ``encode_pre`` / ``activate`` / ``decode`` (first model rank) or ``decode_linear`` (the
others), sums the partial predictions over the model group, and back-propagates a reconstruction
loss plus a decoder-norm-weighted L1 penalty (summed over the model group). The predictions, the
local activations and every gradient (replicated ones summed over the axes they are replicated
along) must equal the float64 single-process model's to 1e-10.

The processes run this file as a script (``python test_distributed.py OUT_DIR``): every case runs
in one launch and writes its outcome per rank; the tests read them. A last test trains a few
steps through the core trainer on 2 processes (:func:`lmsae.testing.distributed.check_parallel_training`).
"""

from __future__ import annotations

import sys

import pytest
import torch
from lmsae.testing.shard_step import ShardStepCheck
from lmsae.errors import ShardingError
from lmsae_lorsa.config import LorsaConfig
from lmsae_lorsa.model import LowRankSparseAttention
from lmsae_lorsa.spec import LORSA_SPEC

SPEC = LORSA_SPEC
#: processes of the launch: 2 (layouts "model" and "data"), or 4 with LMSAE_TEST_DISTRIBUTED_WORLD=4
#: (a data = 2 x model = 2 mesh, adding the "data+model" layout)
N_SEQ, N_CTX, D_MODEL = 4, 6, 8
TOL = 1e-10

#: case name -> LorsaConfig overrides
CASES: dict[str, dict] = {
    "relu": {"act_fn": "relu"},
    "jumprelu-qknorm": {"act_fn": "jumprelu", "jumprelu_init_threshold": 0.5, "jumprelu_bandwidth": 2.0,
                        "qk_norm": "rms"},
    "jumprelu-gated": {"act_fn": "jumprelu", "jumprelu_init_threshold": 0.5, "jumprelu_bandwidth": 2.0,
                       "decoder_norm_gating": True, "positional_embedding": "none"},
    "topk": {"act_fn": "topk", "top_k": 3},
    "topk-gated-gptj": {"act_fn": "topk", "top_k": 3, "decoder_norm_gating": True, "rotary_style": "gptj",
                        "rotary_dim": 2},
    "batchtopk": {"act_fn": "batchtopk", "top_k": 3},
    "batchtopk-gated-qknorm": {"act_fn": "batchtopk", "top_k": 2, "decoder_norm_gating": True, "qk_norm": "rms"},
}


def make_config(**overrides) -> LorsaConfig:
    base = dict(hook_point_in="blocks.0.ln1.hook_normalized", hook_point_out="blocks.0.hook_attn_out",
                d_model=D_MODEL, n_qk_heads=4, d_qk_head=4, d_sae=16, n_ctx=16, normalization="none")
    return LorsaConfig(**{**base, **overrides})


def make_model(config: LorsaConfig, seed: int = 0) -> LowRankSparseAttention:
    g = torch.Generator().manual_seed(seed)
    model = LowRankSparseAttention(config)
    model.reset_parameters(generator=g)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_batch(model: LowRankSparseAttention, seed: int = 1):
    """``(x, extras, mask, label)`` of N_SEQ sequences; BOS masked, and one more token in the second half."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SEQ, N_CTX, D_MODEL, generator=g, dtype=torch.float64) * 2.0 + 0.3
    label = torch.randn(N_SEQ, N_CTX, D_MODEL, generator=g, dtype=torch.float64)
    mask = torch.ones(N_SEQ, N_CTX, dtype=torch.bool)
    mask[:, 0] = False
    mask[3, 4] = False
    return x, {}, mask, label


def feature_dim(config: LorsaConfig, ndim: int) -> int:
    """Dim of the feature activations ``(B, T, F)`` that the model axis splits (contiguous blocks)."""
    return ndim - 1


# --- the check (shared by the CLT, Lorsa and MOLT tests: lmsae.testing.shard_step) ------------------

CHECK = ShardStepCheck(SPEC, CASES, make_config, make_model, make_batch, feature_dim, tol=TOL)
LAYOUTS = CHECK.layouts


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str | None]:
    return CHECK.launch(__file__, tmp_path_factory.mktemp("distributed"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_step_matches_single_process(outcomes, case, layout):
    error = outcomes[f"{case}/{layout}"]
    if error:
        pytest.fail(error, pytrace=False)


# --- single-process checks -------------------------------------------------------------------------


def test_shard_config_splits_heads_with_their_features():
    cfg = make_config(act_fn="jumprelu", qk_norm="rms")
    shard = SPEC.shard_config(cfg, {"model": 2})
    assert (shard.n_qk_heads, shard.d_sae, shard.ov_group_size) == (2, 8, cfg.ov_group_size)
    assert shard.resolved_attn_scale == cfg.resolved_attn_scale
    assert SPEC.shard_config(cfg, {"model": 1}) == cfg
    from lmsae.distributed.sharding import shard_state

    full = make_model(cfg)
    state = shard_state(full.state_dict(), SPEC.sharding_rules(cfg), {"model": (1, 2)},
                        parameters={n for n, _ in full.named_parameters()})
    model = LowRankSparseAttention(shard).double()
    model.load_state_dict(state)
    # shard 1 is QK heads 2, 3 with features 8..15: its pre-activations are the full model's
    x, _, _, _ = make_batch(full)
    torch.testing.assert_close(model.encode_pre(x), full.encode_pre(x)[..., 8:], rtol=0, atol=1e-12)


def test_shard_config_errors():
    cfg = make_config(n_qk_heads=2, d_sae=8)
    with pytest.raises(ShardingError, match=r"n_qk_heads = 2 .*\[distributed\] model = 4"):
        SPEC.shard_config(cfg, {"model": 4})
    with pytest.raises(ShardingError, match="'head'"):
        SPEC.shard_config(cfg, {"head": 2})


def test_decode_linear_is_decode_without_bias():
    model = make_model(make_config(act_fn="topk", top_k=3))
    x, _, mask, _ = make_batch(model)
    acts = model.encode(x, mask=mask)
    torch.testing.assert_close(model.decode_linear(acts), model.decode(acts) - model.b_D, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [{"model": 2}, {"data": 2}], ids=["model2", "data2"])
def test_training_on_a_mesh_matches_one_process(tmp_path, sizes):
    from lmsae.testing.distributed import check_parallel_training

    check_parallel_training("lorsa", SPEC.example_config(), sizes, tmp_path)


if __name__ == "__main__":
    CHECK.worker(sys.argv[1])
