"""Lorsa's maths against a naive reference: explicit loops over queries, keys, heads and features,
RoPE applied pair by pair with cos/sin of Python floats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lmsae.config.fields import FieldValueError
from lmsae.errors import LmsaeError, ShapeError
from lmsae_lorsa.config import LorsaConfig
from lmsae_lorsa.rotary import inverse_frequencies

# --- the naive reference -------------------------------------------------------------------------


def ref_inv_freq(cfg: LorsaConfig) -> list[float]:
    rd = cfg.resolved_rotary_dim
    out = []
    for p in range(rd // 2):
        f = cfg.rotary_base ** (-2 * p / rd)
        if cfg.ntk_by_parts:
            wavelen = 2 * math.pi / f
            low, high = cfg.ntk_original_context / cfg.ntk_low_freq_factor, cfg.ntk_original_context / cfg.ntk_high_freq_factor
            if wavelen > low:
                f = f / cfg.ntk_factor
            elif wavelen >= high:
                smooth = (cfg.ntk_original_context / wavelen - cfg.ntk_low_freq_factor) / (
                    cfg.ntk_high_freq_factor - cfg.ntk_low_freq_factor)
                f = (1 - smooth) * f / cfg.ntk_factor + smooth * f
        out.append(f)
    return out


def ref_rope(vec: list[float], pos: int, cfg: LorsaConfig) -> list[float]:
    """Rotate each pair of the first rotary_dim dims by pos * inv_freq[pair]."""
    if cfg.positional_embedding != "rotary":
        return vec
    rd = cfg.resolved_rotary_dim
    out = list(vec)
    for p, f in enumerate(ref_inv_freq(cfg)):
        i, j = (p, p + rd // 2) if cfg.rotary_style == "neox" else (2 * p, 2 * p + 1)
        c, s = math.cos(pos * f), math.sin(pos * f)
        out[i] = vec[i] * c - vec[j] * s
        out[j] = vec[i] * s + vec[j] * c
    return out


def ref_pre(model, x: torch.Tensor, attention_mask=None) -> np.ndarray:
    """h[b, t, i] = sum_{s<=t, key allowed} softmax_s(q_h[t].k_h[s] / scale) v_i[s], by loops."""
    cfg = model.config
    P = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    xs = x.double().numpy()
    B, T, _ = xs.shape
    G = cfg.ov_group_size
    out = np.zeros((B, T, cfg.d_sae))
    for b in range(B):
        for h in range(cfg.n_qk_heads):
            q = [list(xs[b, t] @ P["W_Q"][h] + P["b_Q"][h]) for t in range(T)]
            k = [list(xs[b, t] @ P["W_K"][h] + P["b_K"][h]) for t in range(T)]
            if cfg.qk_norm == "rms":
                def rms(v, w):
                    r = math.sqrt(sum(a * a for a in v) / len(v) + cfg.qk_norm_eps)
                    return [a / r * wi for a, wi in zip(v, w)]
                q = [rms(v, P["q_norm_weight"][h]) for v in q]
                k = [rms(v, P["k_norm_weight"][h]) for v in k]
            q = [ref_rope(v, t, cfg) for t, v in enumerate(q)]
            k = [ref_rope(v, t, cfg) for t, v in enumerate(k)]
            for t in range(T):
                keys = [s for s in range(t + 1) if attention_mask is None or attention_mask[b, s]]
                if not keys:
                    continue
                scores = [sum(a * c for a, c in zip(q[t], k[s])) / cfg.resolved_attn_scale for s in keys]
                m = max(scores)
                weights = [math.exp(sc - m) for sc in scores]
                z = sum(weights)
                for i in range(h * G, (h + 1) * G):
                    out[b, t, i] = sum(wt / z * (xs[b, s] @ P["W_V"][i] + P["b_V"][i]) for wt, s in zip(weights, keys))
    return out


CONFIGS = [
    dict(),
    dict(rotary_style="gptj"),
    dict(positional_embedding="none"),
    dict(rotary_dim=4, rotary_base=50.0),
    dict(qk_norm="rms"),
    dict(ntk_by_parts=True, ntk_original_context=40, ntk_factor=3.0, ntk_low_freq_factor=1.0,
         ntk_high_freq_factor=4.0, rotary_base=40.0, attn_scale=0.7),
]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_pre_activations_match_the_explicit_attention_loop(make_model, raw_batch, options):
    model = make_model(**options)
    x = raw_batch(model)[model.config.hook_point_in]
    np.testing.assert_allclose(model.encode_pre(x).detach().numpy(), ref_pre(model, x), rtol=1e-10, atol=1e-10)


def test_inverse_frequencies_match_the_reference(make_config):
    for options in CONFIGS[:4] + CONFIGS[5:]:
        cfg = make_config(**options)
        if cfg.positional_embedding != "rotary":
            continue
        got = inverse_frequencies(cfg.resolved_rotary_dim, cfg.rotary_base, ntk_by_parts=cfg.ntk_by_parts,
                                  factor=cfg.ntk_factor, low_freq_factor=cfg.ntk_low_freq_factor,
                                  high_freq_factor=cfg.ntk_high_freq_factor,
                                  original_context=cfg.ntk_original_context)
        np.testing.assert_allclose(got.numpy(), ref_inv_freq(cfg), rtol=1e-13)


def test_ntk_by_parts_covers_all_three_regimes(make_config):
    # the test config above must exercise kept, interpolated and divided frequencies
    cfg = make_config(**CONFIGS[5])
    plain = [cfg.rotary_base ** (-2 * p / cfg.resolved_rotary_dim) for p in range(cfg.resolved_rotary_dim // 2)]
    ratios = [a / b for a, b in zip(ref_inv_freq(cfg), plain)]
    assert any(r == 1.0 for r in ratios) and any(abs(r - 1 / cfg.ntk_factor) < 1e-12 for r in ratios)
    assert any(1 / cfg.ntk_factor + 1e-9 < r < 1 - 1e-9 for r in ratios)


def test_decode_is_the_sum_of_feature_writes(make_model, raw_batch):
    model = make_model(act_fn="topk", top_k=3)
    x = raw_batch(model)[model.config.hook_point_in]
    f = model.encode(x)
    P = {k: v.detach().numpy() for k, v in model.named_parameters()}
    expected = np.zeros(x.shape)
    fn = f.detach().numpy()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            expected[b, t] = P["b_D"] + sum(fn[b, t, i] * P["W_O"][i] for i in range(model.config.d_sae))
    np.testing.assert_allclose(model.decode(f).detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    assert int((f[0, 0] != 0).sum()) <= 3


def test_attention_mask_excludes_keys_and_empty_rows_are_zero(make_model, raw_batch):
    model = make_model()
    x = raw_batch(model)[model.config.hook_point_in]
    am = torch.ones(x.shape[:2], dtype=torch.int64)
    am[0, :2] = 0  # left padding of sequence 0: its first two queries have no key
    am[1, 3] = 0  # a hole
    got = model.encode_pre(x, attention_mask=am).detach().numpy()
    np.testing.assert_allclose(got, ref_pre(model, x, am.bool().numpy()), rtol=1e-10, atol=1e-10)
    assert np.all(got[0, :2] == 0)
    # through prepare_input: the batch's attention_mask reaches the encoder
    batch = {**raw_batch(model), "attention_mask": am}
    _, extras = model.prepare_input(batch)
    assert torch.equal(extras["attention_mask"], am)


def test_right_padding_never_changes_real_positions(make_model, raw_batch):
    model = make_model(act_fn="topk", top_k=2)
    x = raw_batch(model, T=9)[model.config.hook_point_in]
    short = model.forward(x[:, :6])
    padded = torch.cat([x[:, :6], torch.randn(x.shape[0], 3, x.shape[2], dtype=x.dtype) * 100], dim=1)
    torch.testing.assert_close(model.forward(padded)[:, :6], short, rtol=0, atol=1e-12)


def test_batchtopk_leaves_masked_tokens_out(make_model, raw_batch):
    model = make_model(act_fn="batchtopk", top_k=2)
    batch = raw_batch(model)
    mask = batch["mask"].clone()
    mask[:, 0] = False  # e.g. BOS
    acts = model.encode(batch[model.config.hook_point_in], mask=mask)
    assert bool((acts[:, 0] == 0).all())
    assert int((acts != 0).sum()) == 2 * int(mask.sum())


def test_nothing_of_size_n_ctx_is_stored(make_config, raw_batch):
    from lmsae_lorsa.model import LowRankSparseAttention

    model = LowRankSparseAttention(make_config(n_ctx=10**7, qk_norm="rms", act_fn="jumprelu"))
    state = model.state_dict()
    assert set(state) == {"W_Q", "W_K", "b_Q", "b_K", "q_norm_weight", "k_norm_weight", "W_V", "b_V", "W_O", "b_D",
                          "activation.log_threshold"}
    assert not list(model.buffers())
    assert sum(t.numel() for t in state.values()) == model.parameter_count()
    x = raw_batch(model.double(), T=5)[model.config.hook_point_in]
    assert model.encode(x).shape == (3, 5, 12)


def test_sequences_longer_than_n_ctx_are_rejected(make_model, raw_batch):
    model = make_model(n_ctx=4)
    with pytest.raises(ShapeError, match="n_ctx=4"):
        model.encode(raw_batch(model, T=5)[model.config.hook_point_in])
    with pytest.raises(ShapeError, match="sequences"):
        model.encode(torch.randn(5, 12, dtype=torch.float64))


@pytest.mark.parametrize("act_fn,gating", [("jumprelu", True), ("jumprelu", False), ("topk", True)])
def test_folding_keeps_patterns_and_pre_activations(make_model, make_config, raw_batch, act_fn, gating):
    cfg = make_config(normalization="dataset", act_fn=act_fn, top_k=3, decoder_norm_gating=gating,
                      jumprelu_init_threshold=0.3, qk_norm="rms")
    model = make_model(cfg)
    batch = raw_batch(model)
    x_norm, _ = model.prepare_input(model.normalize(batch))
    pattern, pre, acts = model.attention_pattern(x_norm), model.encode_pre(x_norm), model.encode(x_norm)
    reference = model.forward_raw(batch)
    directions = model.decoder_directions()[model.config.hook_point_out]
    model.fold_normalization()
    x_raw = batch[model.config.hook_point_in]
    torch.testing.assert_close(model.attention_pattern(x_raw), pattern, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.encode_pre(x_raw), pre, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.encode(x_raw), acts, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.forward_raw(batch), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.decoder_directions()[model.config.hook_point_out], directions)


def test_encoder_bias_init_centres_the_pre_activations(make_model, raw_batch):
    model = make_model()
    batch = raw_batch(model)
    mask = batch["mask"].clone()
    mask[:, 0] = False
    x = batch[model.config.hook_point_in]
    model.init_encoder_bias_from_mean_pre(x, mask=mask)
    pre = model.encode_pre(x)[mask]
    torch.testing.assert_close(pre.mean(dim=0), torch.zeros(model.config.d_sae, dtype=pre.dtype), rtol=0, atol=1e-10)


def test_initializer_capabilities(make_model, raw_batch):
    model = make_model()
    model.set_decoder_norm(2.5)
    torch.testing.assert_close(model.decoder_norm(), torch.full((12,), 2.5, dtype=torch.float64))
    model.init_encoder_from_decoder(0.5)
    torch.testing.assert_close(model.W_V, model.W_O * 0.5)
    label = raw_batch(model)[model.config.hook_point_out]
    model.init_active_subspace(label, 3)
    flat = label.reshape(-1, 12)
    _, _, vh = torch.linalg.svd(flat - flat.mean(0), full_matrices=False)
    residual = model.W_O - model.W_O @ vh[:3].T @ vh[:3]
    assert float(residual.detach().abs().max()) < 1e-10
    with pytest.raises(LmsaeError, match="integer in"):
        model.init_active_subspace(label, 13)


def test_z_pattern_matches_the_explicit_loop_and_sums_to_the_pre_activation(make_model, raw_batch):
    model = make_model(qk_norm="rms", rotary_style="gptj")
    x = raw_batch(model)[model.config.hook_point_in]
    P = {k: v.detach().numpy() for k, v in model.named_parameters()}
    A = model.attention_pattern(x).detach().numpy()
    pre = ref_pre(model, x)
    for feature, position in [(0, 0), (5, 6), (11, 3)]:
        h = feature // model.config.ov_group_size
        z = model.z_pattern(x[1], feature, position).detach().numpy()
        expected = [A[1, h, position, s] * (x[1, s].numpy() @ P["W_V"][feature] + P["b_V"][feature])
                    if s <= position else 0.0 for s in range(x.shape[1])]
        np.testing.assert_allclose(z, expected, rtol=1e-12, atol=1e-14)
        assert z.sum() == pytest.approx(pre[1, position, feature], rel=1e-10, abs=1e-12)
        assert np.all(z[position + 1:] == 0)
    batched = model.z_pattern(x, 5, 6)
    assert batched.shape == (3, 7)
    torch.testing.assert_close(batched[1], model.z_pattern(x[1], 5, 6))


def test_sample_extras_keep_the_largest_contributions_sparsely(make_model, raw_batch):
    model = make_model()
    x = raw_batch(model, T=7)[model.config.hook_point_in]
    acts = model.encode(x)
    seqs, feats, pos = np.array([0, 2, 1]), np.array([1, 7, 11]), np.array([6, 3, 0])
    extras = model.sample_extras(x, acts, seqs, feats, pos, fraction=0.05, max_sources=4)
    positions, values = extras["z_pattern_positions"], extras["z_pattern_values"]
    assert positions.shape == values.shape == (3, 4) and positions.dtype == np.int32 and values.dtype == np.float32
    full = model.z_patterns(x, torch.as_tensor(seqs), torch.as_tensor(feats), torch.as_tensor(pos)).numpy()
    for k in range(3):
        total = abs(full[k].sum())
        stored = positions[k] >= 0
        # what is stored: the largest |contributions| >= 5% of |h|, in decreasing order, exact values
        kept = [int(p) for p in positions[k][stored]]
        assert kept == sorted(kept, key=lambda s: -abs(full[k, s]))
        np.testing.assert_allclose(values[k][stored], full[k, kept], rtol=1e-6)
        assert all(abs(full[k, s]) >= 0.05 * total for s in kept)
        missing = [s for s in range(7) if s not in kept and abs(full[k, s]) >= 0.05 * total and full[k, s] != 0]
        assert not missing or len(kept) == 4
        assert np.all(values[k][~stored] == 0) and all(s <= pos[k] for s in kept)
    # a query at position 0 reads only itself
    assert positions[2][0] == 0 and np.all(positions[2][1:] == -1)


def test_training_metrics_split_l0_by_qk_head(make_model, raw_batch):
    model = make_model(act_fn="topk", top_k=4)
    batch = raw_batch(model)
    mask = batch["mask"].clone()
    mask[0, :3] = False
    acts = model.encode(batch[model.config.hook_point_in])
    m = model.training_metrics({"acts": acts, "mask": mask})
    assert sorted(m) == [f"lorsa/l0_qk_head_{h}" for h in range(3)]
    overall = float((acts != 0).sum(-1)[mask].double().mean())
    assert sum(m.values()) == pytest.approx(overall) and 3.0 <= overall <= 4.0
    first = float((acts[..., :4] != 0).sum(-1)[mask].double().mean())
    assert m["lorsa/l0_qk_head_0"] == pytest.approx(first)


def test_config_errors_name_the_field(make_config):
    cases = [
        (dict(d_sae=13), "d_sae", "multiple of n_qk_heads"),
        (dict(hook_point_out="blocks.0.ln1.hook_normalized"), "hook_point_out", "differ"),
        (dict(rotary_dim=5), "rotary_dim", "even"),
        (dict(rotary_dim=8), "rotary_dim", "<= d_qk_head"),
        (dict(positional_embedding="none", ntk_by_parts=True), "ntk_by_parts", "rotary"),
        (dict(positional_embedding="none", rotary_dim=4), "rotary_dim", "unset"),
        (dict(ntk_by_parts=True, ntk_low_freq_factor=4.0, ntk_high_freq_factor=2.0), "ntk_high_freq_factor", "> ntk_low"),
        (dict(hook_point_in="mask"), "hook_point_in", "reserved"),
    ]
    for options, field, words in cases:
        with pytest.raises(FieldValueError) as info:
            make_config(**options)
        assert info.value.field == field and words in info.value.message, (options, str(info.value))


def test_config_errors_from_a_file_point_at_the_key(registry):
    from lmsae.config.base import DictionaryConfig
    from lmsae.errors import ConfigError

    data = registry.unstructure(make := LorsaConfig(hook_point_in="a", hook_point_out="b", d_model=4, n_qk_heads=2,
                                                    d_qk_head=2, d_sae=4, n_ctx=8))
    assert make.ov_group_size == 2
    data["d_sae"] = 5
    with pytest.raises(ConfigError) as info:
        registry.structure(data, DictionaryConfig)
    assert any("d_sae" in p and "multiple" in p for p in info.value.problems)


def test_analysis_extras_per_feature(make_model, registry):
    model = make_model()
    spec = registry.architecture("lorsa")
    extras = spec.analysis_extras(model, np.array([0, 4, 11]))
    assert extras["qk_head"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(extras["decoder_norm"], model.decoder_norm().detach()[[0, 4, 11]].numpy())
    np.testing.assert_allclose(extras["value_norm"], model.encoder_norm().detach()[[0, 4, 11]].numpy())


def test_float32_model_agrees_with_float64(make_model, raw_batch):
    model = make_model()
    x = raw_batch(model)[model.config.hook_point_in]
    f32 = make_model().float()
    torch.testing.assert_close(f32.forward(x.float()).double(), model.forward(x), rtol=1e-4, atol=1e-4)
