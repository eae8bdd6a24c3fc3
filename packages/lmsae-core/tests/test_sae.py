"""The built-in SAE / transcoder: maths against naive loops, config validation, init capabilities."""

from __future__ import annotations

import math
import types

import pytest
import torch

from lmsae.config.base import DictionaryConfig
from lmsae.config.fields import FieldValueError
from lmsae.dictionary.sae import (
    SAE_SPEC,
    SAEConfig,
    SparseAutoEncoder,
    sae_example_config,
    sae_sharding_rules,
)
from lmsae.errors import ConfigError, LmsaeError, ShapeError
from lmsae.hookspecs import hookimpl
from lmsae.registry import load_registry

HOOK = "blocks.3.hook_resid_post"


def make(seed: int = 0, **kw) -> SparseAutoEncoder:
    """A float64 SAE with every parameter perturbed (biases non-zero)."""
    cfg = SAEConfig(**{"hook_point_in": HOOK, "d_model": 6, "d_sae": 10, "normalization": "none", **kw})
    model = SparseAutoEncoder(cfg).double()
    g = torch.Generator().manual_seed(seed)
    model.reset_parameters(generator=g)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 + 0.3


@torch.no_grad()
def naive_forward(m: SparseAutoEncoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature acts, reconstruction) with explicit loops over tokens and features."""
    cfg = m.config
    n, f, o = x.shape[0], cfg.n_features, cfg.output_width
    acts = torch.zeros(n, f, dtype=x.dtype)
    dec_norm = [math.sqrt(sum(float(m.W_D[i, j]) ** 2 for j in range(o))) for i in range(f)]
    for t in range(n):
        xin = [float(x[t, j]) - (float(m.b_D[j]) if cfg.apply_decoder_bias_to_input else 0.0)
               for j in range(cfg.d_model)]
        pre = []
        for i in range(f):
            h = sum(xin[j] * float(m.W_E[j, i]) for j in range(cfg.d_model)) + float(m.b_E[i])
            if cfg.use_glu_encoder:
                g = sum(xin[j] * float(m.W_E_glu[j, i]) for j in range(cfg.d_model)) + float(m.b_E_glu[i])
                h *= 1.0 / (1.0 + math.exp(-g))
            pre.append(h * dec_norm[i] if cfg.decoder_norm_gating else h)
        if cfg.act_fn == "relu":
            out = [max(h, 0.0) for h in pre]
        elif cfg.act_fn == "jumprelu":
            theta = m.activation.threshold.tolist()
            out = [h if h > theta[i] else 0.0 for i, h in enumerate(pre)]
        else:  # topk (per token)
            keep = sorted(range(f), key=lambda i: -pre[i])[: cfg.top_k]
            out = [max(pre[i], 0.0) if i in keep else 0.0 for i in range(f)]
        if cfg.decoder_norm_gating:
            out = [v / dec_norm[i] for i, v in enumerate(out)]
        acts[t] = torch.tensor(out, dtype=x.dtype)
    recon = torch.zeros(n, o, dtype=x.dtype)
    for t in range(n):
        for j in range(o):
            v = sum(float(acts[t, i]) * float(m.W_D[i, j]) for i in range(f))
            recon[t, j] = v + (float(m.b_D[j]) if cfg.use_decoder_bias else 0.0)
    return acts, recon


# --- maths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("gating", [False, True])
@pytest.mark.parametrize("extra", [{}, {"use_glu_encoder": True}, {"apply_decoder_bias_to_input": True},
                                   {"use_glu_encoder": True, "apply_decoder_bias_to_input": True},
                                   {"use_decoder_bias": False}])
def test_forward_matches_naive_loops(act_fn, gating, extra):
    m = make(act_fn=act_fn, decoder_norm_gating=gating, top_k=3, jumprelu_init_threshold=0.4, **extra)
    x = rand(5, 6)
    acts, recon = naive_forward(m, x)
    torch.testing.assert_close(m.encode(x), acts, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.forward(x), recon, rtol=1e-12, atol=1e-12)
    assert bool((acts != 0).any()) and bool((acts == 0).any())


def test_transcoder_widths_and_maths():
    m = make(hook_point_out="blocks.3.hook_mlp_out", d_out=4, act_fn="relu")
    assert m.W_D.shape == (10, 4) and m.b_D.shape == (4,) and m.W_E.shape == (6, 10)
    assert m.hook_dims() == {HOOK: 6, "blocks.3.hook_mlp_out": 4}
    x = rand(3, 6)
    torch.testing.assert_close(m.forward(x), naive_forward(m, x)[1], rtol=1e-12, atol=1e-12)
    batch = m.example_batch(3)
    assert m.forward_raw(batch).shape == (3, 4)


def test_batchtopk_keeps_k_per_token_on_average():
    m = make(act_fn="batchtopk", top_k=2)
    x = rand(7, 6)
    acts = m.encode(x)
    assert int((acts > 0).sum()) <= 2 * 7
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    masked = m.encode(x, mask=mask)
    assert bool((masked[~mask] == 0).all())


def test_context_axis_is_supported():
    m = make(act_fn="topk", top_k=3)
    x = rand(2, 5, 6)
    out = m.forward(x)
    assert out.shape == (2, 5, 6)
    torch.testing.assert_close(out.reshape(10, 6), m.forward(x.reshape(10, 6)))


def test_decode_sparse_equals_dense():
    m = make(act_fn="topk", top_k=3)
    x = rand(2, 4, 6)
    acts = m.encode(x)
    values, indices = acts.topk(3, dim=-1)
    torch.testing.assert_close(m.decode_sparse(indices, values), m.decode(acts), rtol=1e-12, atol=1e-12)
    no_bias = make(act_fn="topk", top_k=3, use_decoder_bias=False)
    acts = no_bias.encode(x)
    values, indices = acts.topk(3, dim=-1)
    torch.testing.assert_close(no_bias.decode_sparse(indices, values), no_bias.decode(acts), rtol=1e-12, atol=1e-12)
    with pytest.raises(ShapeError):
        m.decode_sparse(indices, values[..., :2])


def test_norms():
    m = make()
    torch.testing.assert_close(m.decoder_norm(), torch.stack([m.W_D[i].norm() for i in range(10)]))
    torch.testing.assert_close(m.encoder_norm(), torch.stack([m.W_E[:, i].norm() for i in range(10)]))


def test_gating_uses_live_decoder_norm_without_detaching():
    # Chosen behaviour: the gate's decoder norm is NOT detached. act(h·n)/n is homogeneous in n
    # where it is differentiable, so the decoder gets a zero gradient through the gate, but the
    # graph is connected (double backward and functional transforms see the true function).
    for act in ("relu", "jumprelu", "topk"):
        m = make(act_fn=act, decoder_norm_gating=True, top_k=3, jumprelu_init_threshold=0.4)
        acts = m.encode(rand(5, 6))
        (grad,) = torch.autograd.grad(acts.sum(), m.W_D)
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-12, rtol=0)
    # and the selection really depends on the decoder norm: scaling one decoder row changes it
    m = make(act_fn="topk", decoder_norm_gating=True, top_k=2)
    x = rand(4, 6)
    before = m.encode(x) > 0
    with torch.no_grad():
        m.W_D[int(before[0].nonzero()[0])].mul_(1e-3)
    assert not torch.equal(m.encode(x) > 0, before)


# --- parameters, init, rules --------------------------------------------------------------------------


def test_parameters_per_config():
    names = lambda **kw: sorted(n for n, _ in make(**kw).named_parameters())  # noqa: E731
    assert names() == ["W_D", "W_E", "b_D", "b_E"]
    assert names(use_decoder_bias=False) == ["W_D", "W_E", "b_E"]
    assert names(use_glu_encoder=True, act_fn="jumprelu") == [
        "W_D", "W_E", "W_E_glu", "activation.log_threshold", "b_D", "b_E", "b_E_glu"]
    for kw in ({}, {"use_decoder_bias": False}, {"use_glu_encoder": True, "act_fn": "jumprelu"}):
        model = make(**kw)
        assert set(sae_sharding_rules(model.config)) == {n for n, _ in model.named_parameters()}


def test_reset_parameters():
    m = SparseAutoEncoder(SAEConfig(hook_point_in=HOOK, d_model=8, d_sae=20, act_fn="jumprelu",
                                    jumprelu_init_threshold=0.3, use_glu_encoder=True))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    m.reset_parameters(torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.decoder_norm(), torch.ones(20))
    assert torch.equal(m.W_E, m.W_D.T)
    assert bool((m.b_E == 0).all()) and bool((m.b_D == 0).all()) and bool((m.b_E_glu == 0).all())
    assert bool((m.W_E_glu.abs() <= 1 / math.sqrt(8)).all()) and bool(m.W_E_glu.isfinite().all())
    torch.testing.assert_close(m.activation.threshold, torch.full((20,), 0.3))
    other = SparseAutoEncoder(m.config)
    other.reset_parameters(torch.Generator().manual_seed(0))
    for (n, a), (_, b) in zip(m.named_parameters(), other.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    # a transcoder of another width gets its own unit-norm encoder columns
    tc = SparseAutoEncoder(SAEConfig(hook_point_in="a", hook_point_out="b", d_model=8, d_out=5, d_sae=12))
    torch.testing.assert_close(tc.encoder_norm(), torch.ones(12))
    torch.testing.assert_close(tc.decoder_norm(), torch.ones(12))


def test_example_config_and_spec():
    cfg = sae_example_config()
    assert cfg.hook_point_in == "blocks.0.hook_resid_post" and cfg.d_model == 16 and cfg.n_features == 64
    assert cfg.act_fn == "topk" and cfg.top_k == 4
    assert SAE_SPEC.name == "sae" and SAE_SPEC.model_class is SparseAutoEncoder


# --- capabilities used by the initializer ---------------------------------------------------------


def test_set_decoder_norm_exact():
    m = make()
    m.set_decoder_norm(2.5)
    torch.testing.assert_close(m.decoder_norm(), torch.full((10,), 2.5, dtype=torch.float64))
    with pytest.raises(LmsaeError):
        m.set_decoder_norm(0.0)


def test_init_encoder_from_decoder():
    m = make()
    m.init_encoder_from_decoder(0.5)
    torch.testing.assert_close(m.W_E, m.W_D.T * 0.5, rtol=0, atol=0)
    tc = make(hook_point_out="out", d_out=4)
    with pytest.raises(LmsaeError, match="encoder_from_decoder"):
        tc.init_encoder_from_decoder(1.0)


def test_init_decoder_bias():
    m = make()
    mean = rand(6)
    m.init_decoder_bias(mean)
    assert torch.equal(m.b_D, mean)
    with pytest.raises(ShapeError):
        m.init_decoder_bias(rand(5))
    with pytest.raises(LmsaeError, match="use_decoder_bias"):
        make(use_decoder_bias=False).init_decoder_bias(mean)


@pytest.mark.parametrize("apply", [False, True])
def test_init_encoder_bias_from_mean_pre(apply):
    m = make(apply_decoder_bias_to_input=apply)
    x = rand(50, 6)
    m.init_encoder_bias_from_mean_pre(x)
    torch.testing.assert_close(m.encode_pre(x).mean(dim=0), torch.zeros(10, dtype=torch.float64), atol=1e-12, rtol=0)
    # masked tokens are ignored
    mask = torch.arange(50) % 3 != 0
    x2 = x.clone()
    x2[~mask] = 1e6
    m.init_encoder_bias_from_mean_pre(x2, mask=mask)
    torch.testing.assert_close(m.encode_pre(x[mask]).mean(dim=0), torch.zeros(10, dtype=torch.float64),
                               atol=1e-9, rtol=0)


def test_init_active_subspace():
    m = make()
    g = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64)).Q  # (6, 2)
    labels = torch.randn(40, 2, generator=g, dtype=torch.float64) @ basis.T + rand(6, seed=9)
    m.init_active_subspace(labels, 2)
    projected = m.W_D @ basis @ basis.T
    torch.testing.assert_close(projected, m.W_D, atol=1e-10, rtol=0)
    torch.testing.assert_close(m.decoder_norm(), torch.ones(10, dtype=torch.float64))
    with pytest.raises(LmsaeError, match="active subspace dimension"):
        m.init_active_subspace(labels, 7)


# --- config validation ------------------------------------------------------------------------------


def test_expansion_factor_and_d_sae():
    assert SAEConfig(hook_point_in=HOOK, d_model=16).n_features == 128
    assert SAEConfig(hook_point_in=HOOK, d_model=16).expansion_factor == 8.0
    cfg = SAEConfig(hook_point_in=HOOK, d_model=16, d_sae=100)
    assert cfg.n_features == 100 and cfg.expansion_factor is None
    assert SAEConfig(hook_point_in=HOOK, d_model=16, d_sae=40, expansion_factor=2.5).n_features == 40
    with pytest.raises(FieldValueError, match=r"d_sae: 100 disagrees with expansion_factor=4"):
        SAEConfig(hook_point_in=HOOK, d_model=16, d_sae=100, expansion_factor=4.0)
    with pytest.raises(FieldValueError, match="set d_sae or expansion_factor"):
        SAEConfig(hook_point_in=HOOK, d_model=16, expansion_factor=None)
    with pytest.raises(FieldValueError, match="expansion_factor"):
        SAEConfig(hook_point_in=HOOK, d_model=16, expansion_factor=0.01)


def test_width_and_bias_validation():
    with pytest.raises(FieldValueError, match=r"d_out: 8 differs from d_model=16.*only a transcoder"):
        SAEConfig(hook_point_in=HOOK, d_model=16, d_out=8)
    with pytest.raises(FieldValueError, match="d_out"):
        SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK, d_model=16, d_out=8)
    assert SAEConfig(hook_point_in=HOOK, hook_point_out="x", d_model=16, d_out=8).output_width == 8
    assert SAEConfig(hook_point_in=HOOK, d_model=16, d_out=16).output_width == 16
    with pytest.raises(FieldValueError, match=r"apply_decoder_bias_to_input: the decoder bias has the output width"):
        SAEConfig(hook_point_in=HOOK, hook_point_out="x", d_model=16, d_out=8, apply_decoder_bias_to_input=True)
    with pytest.raises(FieldValueError, match="needs use_decoder_bias"):
        SAEConfig(hook_point_in=HOOK, d_model=16, use_decoder_bias=False, apply_decoder_bias_to_input=True)
    # a same-width transcoder may subtract b_D from its input
    SAEConfig(hook_point_in=HOOK, hook_point_out="x", d_model=16, apply_decoder_bias_to_input=True)


@pytest.mark.parametrize("field,value", [("d_model", 0), ("top_k", 0), ("jumprelu_init_threshold", 0.0),
                                         ("jumprelu_bandwidth", -1.0), ("jumprelu_bandwidth", float("inf")),
                                         ("d_sae", -3), ("hook_point_in", "")])
def test_range_validation(field, value):
    kw = {"hook_point_in": HOOK, "d_model": 16, field: value}
    with pytest.raises(FieldValueError) as info:
        SAEConfig(**kw)
    assert info.value.field == field


@hookimpl
def _register():
    return [SAE_SPEC]


def _registry():
    if "sae" in load_registry().names("architecture"):
        return load_registry()
    module = types.ModuleType("lmsae_sae_testplugin_validation")
    module.lmsae_register_architectures = _register  # type: ignore[attr-defined]
    return load_registry(plugins=(module,))


def test_loader_reports_cross_field_errors_with_paths():
    reg = _registry()
    data = {"architecture": "sae", "hook_point_in": HOOK, "d_model": 16, "d_sae": 100, "expansion_factor": 4}
    with pytest.raises(ConfigError) as info:
        reg.structure(data, DictionaryConfig)
    assert info.value.problems == [
        "$.d_sae: 100 disagrees with expansion_factor=4.0 (int(d_model * expansion_factor) = int(16 * 4.0) = 64); "
        "set only one of them"]
    with pytest.raises(ConfigError) as info:
        reg.structure({"architecture": "sae", "hook_point_in": HOOK, "d_model": 16, "d_out": 8}, DictionaryConfig)
    assert info.value.problems[0].startswith("$.d_out: 8 differs from d_model=16")
    with pytest.raises(ConfigError) as info:
        reg.structure({"architecture": "sae", "hook_point_in": HOOK, "d_model": 16, "act_fn": "topkk"},
                      DictionaryConfig)
    assert info.value.problems[0].startswith("$.act_fn:")
    # d_sae alone (no expansion factor in the file) is valid and round-trips
    cfg = reg.structure({"architecture": "sae", "hook_point_in": HOOK, "d_model": 16, "d_sae": 100}, DictionaryConfig)
    assert cfg.n_features == 100
    assert reg.structure(reg.unstructure(cfg), DictionaryConfig) == cfg


def test_equal_weights_are_saved_as_identical_bytes(tmp_path):
    from safetensors import safe_open

    from lmsae.dictionary.io import WEIGHTS_FILE, load_dictionary, save_dictionary

    registry = load_registry(entry_points=False)
    model = make(top_k=3, act_fn="topk")
    metadata = {"training": "completed", "note": "x", "a": "y"}
    saved = [(save_dictionary(model, tmp_path / f"d{i}", registry, metadata=metadata) / WEIGHTS_FILE).read_bytes()
             for i in range(6)]
    # safetensors.torch.save_file kept the metadata in a hash map: its order (and the bytes) varied
    assert all(b == saved[0] for b in saved)
    back = load_dictionary(tmp_path / "d0", registry)
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    with safe_open(str(tmp_path / "d0" / WEIGHTS_FILE), "pt") as f:
        assert f.metadata() == {"format": "lmsae-dictionary", "lmsae_version": f.metadata()["lmsae_version"],
                                "architecture": "sae", **metadata}
