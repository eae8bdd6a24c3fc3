"""Layer-wise TopK activations against naive references (explicit loops and sorting)."""

from __future__ import annotations

import pytest
import torch

from lmsae.errors import ShapeError
from lmsae.nn.activations import JumpReLU, ReLU, TopK
from lmsae_clt.activations import BatchLayerTopK, BatchTopKPerLayer, LayerTopK, build_clt_activation
from lmsae_clt.config import ACT_FNS, CLTConfig


def keep_largest(values: dict, k: int) -> set:
    """Keys of the k largest strictly positive values (ties impossible with random floats)."""
    ranked = sorted(((v, key) for key, v in values.items() if v > 0), reverse=True)
    return {key for _, key in ranked[:k]}


def naive(h: torch.Tensor, groups, k_of) -> torch.Tensor:
    """Zero everything except, in each group of (token, layer, feature) entries, the k_of(group) largest."""
    out = torch.zeros_like(h)
    for group in groups:
        values = {idx: float(h[idx]) for idx in group}
        for idx in keep_largest(values, k_of(group)):
            out[idx] = h[idx]
    return out


N, L, F = 7, 3, 5


@pytest.fixture
def h():
    return torch.randn(N, L, F, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_per_layer_topk_is_per_token_per_layer(h):
    groups = [[(t, i, f) for f in range(F)] for t in range(N) for i in range(L)]
    torch.testing.assert_close(TopK(2)(h), naive(h, groups, lambda g: 2))


def test_layertopk_is_per_token_across_layers(h):
    groups = [[(t, i, f) for i in range(L) for f in range(F)] for t in range(N)]
    out = LayerTopK(4)(h)
    torch.testing.assert_close(out, naive(h, groups, lambda g: 4))
    assert int((out > 0).sum(dim=(1, 2)).max()) <= 4


def test_batchtopk_per_layer_is_over_the_batch_in_each_layer(h):
    groups = [[(t, i, f) for t in range(N) for f in range(F)] for i in range(L)]
    out = BatchTopKPerLayer(2)(h)
    torch.testing.assert_close(out, naive(h, groups, lambda g: 2 * N))
    assert all(int((out[:, i] > 0).sum()) <= 2 * N for i in range(L))


def test_batchlayertopk_is_over_batch_layers_and_features(h):
    groups = [[(t, i, f) for t in range(N) for i in range(L) for f in range(F)]]
    out = BatchLayerTopK(3)(h)
    torch.testing.assert_close(out, naive(h, groups, lambda g: 3 * N))
    assert int((out > 0).sum()) <= 3 * N


@pytest.mark.parametrize("module", [BatchTopKPerLayer, BatchLayerTopK])
def test_batch_variants_exclude_masked_tokens(h, module):
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    out = module(2)(h, mask=mask)
    assert torch.all(out[~mask] == 0)
    n = int(mask.sum())
    torch.testing.assert_close(out[mask], module(2)(h[mask]))
    assert int((out > 0).sum()) <= 2 * n * (L if module is BatchTopKPerLayer else 1)


@pytest.mark.parametrize("module", [LayerTopK, BatchTopKPerLayer, BatchLayerTopK])
def test_two_token_axes_and_gradients_flow_only_to_kept_entries(module):
    h = torch.randn(2, 4, L, F, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    out = module(2)(h, mask=torch.ones(2, 4, dtype=torch.bool))
    flat = module(2)(h.detach().reshape(8, L, F))
    torch.testing.assert_close(out.detach().reshape(8, L, F), flat)
    out.sum().backward()
    assert torch.equal(h.grad != 0, out.detach() != 0)


@pytest.mark.parametrize("module", [LayerTopK, BatchTopKPerLayer, BatchLayerTopK])
def test_k_is_validated_schedulable_and_capped(h, module):
    act = module(1)
    act.k = 1000  # more than there are entries: every positive entry is kept
    torch.testing.assert_close(act(h), torch.relu(h))
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            act.k = bad


@pytest.mark.parametrize("module", [LayerTopK, BatchTopKPerLayer, BatchLayerTopK])
def test_shape_errors(module):
    with pytest.raises(ShapeError, match="layers, features"):
        module(1)(torch.randn(4, 5))
    with pytest.raises(ShapeError, match="token mask"):
        module(1)(torch.randn(4, L, F), mask=torch.ones(3, dtype=torch.bool))


def test_batch_variants_with_every_token_masked_return_zeros(h):
    mask = torch.zeros(N, dtype=torch.bool)
    assert torch.all(BatchTopKPerLayer(2)(h, mask=mask) == 0)
    assert torch.all(BatchLayerTopK(2)(h, mask=mask) == 0)


def test_build_clt_activation_maps_every_act_fn():
    expected = {"relu": ReLU, "jumprelu": JumpReLU, "topk": TopK, "layertopk": LayerTopK,
                "batchtopk": BatchTopKPerLayer, "batchlayertopk": BatchLayerTopK}
    for act in ACT_FNS:
        cfg = CLTConfig(hook_points_in=["a", "b"], hook_points_out=["c", "d"], d_model=4, d_sae=6, act_fn=act, top_k=3)
        module = build_clt_activation(cfg)
        assert type(module) is expected[act]
        if hasattr(module, "k"):
            assert module.k == 3
    jump = build_clt_activation(CLTConfig(hook_points_in=["a", "b"], hook_points_out=["c", "d"], d_model=4, d_sae=6,
                                          act_fn="jumprelu"))
    assert tuple(jump.log_threshold.shape) == (2, 6)
