"""The crosscoder's maths against naive references written as explicit loops over heads and tokens."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

from lmsae.config.fields import FieldValueError
from lmsae.errors import DataError, ShapeError
from lmsae.nn.losses import jumprelu_preact_loss, reconstruction_loss, sparsity_penalty
from lmsae.training.initializer import InitializerConfig, initialize
from lmsae.training.trainer import StandardTrainerConfig, Trainer

from lmsae_crosscoder.analysis import (
    PARTIAL,
    SHARED,
    classify_features,
    crosscoder_analysis_extras,
    head_distribution,
)
from lmsae_crosscoder.config import CrosscoderConfig
from lmsae_crosscoder.model import Crosscoder

HOOKS = ["blocks.2.hook_resid_post", "blocks.3.hook_resid_post", "blocks.4.hook_resid_post"]


def make(act_fn: str = "relu", gating: bool = False, heads: int = 3, seed: int = 0, **kw) -> Crosscoder:
    kw.setdefault("normalization", "none")
    cfg = CrosscoderConfig(hook_points=HOOKS[:heads], d_model=5, d_sae=7, act_fn=act_fn, top_k=2,
                           decoder_norm_gating=gating, jumprelu_init_threshold=0.3, jumprelu_bandwidth=1.0, **kw)
    model = Crosscoder(cfg).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def batch_of(model: Crosscoder, lead: tuple[int, ...], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {h: torch.randn(*lead, model.config.d_model, generator=g, dtype=torch.float64) * 2 + 0.3
           for h in model.config.hook_points}
    out["mask"] = torch.ones(lead, dtype=torch.bool)
    return out


# --- naive references ------------------------------------------------------------------------------


@torch.no_grad()
def naive_pre(model: Crosscoder, xs: list[torch.Tensor]) -> torch.Tensor:
    """h[t, i] = sum_h sum_j x_h[t, j] W_E[h, j, i] + b_E[i], token by token."""
    n, f = xs[0].shape[0], model.n_features
    out = torch.zeros(n, f, dtype=torch.float64)
    for t in range(n):
        for i in range(f):
            total = float(model.b_E[i].detach())
            for h, x in enumerate(xs):
                total += float(x[t] @ model.W_E[h, :, i].detach())
            out[t, i] = total
    return out


@torch.no_grad()
@torch.no_grad()
def naive_decoder_norm(model: Crosscoder) -> torch.Tensor:
    g = model.head_norm_weight
    return torch.tensor([sum(float(g[h]) * float(model.W_D[h, i].norm()) for h in range(model.n_heads))
                         for i in range(model.n_features)], dtype=torch.float64)


@torch.no_grad()
def naive_activation(model: Crosscoder, pre: torch.Tensor) -> torch.Tensor:
    """relu / jumprelu / topk per token, with the decoder-norm gate written out."""
    cfg = model.config
    norm = naive_decoder_norm(model) if cfg.decoder_norm_gating else torch.ones(model.n_features, dtype=torch.float64)
    out = torch.zeros_like(pre)
    for t in range(pre.shape[0]):
        gated = [float(pre[t, i]) * float(norm[i]) for i in range(pre.shape[1])]
        if cfg.act_fn == "relu":
            kept = [max(v, 0.0) for v in gated]
        elif cfg.act_fn == "jumprelu":
            theta = model.activation.threshold.detach()
            kept = [v if v > float(theta[i]) else 0.0 for i, v in enumerate(gated)]
        elif cfg.act_fn == "topk":
            order = sorted(range(len(gated)), key=lambda i: -gated[i])[: cfg.top_k]
            kept = [max(gated[i], 0.0) if i in order else 0.0 for i in range(len(gated))]
        else:
            raise AssertionError(cfg.act_fn)
        for i, v in enumerate(kept):
            out[t, i] = v / float(norm[i])
    return out


@torch.no_grad()
def naive_decode(model: Crosscoder, acts: torch.Tensor) -> list[torch.Tensor]:
    """y_h[t] = sum_i f[t, i] W_D[h, i] + b_D[h], head by head."""
    outs = []
    for h in range(model.n_heads):
        y = torch.zeros(acts.shape[0], model.config.d_model, dtype=torch.float64)
        for t in range(acts.shape[0]):
            y[t] = model.b_D[h].detach()
            for i in range(acts.shape[1]):
                y[t] += float(acts[t, i]) * model.W_D[h, i].detach()
        outs.append(y)
    return outs


# --- forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("gating", [False, True])
def test_forward_matches_a_naive_per_head_loop(act_fn, gating):
    model = make(act_fn, gating)
    batch = batch_of(model, (6,))
    xs = [batch[h] for h in model.config.hook_points]
    x, _ = model.prepare_input(batch)
    assert x.shape == (6, 3, 5)
    with torch.no_grad():
        pre = model.encode_pre(x)
        acts = model.encode(x)
        recon = model.decode(acts)
    torch.testing.assert_close(pre, naive_pre(model, xs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acts, naive_activation(model, naive_pre(model, xs)), rtol=1e-12, atol=1e-12)
    for h, y in enumerate(naive_decode(model, acts)):
        torch.testing.assert_close(recon[:, h], y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.decoder_norm(), naive_decoder_norm(model), rtol=1e-12, atol=1e-12)
    split = model.split_output(recon)
    assert list(split) == model.config.hook_points
    for h, hook in enumerate(model.config.hook_points):
        assert torch.equal(split[hook], recon[:, h])


def test_shapes_with_sequences_and_named_axes():
    model = make("topk")
    batch = batch_of(model, (2, 4))
    x, _ = model.prepare_input(batch)
    assert x.shape == (2, 4, 3, 5)
    assert model.feature_axes(x) == ("batch", "context", "sae")
    assert model.output_axes(x) == ("batch", "context", "heads", "d_model")
    acts = model.encode(x, mask=batch["mask"])
    assert acts.shape == (2, 4, 7) and model.decode(acts).shape == (2, 4, 3, 5)


def test_heads_of_different_widths_or_missing_keys_are_clear_errors():
    model = make()
    batch = batch_of(model, (4,))
    with pytest.raises(DataError, match="blocks.3.hook_resid_post"):
        model.prepare_input({k: v for k, v in batch.items() if k != "blocks.3.hook_resid_post"})
    batch["blocks.4.hook_resid_post"] = torch.zeros(4, 6, dtype=torch.float64)
    with pytest.raises(DataError, match="one shape"):
        model.prepare_input(batch)
    with pytest.raises(DataError, match="width 6"):
        model.check_batch(batch)
    with pytest.raises(ShapeError, match="heads, d_model"):
        model.encode_pre(torch.zeros(4, 2, 5, dtype=torch.float64))


# --- losses through the core ---------------------------------------------------------------------


@torch.no_grad()
def test_core_losses_are_the_crosscoder_losses():
    """reconstruction = sum over heads of squared errors; the weighted L1 is Anthropic's
    sum_i f_i sum_h ||W_D[h, i]||; the JumpReLU pre-act loss uses the combined norm."""
    model = make("jumprelu", gating=True)
    with torch.no_grad():
        model.head_norm_weight.copy_(torch.tensor([1.0, 2.5, 0.5], dtype=torch.float64))
    batch = batch_of(model, (5,))
    x, _ = model.prepare_input(batch)
    label = model.prepare_label(batch)
    with torch.no_grad():
        pre = model.encode_pre(x)
        acts = model.activate(pre)
        recon = model.decode(acts)
    f_axes, o_axes = model.feature_axes(x), model.output_axes(x)
    rec = reconstruction_loss(recon, label, o_axes)
    naive_rec = sum(float((recon[t, h] - label[t, h]).pow(2).sum()) for t in range(5) for h in range(3)) / 5
    assert math.isclose(float(rec), naive_rec, rel_tol=1e-12)
    norms = naive_decoder_norm(model)
    l1 = sparsity_penalty(acts, f_axes, kind="power", decoder_norm=model.decoder_norm())
    naive_l1 = sum(float(acts[t, i]) * float(norms[i]) for t in range(5) for i in range(7)) / 5
    assert math.isclose(float(l1), naive_l1, rel_tol=1e-12)
    theta = model.activation.threshold.detach()
    lp = jumprelu_preact_loss(pre * model.decoder_norm(), theta, f_axes, decoder_norm=model.decoder_norm())
    naive_lp = sum(max(float(theta[i]) - float(pre[t, i]) * float(norms[i]), 0.0) * float(norms[i])
                   for t in range(5) for i in range(7)) / 5
    assert math.isclose(float(lp), naive_lp, rel_tol=1e-12)


@pytest.mark.parametrize("lead", [(6,), (3, 4)], ids=["tokens", "sequences"])
@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk", "batchtopk"])
def test_trainer_losses_with_a_token_mask(lead, act_fn):
    """The reference crashed with a (batch,) mask; here every loss is a masked mean over tokens."""
    model = make(act_fn, gating=True)
    batch = batch_of(model, lead)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(lead, generator=g) > 0.4
    mask.view(-1)[0] = True
    batch["mask"] = mask
    trainer = Trainer(StandardTrainerConfig(total_training_tokens=100, sparsity_coefficient=0.3, lp_coefficient=0.1
                                            if act_fn == "jumprelu" else 0.0, auxk_coefficient=0.2,
                                            sparsity_warmup_steps=0), model, progress=False)
    trainer.setup(mask.numel())
    ctx = trainer.compute_loss(batch, step=5)
    ctx["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.endswith("log_threshold"))
    # naive masked means over the kept tokens
    keep = mask.reshape(-1)
    label = model.prepare_label(batch).reshape(-1, 3, 5)[keep]
    recon = ctx["recon"].detach().reshape(-1, 3, 5)[keep]
    acts = ctx["acts"].detach().reshape(-1, 7)[keep]
    naive_rec = float((recon - label).pow(2).sum()) / int(keep.sum())
    assert math.isclose(float(ctx["terms"]["mse_loss"].detach()), naive_rec, rel_tol=1e-12)
    naive_l1 = float((acts * naive_decoder_norm(model)).sum()) / int(keep.sum())
    assert math.isclose(float(ctx["terms"]["sparsity_loss"].detach()), 0.3 * naive_l1, rel_tol=1e-12)
    if act_fn == "batchtopk":  # masked tokens are left out of the batch selection
        assert not bool(ctx["acts"].reshape(-1, 7)[~keep].any())
        assert int((acts > 0).sum()) <= 2 * int(keep.sum())
    metrics = model.training_metrics(ctx)
    for hook in model.config.hook_points:
        assert {f"metrics/explained_variance/{hook}", f"metrics/mse/{hook}", f"metrics/l2_norm_error/{hook}",
                f"metrics/decoder_norm/{hook}"} <= set(metrics)


@torch.no_grad()
def test_training_metrics_match_a_naive_per_head_computation():
    model = make("relu")
    batch = batch_of(model, (8,))
    batch["mask"][:3] = False
    x, _ = model.prepare_input(batch)
    label = model.prepare_label(batch)
    with torch.no_grad():
        acts = model.encode(x)
        recon = model.decode(acts)
    ctx = {"acts": acts, "recon": recon, "label": label, "mask": batch["mask"],
           "feature_axes": model.feature_axes(x), "output_axes": model.output_axes(x)}
    m = model.training_metrics(ctx)
    for h, hook in enumerate(model.config.hook_points):
        y, y_hat = label[3:, h], recon[3:, h]
        err = [float((y_hat[t] - y[t]).pow(2).sum()) for t in range(5)]
        mean = y.mean(0)
        var = sum(float((y[t] - mean).pow(2).sum()) for t in range(5))
        assert math.isclose(m[f"metrics/explained_variance/{hook}"], 1 - sum(err) / var, rel_tol=1e-12)
        assert math.isclose(m[f"metrics/mse/{hook}"], sum(err) / 5, rel_tol=1e-12)
        assert math.isclose(m[f"metrics/l2_norm_error/{hook}"], sum(math.sqrt(e) for e in err) / 5, rel_tol=1e-12)
        naive_norm = sum(float(model.W_D[h, i].norm()) for i in range(7)) / 7
        assert math.isclose(m[f"metrics/decoder_norm/{hook}"], naive_norm, rel_tol=1e-12)


# --- folding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk", "batchtopk"])
@pytest.mark.parametrize("gating", [False, True])
def test_folding_with_a_different_factor_per_head_is_exact(act_fn, gating):
    norms = {HOOKS[0]: 0.7, HOOKS[1]: 4.0, HOOKS[2]: 19.0}
    model = make(act_fn, gating, normalization="dataset", dataset_norms=norms)
    batch = batch_of(model, (2, 5))
    # naive: normalise each head by its own factor, run, divide each head's output by its factor
    scales = [math.sqrt(5) / norms[h] for h in HOOKS]
    with torch.no_grad():
        x = torch.stack([batch[h] * s for h, s in zip(HOOKS, scales)], dim=-2)
        acts_before = model.encode(x, mask=batch["mask"])
        naive = model.decode(acts_before) / torch.tensor(scales, dtype=torch.float64)[:, None]
        torch.testing.assert_close(model.forward_raw(batch), naive, rtol=1e-12, atol=1e-12)
        combined_before = model.decoder_norm().clone()
        model.fold_normalization()
        assert model.config.normalization == "none" and model.config.dataset_norms == {}
        torch.testing.assert_close(model.forward_raw(batch), naive, rtol=1e-10, atol=1e-10)
        x_raw, _ = model.prepare_input(batch)
        # the shared code keeps its values, and the combined norm (gate, penalty) is unchanged
        torch.testing.assert_close(model.encode(x_raw, mask=batch["mask"]), acts_before, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.decoder_norm(), combined_before, rtol=1e-12, atol=0)
        torch.testing.assert_close(model.head_norm_weight, torch.tensor(scales, dtype=torch.float64))


def test_decoder_directions_are_raw_write_directions_before_and_after_folding():
    norms = {HOOKS[0]: 2.0, HOOKS[1]: 9.0}
    model = make("relu", heads=2, normalization="dataset", dataset_norms=norms)
    before = model.decoder_directions()
    with torch.no_grad():
        model.fold_normalization()
    after = model.decoder_directions()
    for hook in HOOKS[:2]:
        assert before[hook].shape == (7, 5)
        torch.testing.assert_close(before[hook], after[hook], rtol=1e-12, atol=1e-12)
        # raw output of feature i at activation 1 minus the bias = its direction
        f = torch.zeros(1, 7, dtype=torch.float64)
        f[0, 3] = 1.0
        with torch.no_grad():
            delta = model.decode(f) - model.decode(torch.zeros_like(f))
        torch.testing.assert_close(delta[0, HOOKS.index(hook)], after[hook][3], rtol=1e-12, atol=1e-12)


def test_token_wise_normalisation_scales_each_head_per_token():
    model = make("relu", normalization="token")
    batch = batch_of(model, (4,))
    with torch.no_grad():
        out = model.forward_raw(batch)
        for t in range(4):
            xs = [batch[h][t] * math.sqrt(5) / batch[h][t].norm() for h in HOOKS]
            acts = model.encode(torch.stack(xs)[None])
            y = model.decode(acts)[0]
            for h, hook in enumerate(HOOKS):
                torch.testing.assert_close(out[t, h], y[h] / (math.sqrt(5) / batch[hook][t].norm()),
                                           rtol=1e-12, atol=1e-12)


def test_reconstruct_hooks_needs_every_head_and_returns_each_raw_prediction():
    model = make("topk", normalization="dataset", dataset_norms={h: 3.0 + i for i, h in enumerate(HOOKS)})
    batch = batch_of(model, (2, 3))
    inputs = {h: batch[h] for h in HOOKS}
    with torch.no_grad():
        out = model.reconstruct_hooks(inputs, batch["mask"])
        full = model.forward_raw(batch)
    assert list(out) == HOOKS
    for h, hook in enumerate(HOOKS):
        torch.testing.assert_close(out[hook], full[..., h, :])
    with pytest.raises(DataError, match="all its heads"):
        model.reconstruct_hooks({h: batch[h] for h in HOOKS[:2]}, batch["mask"])


# --- initialisation ---------------------------------------------------------------------------------


def test_identical_and_independent_initialisation():
    same = Crosscoder(CrosscoderConfig(hook_points=HOOKS, d_model=5, d_sae=7, init="identical"))
    same.reset_parameters(torch.Generator().manual_seed(0))
    for h in range(1, 3):
        assert torch.equal(same.W_D[h], same.W_D[0])
    other = Crosscoder(CrosscoderConfig(hook_points=HOOKS, d_model=5, d_sae=7, init="independent"))
    other.reset_parameters(torch.Generator().manual_seed(0))
    assert not torch.equal(other.W_D[1], other.W_D[0])
    for model in (same, other):
        torch.testing.assert_close(model.W_D.norm(dim=-1), torch.ones(3, 7))
        for h in range(3):
            torch.testing.assert_close(model.W_E[h], model.W_D[h].T / 3)
        assert not model.b_E.any() and not model.b_D.any()
        torch.testing.assert_close(model.decoder_norm(), torch.full((7,), 3.0))
    again = Crosscoder(CrosscoderConfig(hook_points=HOOKS, d_model=5, d_sae=7, init="independent"))
    again.reset_parameters(torch.Generator().manual_seed(0))
    assert torch.equal(again.W_D, other.W_D)


def test_identical_heads_fed_identical_inputs_start_as_the_sae():
    from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder

    cc = Crosscoder(CrosscoderConfig(hook_points=HOOKS, d_model=5, d_sae=7, act_fn="topk", top_k=2,
                                     normalization="none"))
    cc.reset_parameters(torch.Generator().manual_seed(3))
    sae = SparseAutoEncoder(SAEConfig(hook_point_in="x", d_model=5, d_sae=7, act_fn="topk", top_k=2,
                                      normalization="none"))
    with torch.no_grad():
        sae.W_D.copy_(cc.W_D[0])
        sae.init_encoder_from_decoder(1.0)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = cc.forward(torch.stack([x] * 3, dim=-2))
        expected = sae.forward(x)
    for h in range(3):
        torch.testing.assert_close(y[:, h], expected, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_initializer_capabilities():
    model = make("topk", heads=2)
    batch = batch_of(model, (64,))
    batch["mask"][:4] = False
    report = initialize(model, InitializerConfig(decoder_bias="mean", grid_search_decoder_norm=True,
                                                 encoder_bias_from_mean_pre=True, active_subspace_dim=3), batch)
    assert report["grid_search_best_norm"] > 0
    # every head's decoder rows have the searched norm, inside that head's top-3 subspace
    torch.testing.assert_close(model.W_D.norm(dim=-1), torch.full((2, 7), report["grid_search_best_norm"],
                                                                  dtype=torch.float64))
    x, _ = model.prepare_input(batch)
    label = model.prepare_label(batch)
    keep = batch["mask"]
    for h in range(2):
        torch.testing.assert_close(model.b_D[h], label[keep, h].mean(0))
        torch.testing.assert_close(model.W_E[h], model.W_D[h].T / 2)
        y = label[keep, h] - label[keep, h].mean(0)
        _, _, vh = torch.linalg.svd(y, full_matrices=False)
        outside = model.W_D[h] - model.W_D[h] @ vh[:3].T @ vh[:3]
        assert float(outside.abs().max()) < 1e-10
    with torch.no_grad():
        pre = model.encode_pre(x)[keep]
    torch.testing.assert_close(pre.mean(0), torch.zeros(7, dtype=torch.float64), rtol=0, atol=1e-10)


# --- analysis -------------------------------------------------------------------------------------------


@torch.no_grad()
def test_analysis_extras_match_naive_norms_and_cosines():
    model = make("relu")
    with torch.no_grad():
        model.head_norm_weight.copy_(torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64))
    idx = [6, 0, 3]
    extras = crosscoder_analysis_extras(model, idx)
    assert extras["decoder_norms"].shape == (3, 3)
    assert extras["decoder_cosine_similarity"].shape == (3, 3, 3)
    g = model.head_norm_weight
    for row, i in enumerate(idx):
        norms = [float(g[h]) * float(model.W_D[h, i].norm()) for h in range(3)]
        for h in range(3):
            assert math.isclose(extras["decoder_norms"][row, h], norms[h], rel_tol=1e-12)
            assert math.isclose(extras["relative_decoder_norms"][row, h], norms[h] / sum(norms), rel_tol=1e-12)
            for k in range(3):
                a, b = model.W_D[h, i], model.W_D[k, i]
                cos = float(a @ b) / (float(a.norm()) * float(b.norm()))
                assert math.isclose(extras["decoder_cosine_similarity"][row, h, k], cos, rel_tol=1e-9, abs_tol=1e-12)


def test_feature_classification():
    relative = torch.tensor([[0.5, 0.5], [0.95, 0.05], [0.02, 0.98], [0.1, 0.9], [0.0, 0.0]], dtype=torch.float64)
    assert classify_features(relative, 0.1).tolist() == [SHARED, 0, 1, SHARED, -3]
    three = torch.tensor([[0.4, 0.4, 0.2], [0.45, 0.5, 0.05], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert classify_features(three, 0.1).tolist() == [SHARED, PARTIAL, 2]
    with pytest.raises(ValueError):
        classify_features(relative, 0.0)


def test_head_distribution_counts_and_histogram():
    model = Crosscoder(CrosscoderConfig(hook_points=HOOKS[:2], d_model=4, d_sae=5))
    with torch.no_grad():
        model.W_D.zero_()
        # per-head norms: shared (1, 1), head 0 only (1, 0), head 1 only (0, 2), shared (3, 1), 0.95 / 0.05
        for i, (a, b) in enumerate([(1, 1), (1, 0), (0, 2), (3, 1), (19, 1)]):
            model.W_D[0, i, 0] = a
            model.W_D[1, i, 1] = b
    dist = head_distribution(model, threshold=0.1, bins=4)
    assert dist.counts["shared"] == 2 and dist.counts[HOOKS[0]] == 2 and dist.counts[HOOKS[1]] == 1
    edges, counts = dist.first_head_histogram
    assert edges == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert counts == [1, 0, 1, 3]  # shares 0 | - | 0.5 | 0.75, 0.95, 1.0
    data = dist.to_json(per_feature=True)
    assert data["features"][2] == {"index": 2, "relative_decoder_norms": [0.0, 1.0], "category": HOOKS[1]}
    assert data["heads_used"] == [0, 3, 2]


# --- config validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field, message", [
    ({"hook_points": ["a"]}, "hook_points", "at least 2 heads"),
    ({"hook_points": ["a", "a"]}, "hook_points", "appears twice"),
    ({"hook_points": ["a", ""]}, "hook_points", "empty"),
    ({"hook_points": ["a", "mask"]}, "hook_points", "reserved"),
    ({"d_sae": 10, "expansion_factor": 4.0}, "d_sae", "disagrees"),
    ({"expansion_factor": 0.01}, "expansion_factor", "at least 1"),
])
def test_config_errors_name_the_field(kwargs, field, message):
    base = {"hook_points": ["a", "b"], "d_model": 8}
    with pytest.raises(FieldValueError) as info:
        CrosscoderConfig(**{**base, **kwargs})
    assert info.value.field == field and message in info.value.message


def test_expansion_factor_defaults_like_the_sae():
    assert CrosscoderConfig(hook_points=["a", "b"], d_model=8).n_features == 64
    assert CrosscoderConfig(hook_points=["a", "b"], d_model=8, d_sae=10).expansion_factor is None
    cfg = attrs.evolve(CrosscoderConfig(hook_points=["a", "b"], d_model=8), hook_points=["a", "b", "c"])
    assert cfg.hooks_in == cfg.hooks_out == ("a", "b", "c") and cfg.n_heads == 3
