"""MOLT maths against naive per-feature references (explicit loops over transforms)."""

from __future__ import annotations

import itertools
import math

import attrs
import pytest
import torch

from lmsae.errors import DataError, LmsaeError, ShapeError
from lmsae.nn.activations import JumpReLU

from lmsae_molt.analysis import molt_analysis_extras
from lmsae_molt.config import MOLTConfig
from lmsae_molt.model import MixtureOfLinearTransforms

IN, OUT = "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"
ACT_FNS = ("relu", "jumprelu", "topk", "batchtopk")


def make_config(**kw) -> MOLTConfig:
    base = {"hook_point_in": IN, "hook_point_out": OUT, "d_model": 7, "d_out": 5, "rank_counts": {1: 4, 2: 3, 4: 2},
            "act_fn": "relu", "top_k": 3, "normalization": "none", "jumprelu_init_threshold": 0.5,
            "jumprelu_bandwidth": 1.0}
    base.update(kw)
    return MOLTConfig(**base)


def make_model(config: MOLTConfig | None = None, seed: int = 0, **kw) -> MixtureOfLinearTransforms:
    """float64, every parameter (biases, thresholds) randomised."""
    model = MixtureOfLinearTransforms(config if config is not None else make_config(**kw))
    g = torch.Generator().manual_seed(seed)
    model.reset_parameters(generator=g)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def naive_transforms(model: MixtureOfLinearTransforms) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``[(rank, U_i, V_i)]`` in the canonical order: ranks ascending, index within the rank."""
    out = []
    for r in sorted(int(k) for k in model.U):
        for j in range(model.U[str(r)].shape[0]):
            out.append((r, model.U[str(r)][j], model.V[str(r)][j]))
    return out


def naive_decode(model, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_i f_i U_i V_i x + b_D`` token by token, feature by feature."""
    flat_f, flat_x = f.reshape(-1, f.shape[-1]), x.reshape(-1, x.shape[-1])
    rows = []
    for t in range(flat_f.shape[0]):
        y = model.b_D.clone() if model.b_D is not None else torch.zeros(model.config.output_width, dtype=f.dtype)
        for i, (_, u, v) in enumerate(naive_transforms(model)):
            y = y + flat_f[t, i] * (u @ v @ flat_x[t])
        rows.append(y)
    return torch.stack(rows).reshape(*f.shape[:-1], -1)


def naive_norms(model) -> torch.Tensor:
    return torch.stack([torch.linalg.matrix_norm(u @ v) for _, u, v in naive_transforms(model)])


def inputs(model, n=6, context=None, seed=1, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if context is None else (n, context)
    return torch.randn(*lead, model.config.d_model, generator=g, dtype=torch.float64) * scale + 0.2


# --- decode and norms -------------------------------------------------------------------------------


@pytest.mark.parametrize("context", [None, 3])
def test_decode_matches_the_naive_per_feature_loop(context):
    model = make_model()
    x = inputs(model, context=context)
    g = torch.Generator().manual_seed(5)
    f = torch.relu(torch.randn(*x.shape[:-1], model.n_features, generator=g, dtype=torch.float64))
    f[..., 1] = 0.0  # an inactive feature
    expected = naive_decode(model, f, x)
    torch.testing.assert_close(model.decode(f, original_x=x), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the inference path restricts every group to its active features
        torch.testing.assert_close(model.decode(f, original_x=x), expected, rtol=1e-12, atol=1e-12)


def test_inference_decode_skips_inactive_features_exactly():
    model = make_model(rank_counts={1: 5, 3: 4})
    x = inputs(model)
    f = torch.zeros(x.shape[0], model.n_features, dtype=torch.float64)
    f[0, 2] = 1.5  # only one rank-1 feature fires; the rank-3 group is skipped entirely
    with torch.no_grad():
        out = model.decode(f, original_x=x)
    torch.testing.assert_close(out, naive_decode(model, f, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1:], model.b_D.detach().expand(x.shape[0] - 1, -1))


def test_forward_is_gate_then_transforms_of_the_original_input():
    for act_fn, gating in itertools.product(ACT_FNS, (False, True)):
        model = make_model(act_fn=act_fn, decoder_norm_gating=gating)
        x = inputs(model)
        h = x @ model.W_E + model.b_E
        norms = naive_norms(model)
        if gating:
            f = model.activation(h * norms) / norms
        else:
            f = model.activation(h)
        x_in, extras = model.prepare_input({IN: x, OUT: torch.zeros(x.shape[0], 5, dtype=x.dtype)})
        assert set(extras) == {"original_x"} and extras["original_x"] is x_in
        torch.testing.assert_close(model.forward(x_in, **extras), naive_decode(model, f, x), rtol=1e-10, atol=1e-10)


def test_decode_without_the_original_input_is_a_clear_error():
    model = make_model()
    f = torch.zeros(2, model.n_features, dtype=torch.float64)
    with pytest.raises(DataError, match="original input"):
        model.decode(f)
    with pytest.raises(ShapeError, match="token axes"):
        model.decode(f, original_x=torch.zeros(3, 7, dtype=torch.float64))


def test_decoder_norm_is_the_frobenius_norm_of_each_product_and_differentiable():
    model = make_model(rank_counts={1: 3, 2: 2, 5: 2})
    torch.testing.assert_close(model.decoder_norm(), naive_norms(model), rtol=1e-12, atol=1e-12)
    weights = torch.randn(model.n_features, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((model.decoder_norm() * weights).sum(), list(model.parameters()), allow_unused=True)
    naive_grads = torch.autograd.grad((naive_norms(model) * weights).sum(), list(model.parameters()),
                                      allow_unused=True)
    for a, b in zip(grads, naive_grads, strict=True):
        if b is None:
            assert a is None or not bool(a.abs().sum() > 0)
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _LargestResult(torch.overrides.TorchFunctionMode):
    """Records the largest tensor any torch operation returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_decoder_norm_never_builds_a_d_by_d_matrix_per_feature():
    # 16 transforms of rank 2 on a 1024-wide model: U_i V_i would be 16 x 1024 x 1024 numbers
    cfg = make_config(d_model=1024, d_out=1024, rank_counts={2: 16})
    model = MixtureOfLinearTransforms(cfg).double()
    with _LargestResult() as probe:
        norms = model.decoder_norm()
    # nothing bigger than the parameters themselves (views of U and V); a product U_i V_i would be 512x larger
    assert probe.largest <= 16 * 1024 * 2, probe.largest
    torch.testing.assert_close(norms, torch.ones(16, dtype=torch.float64), rtol=1e-6, atol=0)  # init: ||UV|| = 1
    u, v = model.transform(7)
    torch.testing.assert_close(norms[7], torch.linalg.matrix_norm(u @ v), rtol=1e-12, atol=0)


def test_features_are_in_ascending_rank_order_whatever_the_config_order():
    cfg = make_config(rank_counts={"4": 2, "1": 4, "2": 3})
    assert list(cfg.rank_counts) == ["1", "2", "4"]
    model = make_model(cfg)
    assert model.feature_ranks().tolist() == [1] * 4 + [2] * 3 + [4] * 2
    assert [n for n, _ in model.named_parameters() if n[0] in "UV"] == ["U.1", "U.2", "U.4", "V.1", "V.2", "V.4"]
    u, v = model.transform(5)  # second feature of the rank-2 group
    assert u is not None and torch.equal(u, model.U["2"][1]) and torch.equal(v, model.V["2"][1])


# --- folding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_fn, gating", list(itertools.product(ACT_FNS, (False, True))))
def test_folding_is_exact_with_different_input_and_output_scales(act_fn, gating):
    s_in, s_out = 7.3, 0.21
    model = make_model(act_fn=act_fn, decoder_norm_gating=gating)
    x = inputs(model, n=12, scale=0.5)
    with torch.no_grad():
        acts_before = model.encode(x * s_in)
        reference = model.decode(acts_before, original_x=x * s_in) / s_out
        model.fold_scales({IN: s_in}, {OUT: s_out})
        acts_after = model.encode(x)
        folded = model.decode(acts_after, original_x=x)
    torch.testing.assert_close(folded, reference, rtol=1e-11, atol=1e-11)
    # the gates themselves are unchanged, not merely the same set of features
    torch.testing.assert_close(acts_after, acts_before, rtol=1e-11, atol=1e-12)


def test_the_reference_fold_is_off_by_the_input_scale():
    # the reference: b_E /= s_in, U and V *= sqrt(s_in / s_out) each, b_D /= s_out (gates divided by s_in)
    s_in, s_out = 4.0, 0.5
    model = make_model(act_fn="relu")
    x = inputs(model)
    with torch.no_grad():
        reference = model.decode(model.encode(x * s_in), original_x=x * s_in) / s_out
        model.b_E.div_(s_in)
        for r in model.config.ranks:
            model.U[str(r)].mul_(math.sqrt(s_in / s_out))
            model.V[str(r)].mul_(math.sqrt(s_in / s_out))
        model.b_D.div_(s_out)
        wrong = model.decode(model.encode(x), original_x=x)
    b_d = model.b_D.detach()
    # every transform's contribution comes out s_in times too small
    torch.testing.assert_close((wrong - b_d) * s_in, reference - b_d, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(wrong, reference)


def test_folded_jumprelu_threshold_follows_the_gated_norm():
    model = make_model(act_fn="jumprelu", decoder_norm_gating=True)
    theta = model.activation.threshold.detach().clone()
    model.fold_scales({IN: 3.0}, {OUT: 0.5})
    torch.testing.assert_close(model.activation.threshold.detach(), theta * 6.0)
    model = make_model(act_fn="jumprelu", decoder_norm_gating=False)
    theta = model.activation.threshold.detach().clone()
    model.fold_scales({IN: 3.0}, {OUT: 0.5})
    torch.testing.assert_close(model.activation.threshold.detach(), theta)


# --- singular structure, decoder directions, analysis extras ------------------------------------------------


def test_singular_values_and_vectors_match_a_full_svd():
    model = make_model(rank_counts={1: 3, 2: 2, 4: 2})
    top = model.singular()
    for i, (r, u, v) in enumerate(naive_transforms(model)):
        m = (u @ v).detach()
        uu, ss, vh = torch.linalg.svd(m)
        torch.testing.assert_close(top.values[i, :r], ss[:r], rtol=1e-10, atol=1e-12)
        assert bool((top.values[i, r:] == 0).all())
        # same rank-1 term sigma_1 u_1 v_1^T (the pair's joint sign is arbitrary)
        torch.testing.assert_close(ss[0] * torch.outer(top.u[i], top.v[i]), ss[0] * torch.outer(uu[:, 0], vh[0]),
                                   rtol=1e-9, atol=1e-10)


def test_decoder_directions_are_the_gate_oriented_top_singular_writes_in_raw_units():
    cfg = make_config(normalization="dataset", dataset_norms={IN: 2.0, OUT: 5.0})
    model = make_model(cfg)
    (hook, dirs), = model.decoder_directions().items()
    assert hook == OUT and dirs.shape == (model.n_features, 5)
    factor = (math.sqrt(7) / 2.0) / (math.sqrt(5) / 5.0)  # s_in / s_out: the raw map is (s_in/s_out) U V
    for i, (_, u, v) in enumerate(naive_transforms(model)):
        uu, ss, vh = torch.linalg.svd((u @ v).detach())
        sign = 1.0 if float(vh[0] @ model.W_E[:, i].detach()) >= 0 else -1.0
        torch.testing.assert_close(dirs[i], sign * ss[0] * uu[:, 0] * factor, rtol=1e-9, atol=1e-10)
    # folding leaves the raw-space directions unchanged
    model.fold_normalization()
    torch.testing.assert_close(model.decoder_directions()[OUT], dirs, rtol=1e-9, atol=1e-10)


def test_analysis_extras_describe_each_transform():
    model = make_model(rank_counts={1: 3, 3: 2})
    extras = molt_analysis_extras(model, [4, 0, 3])
    assert extras["rank"].tolist() == [3, 1, 3]
    norms = naive_norms(model).detach()
    torch.testing.assert_close(torch.as_tensor(extras["frobenius_norm"]), norms[[4, 0, 3]], rtol=1e-10, atol=0)
    for row, i in enumerate([4, 0, 3]):
        u, v = model.transform(i)
        s = torch.linalg.svdvals((u @ v).detach())
        assert extras["top_singular_value"][row] == pytest.approx(float(s[0]), rel=1e-10)
        assert extras["stable_rank"][row] == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-10)
    assert extras["stable_rank"][1] == pytest.approx(1.0)  # a rank-1 map
    with pytest.raises(IndexError):
        molt_analysis_extras(model, [5])


# --- metrics ------------------------------------------------------------------------------------------------


def test_training_metrics_per_rank_group_with_a_mask():
    model = make_model(rank_counts={1: 4, 2: 3, 4: 2})
    acts = torch.zeros(2, 3, 9, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    acts[0, 0, [0, 1, 4, 7]] = 1.0  # rank1: 2, rank2: 1, rank4: 1
    acts[0, 1, [5, 6]] = 2.0  # rank2: 2
    acts[1, 0, [3]] = 0.5  # rank1: 1
    acts[0, 2, :] = 9.0  # masked out
    m = model.training_metrics({"acts": acts, "feature_axes": ("batch", "context", "sae"), "mask": mask})
    assert m["metrics/l0/rank1"] == pytest.approx(3 / 3)
    assert m["metrics/l0/rank2"] == pytest.approx(3 / 3)
    assert m["metrics/l0/rank4"] == pytest.approx(1 / 3)
    total = 7 / 3
    assert m["metrics/l0_ratio/rank1"] == pytest.approx(1 / total)
    assert m["metrics/l0_ratio/rank4"] == pytest.approx((1 / 3) / total)
    assert m["metrics/rank_used"] == pytest.approx((1 * 3 + 2 * 3 + 4 * 1) / 3)
    # nothing fires: ratios are 0, not NaN; every token masked: no metrics, no crash
    zero = model.training_metrics({"acts": torch.zeros(4, 9), "feature_axes": ("batch", "sae"), "mask": None})
    assert zero["metrics/l0_ratio/rank2"] == 0.0 and zero["metrics/rank_used"] == 0.0
    assert model.training_metrics({"acts": acts, "feature_axes": ("batch", "context", "sae"),
                                   "mask": torch.zeros(2, 3, dtype=torch.bool)}) == {}


# --- initialisation capabilities -------------------------------------------------------------------------------


def test_reset_gives_unit_frobenius_norms_unit_gates_and_is_seeded():
    a = MixtureOfLinearTransforms(make_config(act_fn="jumprelu", jumprelu_init_threshold=0.25))
    a.reset_parameters(torch.Generator().manual_seed(3))
    b = MixtureOfLinearTransforms(make_config(act_fn="jumprelu", jumprelu_init_threshold=0.25))
    b.reset_parameters(torch.Generator().manual_seed(3))
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    torch.testing.assert_close(a.decoder_norm(), torch.ones(9), rtol=1e-5, atol=0)
    torch.testing.assert_close(a.W_E.norm(dim=0), torch.ones(9), rtol=1e-5, atol=0)
    assert isinstance(a.activation, JumpReLU)
    torch.testing.assert_close(a.activation.threshold, torch.full((9,), 0.25))
    assert not a.b_E.any() and not a.b_D.any()


def test_set_decoder_norm_is_exact_and_keeps_each_map_direction():
    model = make_model()
    before = [(u @ v).detach() for _, u, v in naive_transforms(model)]
    model.set_decoder_norm(2.5)
    torch.testing.assert_close(naive_norms(model).detach(), torch.full((9,), 2.5, dtype=torch.float64))
    for m0, (_, u, v) in zip(before, naive_transforms(model), strict=True):
        torch.testing.assert_close((u @ v).detach(), m0 * (2.5 / torch.linalg.matrix_norm(m0)))
    with pytest.raises(LmsaeError):
        model.set_decoder_norm(0.0)


def test_encoder_from_decoder_points_gates_at_the_top_input_direction():
    model = make_model()
    model.init_encoder_from_decoder(2.0)
    norms = naive_norms(model).detach()
    torch.testing.assert_close(model.W_E.norm(dim=0).detach(), 2.0 * norms)
    for i, (_, u, v) in enumerate(naive_transforms(model)):
        _, _, vh = torch.linalg.svd((u @ v).detach())
        cos = float(model.W_E[:, i].detach() @ vh[0]) / float(model.W_E[:, i].detach().norm())
        assert abs(cos) == pytest.approx(1.0, abs=1e-9)


def test_encoder_bias_and_decoder_bias_inits():
    model = make_model()
    x = inputs(model, n=10)
    mask = torch.ones(10, dtype=torch.bool)
    mask[-3:] = False
    x[-3:] = 1e6  # masked garbage must not count
    model.init_encoder_bias_from_mean_pre(x, mask=mask)
    torch.testing.assert_close(model.encode_pre(x)[:7].mean(0).detach(), torch.zeros(9, dtype=torch.float64),
                               rtol=0, atol=1e-10)
    mean = torch.arange(5, dtype=torch.float64)
    model.init_decoder_bias(mean)
    assert torch.equal(model.b_D.detach(), mean)
    with pytest.raises(ShapeError):
        model.init_decoder_bias(torch.zeros(7, dtype=torch.float64))
    no_bias = make_model(use_decoder_bias=False)
    with pytest.raises(LmsaeError, match="use_decoder_bias"):
        no_bias.init_decoder_bias(mean)


def test_active_subspace_puts_every_output_in_the_labels_subspace():
    model = make_model(d_out=6)
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))[0]  # (6, 2)
    label = torch.randn(50, 2, generator=g, dtype=torch.float64) @ basis.T + 3.0
    norms = naive_norms(model).detach()
    model.init_active_subspace(label, 2)
    projector = basis @ basis.T
    for _, u, _ in naive_transforms(model):
        torch.testing.assert_close(projector @ u.detach(), u.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(naive_norms(model).detach(), norms)  # norms kept
    with pytest.raises(LmsaeError, match="active subspace"):
        model.init_active_subspace(label, 0)


def test_training_init_through_the_core_initializer():
    from lmsae.training.initializer import InitializerConfig, initialize

    cfg = make_config(normalization="none")
    model = MixtureOfLinearTransforms(cfg).double()
    x = inputs(model, n=32)
    batch = {IN: x, OUT: x[:, :5] * 2 + 1, "mask": torch.ones(32, dtype=torch.bool)}
    report = initialize(model, InitializerConfig(decoder_bias="mean", grid_search_decoder_norm=True,
                                                 encoder_bias_from_mean_pre=True), batch)
    assert math.isfinite(report["loss"]) and report["grid_search_best_norm"] > 0
    torch.testing.assert_close(model.decoder_norm().detach(),
                               torch.full((9,), report["grid_search_best_norm"], dtype=torch.float64))


def test_attrs_evolve_keeps_canonical_rank_counts():
    cfg = make_config()
    assert attrs.evolve(cfg, rank_counts={4: 2, 1: 4, 2: 3}) == cfg
