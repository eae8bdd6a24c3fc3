"""Feature parallelism of the CLT: shards on a process mesh compute exactly the single-process model.

Two gloo processes on the CPU run every case on two layouts: ``model`` (features split over the
2 processes) and ``data`` (tokens split, the batch selections global over the data group); with
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

import attrs
import pytest
import torch
from lmsae.testing.shard_step import ShardStepCheck

from lmsae.errors import ShardingError
from lmsae_clt.config import CLTConfig
from lmsae_clt.model import CLT_SPEC, CrossLayerTranscoder

SPEC = CLT_SPEC

#: processes of the launch: 2 (layouts "model" and "data"), or 4 with LMSAE_TEST_DISTRIBUTED_WORLD=4
#: (a data = 2 x model = 2 mesh, adding the "data+model" layout)
N_LAYERS, D_MODEL, D_SAE, N_TOKENS = 3, 6, 8, 16
TOL = 1e-10

#: case name -> CLTConfig overrides
CASES: dict[str, dict] = {
    "relu": {"act_fn": "relu"},
    "jumprelu": {"act_fn": "jumprelu", "jumprelu_init_threshold": 0.8, "jumprelu_bandwidth": 2.0},
    "jumprelu-gated": {"act_fn": "jumprelu", "jumprelu_init_threshold": 0.8, "jumprelu_bandwidth": 2.0,
                       "decoder_norm_gating": True},
    "topk": {"act_fn": "topk", "top_k": 3},
    "topk-gated-sparse-decode": {"act_fn": "topk", "top_k": 3, "decoder_norm_gating": True,
                                 "sparse_decode_density": 1.0},
    "layertopk": {"act_fn": "layertopk", "top_k": 5},
    "layertopk-sparse-decode": {"act_fn": "layertopk", "top_k": 5, "sparse_decode_density": 1.0, "d_out": 4},
    "batchtopk": {"act_fn": "batchtopk", "top_k": 3},
    "batchtopk-gated": {"act_fn": "batchtopk", "top_k": 2, "decoder_norm_gating": True, "d_out": 4},
    "batchlayertopk": {"act_fn": "batchlayertopk", "top_k": 5},
    "batchlayertopk-gated": {"act_fn": "batchlayertopk", "top_k": 4, "decoder_norm_gating": True},
}


def make_config(**overrides) -> CLTConfig:
    return CLTConfig(hook_points_in=[f"blocks.{i}.ln2.hook_normalized" for i in range(N_LAYERS)],
                     hook_points_out=[f"blocks.{i}.hook_mlp_out" for i in range(N_LAYERS)],
                     d_model=D_MODEL, d_sae=D_SAE, normalization="none", **overrides)


def make_model(config: CLTConfig, seed: int = 0) -> CrossLayerTranscoder:
    g = torch.Generator().manual_seed(seed)
    model = CrossLayerTranscoder(config)
    model.reset_parameters(generator=g)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        # folded factors: the combined decoder norms (gates, penalty) weigh targets unequally
        model.target_norm_factors.copy_(torch.linspace(0.5, 2.0, N_LAYERS, dtype=model.target_norm_factors.dtype))
    return model


def make_batch(model: CrossLayerTranscoder, seed: int = 1) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """``(x, extras, mask, label)``; masked tokens in both data halves (different counts)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(N_TOKENS, N_LAYERS, D_MODEL, generator=g, dtype=torch.float64) * 2.0 + 0.3
    label = torch.randn(N_TOKENS, N_LAYERS, cfg.output_width, generator=g, dtype=torch.float64)
    mask = torch.ones(N_TOKENS, dtype=torch.bool)
    mask[[1, 2, 12]] = False
    return x, {}, mask, label


def feature_dim(config: CLTConfig, ndim: int) -> int:
    """Dim of the feature activations ``(tokens, L, F)`` that the model axis splits."""
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


def test_shard_config_splits_every_layer():
    cfg = make_config(act_fn="jumprelu")
    shard = CLT_SPEC.shard_config(cfg, {"model": 4})
    assert (shard.n_features, shard.n_layers, shard.d_model) == (2, N_LAYERS, D_MODEL)
    assert CLT_SPEC.shard_config(cfg, {"model": 1}) == cfg
    # the rules give the shard exactly its parameters' shapes (buffers replicated)
    from lmsae.distributed.sharding import shard_state

    full = make_model(cfg)
    state = shard_state(full.state_dict(), CLT_SPEC.sharding_rules(cfg), {"model": (1, 4)},
                        parameters={n for n, _ in full.named_parameters()})
    model = CrossLayerTranscoder(shard).double()
    model.load_state_dict(state)
    torch.testing.assert_close(model.b_E, full.b_E[:, 2:4])
    torch.testing.assert_close(model.target_norm_factors, full.target_norm_factors)


def test_shard_config_errors():
    cfg = make_config(act_fn="topk", top_k=2)
    with pytest.raises(ShardingError, match=r"d_sae = 8 .*\[distributed\] model = 3"):
        CLT_SPEC.shard_config(cfg, {"model": 3})
    with pytest.raises(ShardingError, match="'head'"):
        CLT_SPEC.shard_config(cfg, {"model": 2, "head": 2})


def test_decode_linear_is_decode_without_bias():
    for density in (0.0, 1.0):
        model = make_model(make_config(act_fn="topk", top_k=3, sparse_decode_density=density))
        x, _, mask, _ = make_batch(model)
        acts = model.encode(x, mask=mask)
        want = model.decode(acts) - model.b_D
        torch.testing.assert_close(model.decode_linear(acts), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(model.decode_linear(acts), model.decode(acts) - model.decode(torch.zeros_like(acts)),
                                   rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [{"model": 2}, {"data": 2}], ids=["model2", "data2"])
def test_training_on_a_mesh_matches_one_process(tmp_path, sizes):
    from lmsae.testing.distributed import check_parallel_training

    cfg = attrs.evolve(SPEC.example_config(), act_fn="batchtopk", top_k=2, decoder_norm_gating=True)
    check_parallel_training("clt", cfg, sizes, tmp_path)


if __name__ == "__main__":
    CHECK.worker(sys.argv[1])
