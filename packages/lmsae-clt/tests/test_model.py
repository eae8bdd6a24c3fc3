"""CLT maths against naive references (explicit loops over source and target layers)."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

from lmsae.config.fields import FieldValueError
from lmsae.errors import DataError, LmsaeError
from lmsae_clt.config import ACT_FNS, CLTConfig
from lmsae_clt.model import CrossLayerTranscoder, clt_analysis_extras, clt_sharding_rules


def naive_forward(model: CrossLayerTranscoder, x: torch.Tensor, acts: torch.Tensor | None = None):
    """Pre-activations by a loop over layers/features/dims, predictions by a loop over (source, target, feature)."""
    n, n_layers, d = x.shape
    f_dim = model.config.n_features
    o = model.config.output_width
    h = torch.zeros(n, n_layers, f_dim, dtype=x.dtype)
    for t in range(n):
        for i in range(n_layers):
            for f in range(f_dim):
                h[t, i, f] = sum(x[t, i, k] * model.W_E[i, k, f] for k in range(d)) + model.b_E[i, f]
    if acts is None:
        return h, None
    y = torch.zeros(n, n_layers, o, dtype=x.dtype)
    for t in range(n):
        for j in range(n_layers):  # target
            y[t, j] = model.b_D[j]
            for i in range(j + 1):  # source
                for f in range(f_dim):
                    y[t, j] += acts[t, i, f] * model.W_D[j][i, f]
    return h, y


def naive_decoder_norm(model: CrossLayerTranscoder) -> torch.Tensor:
    n_layers, f_dim = model.config.n_layers, model.config.n_features
    out = torch.zeros(n_layers, f_dim, dtype=model.W_E.dtype)
    for i in range(n_layers):
        for f in range(f_dim):
            total = 0.0
            for j in range(i, n_layers):
                total += float(model.target_norm_factors[j]) ** 2 * float(model.W_D[j][i, f].detach().square().sum())
            out[i, f] = math.sqrt(total)
    return out


@pytest.mark.parametrize("d_out", [None, 4])
def test_encode_decode_match_naive_double_loop(make_model, raw_batch, d_out):
    model = make_model(n_layers=3, d_model=5, d_sae=4, d_out=d_out, act_fn="relu", sparse_decode_density=0.0)
    batch = raw_batch(model, n=6)
    x, _ = model.prepare_input(batch)
    with torch.no_grad():
        h = model.encode_pre(x)
        acts = model.activate(h)
        y = model.decode(acts)
        h_ref, y_ref = naive_forward(model, x, acts)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acts, torch.relu(h_ref))
    assert y.shape == (6, 3, d_out or 5)


def test_prepare_input_and_label_stack_layers_in_order(make_model, raw_batch):
    model = make_model(n_layers=3)
    batch = raw_batch(model, n=4)
    x, extras = model.prepare_input(batch)
    y = model.prepare_label(batch)
    assert extras == {}
    for i, (hi, ho) in enumerate(zip(model.config.hooks_in, model.config.hooks_out)):
        assert torch.equal(x[:, i], batch[hi]) and torch.equal(y[:, i], batch[ho])
    del batch[model.config.hooks_in[1]]
    with pytest.raises(DataError, match="blocks.1.ln2.hook_normalized"):
        model.prepare_input(batch)


def test_decoder_norm_is_the_combined_norm_over_targets(make_model):
    model = make_model(n_layers=4, d_sae=3)
    with torch.no_grad():
        model.target_norm_factors.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    torch.testing.assert_close(model.decoder_norm(), naive_decoder_norm(model), rtol=1e-12, atol=1e-12)
    by_target = model.target_decoder_norms(raw=False)
    torch.testing.assert_close(by_target.square().sum(-1).sqrt(), model.decoder_norm())
    assert torch.all(by_target[1, :, 0] == 0)  # layer 1 does not write to layer 0


def test_combined_norm_gradient_reaches_every_decoder(make_model):
    model = make_model(n_layers=3)
    model.decoder_norm().sum().backward()
    for j, w in enumerate(model.W_D):
        for i in range(j + 1):
            assert w.grad[i].abs().sum() > 0, f"no gradient to W_D[{i}->{j}]"
    # d n_i / d W_D[i->j] = c_j² W_D[i->j] / n_i
    model.zero_grad()
    norm = model.decoder_norm()
    norm[0, 1].backward()
    expected = model.W_D[2][0, 1] / norm[0, 1].detach()
    torch.testing.assert_close(model.W_D[2].grad[0, 1], expected)


def test_zero_decoders_give_a_zero_norm_with_a_finite_gradient(make_model):
    model = make_model(n_layers=2, d_sae=3)
    with torch.no_grad():
        model.W_D[0][0, 2].zero_()
        model.W_D[1][0, 2].zero_()
    norm = model.decoder_norm()
    assert norm[0, 2] == 0
    norm.sum().backward()
    assert all(torch.isfinite(w.grad).all() for w in model.W_D)


@pytest.mark.parametrize("act_fn", ["relu", "topk", "layertopk", "batchtopk", "batchlayertopk"])
@pytest.mark.parametrize("gating", [False, True])
def test_sparse_decode_equals_dense_values_and_gradients(make_model, raw_batch, act_fn, gating):
    model = make_model(n_layers=3, d_model=6, d_sae=8, act_fn=act_fn, top_k=3, decoder_norm_gating=gating)
    x, _ = model.prepare_input(raw_batch(model, n=10))
    params = list(model.parameters())

    def run(decode):
        acts = model.encode(x)
        acts.retain_grad()
        y = decode(acts)
        grads = torch.autograd.grad(y.square().sum(), [*params, acts])
        return acts, y, grads

    acts, dense, grads_dense = run(model.decode_dense)
    assert (acts == 0).any()
    _, sparse, grads_sparse = run(model.decode_sparse)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    # every parameter (encoder included: the activation's backward zeroes inactive entries anyway)
    for a, b in zip(grads_sparse[:-1], grads_dense[:-1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    active = acts.detach() != 0
    torch.testing.assert_close(grads_sparse[-1][active], grads_dense[-1][active], rtol=1e-12, atol=1e-12)
    # two token axes and an all-zero batch
    seq = acts.detach().reshape(2, 5, *acts.shape[1:])
    torch.testing.assert_close(model.decode_sparse(seq), model.decode_dense(seq), rtol=1e-12, atol=1e-12)
    zeros = torch.zeros_like(acts)
    torch.testing.assert_close(model.decode_sparse(zeros), model.b_D.detach().expand(10, -1, -1))


def test_training_a_jumprelu_decodes_densely_so_the_threshold_gets_its_gradient(make_model, raw_batch, monkeypatch):
    model = make_model(act_fn="jumprelu", jumprelu_init_threshold=2.0, jumprelu_bandwidth=4.0,
                       sparse_decode_density=1.0)
    x, _ = model.prepare_input(raw_batch(model))
    monkeypatch.setattr(model, "decode_sparse", lambda a: pytest.fail("sparse path while training a JumpReLU"))
    model.decode(model.encode(x)).square().sum().backward()
    assert model.activation.log_threshold.grad.abs().sum() > 0
    with torch.no_grad():
        monkeypatch.undo()
        torch.testing.assert_close(model.decode(model.encode(x)), model.decode_dense(model.encode(x)))


def test_decode_picks_the_sparse_path_below_the_density_threshold(make_model, raw_batch, monkeypatch):
    model = make_model(act_fn="topk", top_k=1, d_sae=10, sparse_decode_density=0.5)  # density 0.1
    x, _ = model.prepare_input(raw_batch(model))
    acts = model.encode(x)
    calls = []
    monkeypatch.setattr(model, "decode_sparse",
                        lambda a, **kw: calls.append("sparse") or model.decode_dense(a, **kw))
    model.decode(acts)
    assert calls == ["sparse"]
    model.decode_linear(acts)  # the same choice without the bias
    assert calls == ["sparse", "sparse"]
    model.config = attrs.evolve(model.config, sparse_decode_density=0.0)
    model.decode(acts)
    model.decode_linear(acts)
    assert calls == ["sparse", "sparse"]


@pytest.mark.parametrize("act_fn", ACT_FNS)
@pytest.mark.parametrize("gating", [False, True])
def test_fold_with_distinct_per_layer_factors(make_model, raw_batch, act_fn, gating):
    model = make_model(n_layers=3, d_model=6, d_sae=8, d_out=4, act_fn=act_fn, top_k=3, decoder_norm_gating=gating,
                       jumprelu_init_threshold=0.5)
    batch = raw_batch(model, n=24)
    s_in = dict(zip(model.config.hooks_in, [0.5, 3.0, 11.0]))
    s_out = dict(zip(model.config.hooks_out, [7.0, 0.25, 2.0]))
    with torch.no_grad():
        scaled = dict(batch)
        for h, s in s_in.items():
            scaled[h] = batch[h] * s
        x_norm, _ = model.prepare_input(scaled)
        acts_before = model.encode(x_norm, mask=batch["mask"])
        before = model.decode(acts_before)
        norm_before = model.decoder_norm()
        model.fold_scales(s_in, s_out)
        x_raw, _ = model.prepare_input(batch)
        acts_after = model.encode(x_raw, mask=batch["mask"])
        after = model.decode(acts_after)
    expected = before / torch.tensor([7.0, 0.25, 2.0], dtype=before.dtype)[:, None]
    torch.testing.assert_close(after, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(acts_after, acts_before, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.decoder_norm(), norm_before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.target_norm_factors, torch.tensor([7.0, 0.25, 2.0], dtype=torch.float64))


def test_fold_normalization_then_forward_raw(make_model, raw_batch):
    model = make_model(act_fn="jumprelu", decoder_norm_gating=True, normalization="dataset",
                       jumprelu_init_threshold=0.3)
    batch = raw_batch(model, n=20)
    reference = model.forward_raw(batch)
    directions = model.decoder_directions()
    model.fold_normalization()
    torch.testing.assert_close(model.forward_raw(batch), reference, rtol=1e-10, atol=1e-10)
    for h, d in model.decoder_directions().items():
        torch.testing.assert_close(d, directions[h], rtol=1e-12, atol=1e-12)


def test_output_scale_stacks_per_hook_scales(make_model):
    model = make_model(n_layers=3)
    scales = {h: torch.tensor(float(i + 2)) for i, h in enumerate(model.config.hooks_out)}
    assert model.output_scale(scales).tolist() == [[2.0], [3.0], [4.0]]
    per_token = {h: torch.full((5, 1), float(i + 2)) for i, h in enumerate(model.config.hooks_out)}
    out = model.output_scale(per_token)
    assert out.shape == (5, 3, 1) and out[0, :, 0].tolist() == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("normalization", ["none", "token", "batch"])
def test_token_and_batch_normalisation_run(make_model, raw_batch, normalization):
    model = make_model(normalization=normalization)
    assert model.forward_raw(raw_batch(model)).shape == (16, 3, 6)


def test_split_output_and_reconstruct_hooks_from_all_inputs(make_model, raw_batch):
    model = make_model(act_fn="topk", top_k=2, normalization="dataset")
    batch = raw_batch(model)
    full = model.forward_raw(batch)
    inputs = {h: batch[h] for h in model.config.hooks_in}
    predictions = model.reconstruct_hooks(inputs, batch["mask"])
    assert list(predictions) == list(model.config.hooks_out)
    for j, h in enumerate(model.config.hooks_out):
        torch.testing.assert_close(predictions[h], full[:, j])
    assert set(model.split_output(full)) == set(model.config.hooks_out)


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk", "batchtopk"])
def test_reconstruct_hooks_from_earlier_layers_only(make_model, raw_batch, act_fn):
    model = make_model(n_layers=3, act_fn=act_fn, top_k=2, decoder_norm_gating=True, normalization="dataset",
                       jumprelu_init_threshold=0.3)
    batch = raw_batch(model)
    mask = batch["mask"].clone()
    mask[3] = False
    hin, hout = model.config.hooks_in, model.config.hooks_out
    full = model.reconstruct_hooks({h: batch[h] for h in hin}, mask)
    for p in (1, 2):
        partial = model.reconstruct_hooks({h: batch[h] for h in hin[:p]}, mask)
        assert list(partial) == list(hout[:p])
        for h in partial:
            torch.testing.assert_close(partial[h], full[h], rtol=1e-12, atol=1e-12)
    # a gap: only the layers before it count
    partial = model.reconstruct_hooks({hin[0]: batch[hin[0]], hin[2]: batch[hin[2]]}, mask)
    assert list(partial) == [hout[0]]
    with pytest.raises(DataError, match="layer 0"):
        model.reconstruct_hooks({hin[1]: batch[hin[1]]}, mask)


@pytest.mark.parametrize("act_fn", ["layertopk", "batchlayertopk"])
def test_across_layer_topk_determines_no_output_from_partial_inputs(make_model, raw_batch, act_fn):
    model = make_model(act_fn=act_fn, top_k=3)
    batch = raw_batch(model)
    hin = model.config.hooks_in
    assert model.reconstruct_hooks({h: batch[h] for h in hin[:2]}) == {}
    assert len(model.reconstruct_hooks({h: batch[h] for h in hin})) == 3


def test_analysis_features_are_layer_major_and_directions_rebuild_the_output(make_model, raw_batch):
    model = make_model(n_layers=3, d_sae=4, act_fn="relu", normalization="dataset")
    batch = raw_batch(model, n=7)
    nb = model.normalize(batch)
    x, _ = model.prepare_input(nb)
    acts = model.encode(x)
    flat = model.analysis_activations(acts, x)
    assert flat.shape == (7, 12) and model.n_features == 12
    assert torch.equal(flat[:, 4 + 2], acts[:, 1, 2])  # feature 2 of layer 1 -> column 1·4 + 2
    raw = model.forward_raw(batch)
    directions = model.decoder_directions()
    scale = model.output_scale(model.hook_scales(batch))
    for j, h in enumerate(model.config.hooks_out):
        assert directions[h].shape == (12, 6)
        assert torch.all(directions[h][(j + 1) * 4:] == 0)  # later layers do not write to layer j
        rebuilt = flat @ directions[h] + model.b_D[j] / scale[j]
        torch.testing.assert_close(rebuilt, raw[:, j], rtol=1e-10, atol=1e-10)


def test_analysis_extras_name_the_source_layer_and_norm_per_target(make_model):
    model = make_model(n_layers=3, d_sae=4, normalization="dataset")
    extras = clt_analysis_extras(model, [0, 5, 11])
    assert extras["source_layer"].tolist() == [0, 1, 2]
    assert extras["decoder_norm_by_layer"].shape == (3, 3)
    norms = extras["decoder_norm_by_layer"]
    assert norms[1, 0] == 0 and norms[2, 0] == 0 and norms[2, 1] == 0
    directions = model.decoder_directions()
    for row, (index, layer) in enumerate([(0, 0), (5, 1), (11, 2)]):
        for j, h in enumerate(model.config.hooks_out):
            assert norms[row, j] == pytest.approx(float(directions[h][index].norm()), rel=1e-9)
    with pytest.raises(LmsaeError, match="layer-major"):
        clt_analysis_extras(model, [12])


def test_training_metrics_per_layer_match_a_naive_computation(make_model, raw_batch):
    model = make_model(n_layers=2, act_fn="topk", top_k=2)
    batch = raw_batch(model, n=9)
    batch["mask"][4] = False
    x, _ = model.prepare_input(batch)
    with torch.no_grad():
        acts = model.encode(x)
        recon = model.decode(acts)
    label = model.prepare_label(batch)
    ctx = {"acts": acts, "recon": recon, "label": label, "mask": batch["mask"],
           "feature_axes": model.feature_axes(x), "output_axes": model.output_axes(x)}
    metrics = model.training_metrics(ctx)
    keep = batch["mask"]
    for j, h in enumerate(model.config.hooks_out):
        y, yh = label[keep, j], recon[keep, j]
        ev = 1 - (yh - y).square().sum() / (y - y.mean(0)).square().sum()
        assert metrics[f"metrics/explained_variance/{h}"] == pytest.approx(float(ev))
        l0 = sum(int((acts[t, j] > 0).sum()) for t in range(9) if keep[t]) / int(keep.sum())
        assert metrics[f"metrics/l0/layer{j}"] == pytest.approx(l0)
    ctx["mask"] = torch.zeros_like(batch["mask"])
    assert model.training_metrics(ctx) == {}


def test_token_mask_is_honoured_by_batch_selections_and_losses(make_model, raw_batch):
    from lmsae.nn.losses import reconstruction_loss

    model = make_model(act_fn="batchtopk", top_k=2)
    batch = raw_batch(model, n=8)
    mask = torch.ones(8, dtype=torch.bool)
    mask[[1, 5]] = False
    x, _ = model.prepare_input(batch)
    acts = model.encode(x, mask=mask)
    assert torch.all(acts[~mask] == 0)
    assert int((acts > 0).sum()) <= 2 * 6 * 3
    garbage = dict(batch)
    for h in model.config.hooks_in:
        garbage[h] = batch[h].clone()
        garbage[h][~mask] = 1e6
    x2, _ = model.prepare_input(garbage)
    acts2 = model.encode(x2, mask=mask)
    torch.testing.assert_close(acts2[mask], acts[mask])
    label = model.prepare_label(batch)
    loss = reconstruction_loss(model.decode(acts), label, model.output_axes(x), mask)
    loss2 = reconstruction_loss(model.decode(acts2), label, model.output_axes(x2), mask)
    torch.testing.assert_close(loss, loss2)


def test_reset_parameters_gives_unit_combined_norms_and_optional_zero_cross_layer_decoders(make_config):
    model = CrossLayerTranscoder(make_config(n_layers=3))
    torch.testing.assert_close(model.decoder_norm(), torch.ones(3, 5), rtol=1e-5, atol=1e-5)
    zero = CrossLayerTranscoder(make_config(n_layers=3, init_cross_layer_decoders_zero=True))
    torch.testing.assert_close(zero.decoder_norm(), torch.ones(3, 5), rtol=1e-5, atol=1e-5)
    for j, w in enumerate(zero.W_D):
        for i in range(j):
            assert torch.all(w[i] == 0)
        assert torch.all(w[j].norm(dim=-1) > 0.99)
    a = CrossLayerTranscoder(make_config())
    b = CrossLayerTranscoder(make_config())
    a.reset_parameters(torch.Generator().manual_seed(3))
    b.reset_parameters(torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_initializer_capabilities(make_config, make_model, raw_batch):
    model = make_model(n_layers=3)
    model.set_decoder_norm(2.5)
    torch.testing.assert_close(model.decoder_norm(), torch.full((3, 5), 2.5, dtype=torch.float64))
    model.init_encoder_from_decoder(0.5)
    for i in range(3):
        torch.testing.assert_close(model.W_E[i], model.W_D[i][i].T * 0.5)
    mean = torch.randn(3, 6, dtype=torch.float64)
    model.init_decoder_bias(mean)
    assert torch.equal(model.b_D, mean)
    batch = raw_batch(model)
    x, _ = model.prepare_input(batch)
    model.init_encoder_bias_from_mean_pre(x, mask=batch["mask"])
    torch.testing.assert_close(model.encode_pre(x).mean(0), torch.zeros(3, 5, dtype=torch.float64), atol=1e-10,
                               rtol=0)
    wide = CrossLayerTranscoder(make_config(d_out=4))
    with pytest.raises(LmsaeError, match="encoder_from_decoder"):
        wide.init_encoder_from_decoder()


def test_sharding_rules_place_feature_axes_on_model(make_config):
    rules = clt_sharding_rules(make_config(n_layers=2, act_fn="jumprelu"))
    assert rules == {"W_E": {"model": 2}, "b_E": {"model": 1}, "b_D": {}, "W_D.0": {"model": 1},
                     "W_D.1": {"model": 1}, "activation.log_threshold": {"model": 1}}
    model = CrossLayerTranscoder(make_config(n_layers=2, act_fn="jumprelu"))
    params = dict(model.named_parameters())
    for name, rule in rules.items():
        for dim in rule.values():
            assert params[name].shape[dim] == 5  # d_sae


@pytest.mark.parametrize("change, field, message", [
    ({"hook_points_out": ["a", "b"]}, "hook_points_out", "has 2 hook points"),
    ({"hook_points_in": ["a", "a", "b"]}, "hook_points_in", "repeated"),
    ({"hook_points_in": ["a", "mask", "b"]}, "hook_points_in", "reserved"),
    ({"d_sae": 7, "expansion_factor": 2.0}, "d_sae", "disagrees"),
    ({"hook_points_out": ["x", "y", "blocks.0.ln2.hook_normalized"], "d_out": 9}, "d_out", "two widths"),
    ({"sparse_decode_density": 1.5}, "sparse_decode_density", "must be in"),
])
def test_config_validation(change, field, message):
    base = {"hook_points_in": ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized", "b2"],
            "hook_points_out": ["o0", "o1", "o2"], "d_model": 6, "d_sae": 5}
    with pytest.raises(FieldValueError) as info:
        CLTConfig(**{**base, **change})
    assert info.value.field == field and message in info.value.message


def test_config_sizes():
    cfg = CLTConfig(hook_points_in=["a", "b"], hook_points_out=["c", "d"], d_model=10)
    assert cfg.n_features == 80 and cfg.n_layers == 2 and cfg.expansion_factor == 8.0
    assert CLTConfig(hook_points_in=["a"], hook_points_out=["c"], d_model=10, d_sae=3).expansion_factor is None
