"""Feature parallelism of MOLT: shards on a process mesh compute exactly the single-process model.

A shard holds block i of every rank group (the group-aware rules): itself a MOLT in canonical
order with every count divided by the ``model`` size. Two gloo processes on the CPU run every case
on two layouts: ``model`` (transforms split over the 2 processes) and ``data`` (tokens split,
BatchTopK global over the data group); with ``LMSAE_TEST_DISTRIBUTED_WORLD=4`` four processes add
``data+model`` (a 2 x 2 mesh). Each process builds the shard the core trainer would
(``shard_config`` + ``shard_state`` of the sharding rules), runs ``encode_pre`` / ``activate`` /
``decode`` (first model rank) or ``decode_linear`` (the others), sums the partial predictions over
the model group, and back-propagates a reconstruction loss plus a decoder-norm-weighted L1 penalty
(summed over the model group). The predictions, the local activations (compared through the
grouped split of the full model's) and every gradient (replicated ones summed over the axes they
are replicated along) must equal the float64 single-process model's to 1e-10.

The processes run this file as a script (``python test_distributed.py OUT_DIR``): every case runs
in one launch and writes its outcome per rank; the tests read them. A last test trains a few
steps through the core trainer on 2 processes (:func:`lmsae.testing.distributed.check_parallel_training`).
"""

from __future__ import annotations

import sys

import pytest
import torch
from lmsae.testing.shard_step import ShardStepCheck

from lmsae.distributed.sharding import GroupedDim
from lmsae.errors import ShardingError

from lmsae_molt.config import MOLTConfig
from lmsae_molt.model import MixtureOfLinearTransforms
from lmsae_molt.spec import MOLT_SPEC

SPEC = MOLT_SPEC
#: processes of the launch: 2 (layouts "model" and "data"), or 4 with LMSAE_TEST_DISTRIBUTED_WORLD=4
#: (a data = 2 x model = 2 mesh, adding the "data+model" layout)
N_TOKENS, D_MODEL, D_OUT = 16, 8, 6
COUNTS = {1: 6, 2: 4, 4: 2}
TOL = 1e-10

#: case name -> MOLTConfig overrides
CASES: dict[str, dict] = {
    "relu": {"act_fn": "relu"},
    "jumprelu": {"act_fn": "jumprelu", "jumprelu_init_threshold": 0.5, "jumprelu_bandwidth": 2.0},
    "jumprelu-gated-no-bias": {"act_fn": "jumprelu", "jumprelu_init_threshold": 0.5, "jumprelu_bandwidth": 2.0,
                               "decoder_norm_gating": True, "use_decoder_bias": False},
    "topk": {"act_fn": "topk", "top_k": 3},
    "topk-gated": {"act_fn": "topk", "top_k": 3, "decoder_norm_gating": True},
    "batchtopk": {"act_fn": "batchtopk", "top_k": 3},
    "batchtopk-gated-no-bias": {"act_fn": "batchtopk", "top_k": 2, "decoder_norm_gating": True,
                                "use_decoder_bias": False},
}


def make_config(**overrides) -> MOLTConfig:
    base = dict(hook_point_in="blocks.0.ln2.hook_normalized", hook_point_out="blocks.0.hook_mlp_out",
                d_model=D_MODEL, d_out=D_OUT, rank_counts=COUNTS, normalization="none")
    return MOLTConfig(**{**base, **overrides})


def make_model(config: MOLTConfig, seed: int = 0) -> MixtureOfLinearTransforms:
    g = torch.Generator().manual_seed(seed)
    model = MixtureOfLinearTransforms(config)
    model.reset_parameters(g)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_batch(model: MixtureOfLinearTransforms, seed: int = 1):
    """``(x, extras, mask, label)``; masked tokens in both data halves (different counts)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TOKENS, D_MODEL, generator=g, dtype=torch.float64) * 2.0 + 0.3
    label = torch.randn(N_TOKENS, D_OUT, generator=g, dtype=torch.float64)
    mask = torch.ones(N_TOKENS, dtype=torch.bool)
    mask[[1, 2, 12]] = False
    return x, {"original_x": x}, mask, label


def feature_dim(config: MOLTConfig, ndim: int) -> GroupedDim:
    """Dim of the gates ``(tokens, F)`` that the model axis splits: per rank group."""
    return GroupedDim(ndim - 1, config.counts)


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


def test_shard_config_divides_every_rank_group():
    cfg = make_config(act_fn="jumprelu")
    shard = SPEC.shard_config(cfg, {"model": 2})
    assert shard.rank_groups == ((1, 3), (2, 2), (4, 1))
    assert SPEC.shard_config(cfg, {"model": 1}) == cfg
    from lmsae.distributed.sharding import local_feature_indices, shard_state

    full = make_model(cfg)
    state = shard_state(full.state_dict(), SPEC.sharding_rules(cfg), {"model": (1, 2)},
                        parameters={n for n, _ in full.named_parameters()})
    model = MixtureOfLinearTransforms(shard).double()
    model.load_state_dict(state)
    # the shard's gates and decoder norms are the full model's at its features' global indices
    idx = local_feature_indices(cfg.counts, 2, 1)
    x, extras, _, _ = make_batch(full)
    torch.testing.assert_close(model.encode_pre(x), full.encode_pre(x)[:, idx], rtol=0, atol=1e-12)
    torch.testing.assert_close(model.decoder_norm(), full.decoder_norm()[idx], rtol=0, atol=1e-12)


def test_shard_config_errors():
    cfg = make_config()
    with pytest.raises(ShardingError, match=r"rank_counts .*\[distributed\] model = 4.*rank 1: 6"):
        SPEC.shard_config(cfg, {"model": 4})
    with pytest.raises(ShardingError, match="'head'"):
        SPEC.shard_config(cfg, {"model": 2, "head": 2})


@pytest.mark.parametrize("bias", [True, False])
def test_decode_linear_is_decode_without_bias(bias):
    model = make_model(make_config(act_fn="topk", top_k=3, use_decoder_bias=bias))
    x, extras, mask, _ = make_batch(model)
    acts = model.encode(x, mask=mask, **extras)
    want = model.decode(acts, **extras) - (model.b_D if bias else 0.0)
    torch.testing.assert_close(model.decode_linear(acts, **extras), want, rtol=0, atol=1e-12)
    with torch.no_grad():  # the restricted (active transforms only) path
        torch.testing.assert_close(model.decode_linear(acts, **extras), want, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [{"model": 2}, {"data": 2}], ids=["model2", "data2"])
def test_training_on_a_mesh_matches_one_process(tmp_path, sizes):
    from lmsae.testing.distributed import check_parallel_training

    check_parallel_training("molt", SPEC.example_config(), sizes, tmp_path)


if __name__ == "__main__":
    CHECK.worker(sys.argv[1])
