"""Sharding by the rules keeps every feature's gate column, U and V together (the canonical order).

Each shard's local state is itself a MOLT (every count divided by k, same ranks): running it on the
same input must give exactly the global model's activations of the features it holds, and the sum
of the shards' transform outputs must give the global prediction. The reference's layout (W_E cut
into contiguous blocks of F while U/V are cut per rank group) breaks both.
"""

from __future__ import annotations

import copy
import itertools
import json

import attrs
import pytest
import torch

from lmsae.errors import ShardingError
from lmsae.registry import load_registry

from lmsae_molt.config import MOLTConfig
from lmsae_molt.model import MixtureOfLinearTransforms
from lmsae_molt.sharding import (
    GroupedDim,
    local_feature_indices,
    shard_parameters,
    shard_tensor,
    unshard,
)

IN, OUT = "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"
COUNTS = {1: 8, 2: 4, 4: 12}


@pytest.fixture(scope="module")
def spec():
    return load_registry(strict=True).architecture("molt")


def make_model(act_fn="relu", gating=False, seed=0, **kw) -> MixtureOfLinearTransforms:
    cfg = MOLTConfig(hook_point_in=IN, hook_point_out=OUT, d_model=8, d_out=6, rank_counts=kw.pop("counts", COUNTS),
                     act_fn=act_fn, decoder_norm_gating=gating, normalization="none", jumprelu_init_threshold=0.3,
                     jumprelu_bandwidth=1.0, **kw)
    model = MixtureOfLinearTransforms(cfg)
    g = torch.Generator().manual_seed(seed)
    model.reset_parameters(g)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def shard_model(model: MixtureOfLinearTransforms, local_state: dict[str, torch.Tensor], k: int):
    """The MOLT a shard's local state describes: the same ranks, every count divided by k."""
    cfg = attrs.evolve(model.config, rank_counts={r: c // k for r, c in model.config.rank_groups})
    local = MixtureOfLinearTransforms(cfg).double()
    local.load_state_dict(local_state)
    return local


def x_batch(n=10, seed=1):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_rules_are_group_aware_where_a_tensor_spans_every_feature(spec):
    cfg = make_model(act_fn="jumprelu").config
    rules = spec.sharding_rules(cfg)
    assert rules["W_E"]["model"] == 1 and rules["W_E"]["model"].group_sizes == (8, 4, 12)
    assert rules["b_E"]["model"] == 0 and rules["b_E"]["model"].group_sizes == (8, 4, 12)
    assert rules["activation.log_threshold"]["model"].group_sizes == (8, 4, 12)
    for r in (1, 2, 4):
        assert rules[f"U.{r}"] == {"model": 0} and rules[f"V.{r}"] == {"model": 0}
    assert rules["b_D"] == {}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_shard_then_unshard_is_the_identity(spec, k):
    model = make_model(act_fn="jumprelu")
    state = model.state_dict()
    rules = spec.sharding_rules(model.config)
    shards = [shard_parameters(state, rules, k, i) for i in range(k)]
    for s in shards:
        assert s["W_E"].shape == (8, 24 // k) and s["U.4"].shape == (12 // k, 6, 4)
    full = unshard(shards, rules)
    assert full.keys() == state.keys()
    for name in state:
        assert torch.equal(full[name], state[name]), name


@pytest.mark.parametrize("act_fn, gating", list(itertools.product(("relu", "jumprelu"), (False, True))))
@pytest.mark.parametrize("k", [2, 4])
def test_every_shard_holds_whole_features_in_canonical_order(spec, act_fn, gating, k):
    model = make_model(act_fn=act_fn, gating=gating)
    rules = spec.sharding_rules(model.config)
    x = x_batch()
    with torch.no_grad():
        acts = model.encode(x)
        transforms_only = model.decode(acts, original_x=x) - model.b_D
        total = torch.zeros_like(transforms_only)
        for i in range(k):
            local = shard_model(model, shard_parameters(model.state_dict(), rules, k, i), k)
            index = local_feature_indices(model.config.counts, k, i)
            # same features: the local gates (and norms, for gating) are the global ones of `index`
            torch.testing.assert_close(local.encode(x), acts[:, index], rtol=0, atol=0)
            torch.testing.assert_close(local.decoder_norm(), model.decoder_norm()[index], rtol=1e-12, atol=0)
            for j, g in enumerate(index.tolist()):
                u_l, v_l = local.transform(j)
                u_g, v_g = model.transform(g)
                assert torch.equal(u_l, u_g) and torch.equal(v_l, v_g)
                assert torch.equal(local.W_E[:, j], model.W_E[:, g])
            total += local.decode(local.encode(x), original_x=x) - local.b_D
    # b_D is replicated and added once after the sum over shards
    torch.testing.assert_close(total, transforms_only, rtol=1e-12, atol=1e-12)


def test_local_feature_indices_are_block_i_of_every_rank_group():
    assert local_feature_indices((8, 4, 12), 2, 0).tolist() == [0, 1, 2, 3, 8, 9, 12, 13, 14, 15, 16, 17]
    assert local_feature_indices((8, 4, 12), 2, 1).tolist() == [4, 5, 6, 7, 10, 11, 18, 19, 20, 21, 22, 23]
    both = torch.cat([local_feature_indices((8, 4, 12), 4, i) for i in range(4)])
    assert sorted(both.tolist()) == list(range(24))


def test_the_reference_layout_pairs_gates_with_other_features_transforms(spec):
    """W_E cut contiguously over F (the reference), U/V per rank group: features come apart."""
    k = 2
    model = make_model()
    state = model.state_dict()
    rules = spec.sharding_rules(model.config)
    plain = {name: {axis: int(dim) for axis, dim in rule.items()} for name, rule in rules.items()}
    x = x_batch()
    with torch.no_grad():
        acts = model.encode(x)
        expected = model.decode(acts, original_x=x) - model.b_D
        total = torch.zeros_like(expected)
        for i in range(k):
            local_state = shard_parameters(state, plain, k, i)  # W_E, b_E: contiguous halves of F
            local = shard_model(model, local_state, k)
            index = local_feature_indices(model.config.counts, k, i)
            assert not torch.equal(local.W_E, model.W_E[:, index])  # gate columns of other features
            total += local.decode(local.encode(x), original_x=x) - local.b_D
    assert not torch.allclose(total, expected, atol=1e-3)

    # and gathering device-local gates by plain concatenation (what the reference saved) is the
    # device-interleaved order, not the canonical one, even when every shard was right
    shards = [shard_parameters(state, rules, k, i) for i in range(k)]
    interleaved = torch.cat([s["W_E"] for s in shards], dim=1)
    assert not torch.equal(interleaved, state["W_E"])
    assert torch.equal(unshard(shards, rules)["W_E"], state["W_E"])


def test_one_rank_group_is_the_plain_contiguous_split(spec):
    model = make_model(counts={2: 8})
    rules = spec.sharding_rules(model.config)
    state = model.state_dict()
    for i in range(4):
        assert torch.equal(shard_parameters(state, rules, 4, i)["W_E"], state["W_E"][:, 2 * i: 2 * i + 2])


def test_sharding_errors_name_the_problem(spec):
    model = make_model()
    rules = spec.sharding_rules(model.config)
    with pytest.raises(ShardingError, match="W_E: group 1 has 4 features, which does not divide into 8 shards"):
        shard_parameters(model.state_dict(), rules, 8, 0)
    with pytest.raises(ShardingError, match="no sharding rule"):
        shard_parameters({"mystery": torch.zeros(2)}, rules, 2, 0)
    with pytest.raises(ShardingError, match="shard index"):
        shard_tensor(torch.zeros(4), 0, 2, 2)
    with pytest.raises(ShardingError, match="groups sum to"):
        shard_tensor(torch.zeros(5), GroupedDim(0, (2, 2)), 2, 0)
    shards = [shard_parameters(model.state_dict(), rules, 2, i) for i in range(2)]
    shards[1]["b_D"] = shards[1]["b_D"] + 1
    with pytest.raises(ShardingError, match="b_D: a replicated parameter differs"):
        unshard(shards, rules)


def test_grouped_dim_is_the_plain_dim_for_every_other_reader():
    dim = GroupedDim(1, (8, 4))
    assert dim == 1 and isinstance(dim, int) and hash(dim) == hash(1)
    assert json.dumps({"W_E": {"model": dim}}) == '{"W_E": {"model": 1}}'
    twin = copy.deepcopy(dim)
    assert twin == 1 and twin.group_sizes == (8, 4)
    assert torch.zeros(3, 12).shape[dim] == 12
    with pytest.raises(ShardingError):
        GroupedDim(0, ())
