"""SAELens export/import: exact round trips, hand-written SAELens files, refusals."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder
from lmsae.errors import CheckpointError, LmsaeError
from lmsae.interop import export_saelens, import_saelens

HOOK = "blocks.5.hook_resid_post"


def build(seed: int = 0, **kw) -> SparseAutoEncoder:
    """A float64 SAE with perturbed parameters (non-unit decoder norms, non-zero biases)."""
    cfg = SAEConfig(**{"hook_point_in": HOOK, "d_model": 8, "d_sae": 20, "top_k": 3, "normalization": "none",
                       "jumprelu_init_threshold": 0.3, **kw})
    model = SparseAutoEncoder(cfg).double()
    g = torch.Generator().manual_seed(seed)
    model.reset_parameters(g)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def batch(n: int = 16, seed: int = 1, d: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {HOOK: torch.randn(n, d, generator=g, dtype=torch.float64) * 5.0 + 1.0}


@pytest.mark.parametrize("act_fn", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("gating", [False, True])
@pytest.mark.parametrize("apply", [False, True])
@pytest.mark.parametrize("normalization", ["none", "dataset"])
def test_round_trip_is_exact(tmp_path: pathlib.Path, act_fn, gating, apply, normalization):
    model = build(act_fn=act_fn, decoder_norm_gating=gating, apply_decoder_bias_to_input=apply,
                  normalization=normalization, dataset_norms={HOOK: 7.5} if normalization == "dataset" else {})
    b = batch()
    reference = model.forward_raw(b)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    export_saelens(model, tmp_path / "sl")
    # the caller's model is untouched
    assert model.config.normalization == normalization
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k

    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[act_fn]
    assert cfg["d_in"] == 8 and cfg["d_sae"] == 20 and cfg["dtype"] == "float64"
    assert cfg["hook_name"] == HOOK and cfg["hook_layer"] == 5 and cfg["hook_head_index"] is None
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["normalize_activations"] == "none"
    assert cfg["apply_b_dec_to_input"] is apply
    assert cfg.get("k") == (3 if act_fn == "topk" else None)
    weights = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if act_fn == "jumprelu" else set())
    if gating:  # the ungated form has unit-norm decoder rows
        torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.ones(20, dtype=torch.float64))

    loaded = import_saelens(tmp_path / "sl")
    assert loaded.config.act_fn == act_fn and loaded.config.normalization == "none"
    assert loaded.config.apply_decoder_bias_to_input is apply and not loaded.config.decoder_norm_gating
    assert next(loaded.parameters()).dtype == torch.float64
    out = loaded.forward_raw(b)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    # the same features fire, on the raw scale divided by the gate's decoder norm
    x = model.normalize(b)[HOOK]
    n = model.decoder_norm() if gating else torch.ones(20, dtype=torch.float64)
    scale = model.hook_scales(b)[HOOK]
    torch.testing.assert_close(loaded.encode(b[HOOK]), model.encode(x) * n / scale, rtol=1e-10, atol=1e-10)


def test_model_without_decoder_bias_exports_zero_bias(tmp_path: pathlib.Path):
    model = build(act_fn="relu", use_decoder_bias=False)
    export_saelens(model, tmp_path / "nb")
    weights = load_file(str(tmp_path / "nb" / "sae_weights.safetensors"))
    assert bool((weights["b_dec"] == 0).all())
    cfg = json.loads((tmp_path / "nb" / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is False
    b = batch()
    torch.testing.assert_close(import_saelens(tmp_path / "nb").forward_raw(b), model.forward_raw(b))


def test_export_options(tmp_path: pathlib.Path):
    from lmsae.registry import load_registry

    model = build(act_fn="topk").float()
    reg = load_registry()
    export_saelens(model, tmp_path / "o", hook_name="blocks.11.hook_resid_pre", registry=reg, model_name="gpt2")
    cfg = json.loads((tmp_path / "o" / "cfg.json").read_text())
    assert cfg["hook_layer"] == 11 and cfg["metadata"]["model_name"] == "gpt2" and cfg["dtype"] == "float32"
    assert cfg["lmsae_config"]["architecture"] == "sae" and cfg["lmsae_config"]["hook_point_in"] == HOOK
    loaded = import_saelens(tmp_path / "o")
    assert loaded.config.hook_point_in == "blocks.11.hook_resid_pre"
    assert next(loaded.parameters()).dtype == torch.float32
    # re-exporting into the same directory replaces it
    export_saelens(build(act_fn="relu"), tmp_path / "o")
    assert json.loads((tmp_path / "o" / "cfg.json").read_text())["architecture"] == "standard"


@pytest.mark.parametrize("kw,match", [
    ({"hook_point_out": "blocks.5.hook_mlp_out", "act_fn": "relu"}, "transcoder"),
    ({"use_glu_encoder": True}, "GLU"),
    ({"act_fn": "batchtopk"}, "batchtopk"),
    ({"normalization": "token"}, "normalization = 'token'"),
    ({"normalization": "batch"}, "normalization = 'batch'"),
])
def test_export_refusals(tmp_path: pathlib.Path, kw, match):
    with pytest.raises(LmsaeError, match=match):
        export_saelens(build(**kw), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_needs_dataset_norms(tmp_path: pathlib.Path):
    with pytest.raises(LmsaeError, match="no dataset norm"):
        export_saelens(build(normalization="dataset"), tmp_path / "x")


# --- hand-written SAELens files ---------------------------------------------------------------------------


def write_saelens(path: pathlib.Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def random_weights(d_in=6, d_sae=14, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g, dtype=dtype),
            "b_enc": torch.randn(d_sae, generator=g, dtype=dtype) * 0.5,
            "W_dec": torch.randn(d_sae, d_in, generator=g, dtype=dtype),
            "b_dec": torch.randn(d_in, generator=g, dtype=dtype)}


def naive(cfg: dict, w: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens' documented inference semantics, written out."""
    x_in = x - w["b_dec"] * (1.0 if cfg.get("apply_b_dec_to_input", True) else 0.0)
    h = x_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "jumprelu":
        f = h * (h > w["threshold"])
    elif cfg["architecture"] == "topk":
        top = h.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(h).scatter(-1, top.indices, torch.relu(top.values))
    else:
        f = torch.relu(h)
    return f @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("apply", [False, True])
def test_import_hand_written_file(tmp_path: pathlib.Path, arch, apply):
    w = random_weights()
    cfg = {"architecture": arch, "d_in": 6, "d_sae": 14, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply, "normalize_activations": "none",
           "metadata": {"hook_name": "blocks.2.hook_resid_pre", "hook_head_index": None}}
    if arch == "topk":
        cfg["k"] = 4
    if arch == "jumprelu":
        w["threshold"] = torch.rand(14, generator=torch.Generator().manual_seed(8)) + 0.1
    model = import_saelens(write_saelens(tmp_path / arch, cfg, w))
    assert model.config.hook_point_in == "blocks.2.hook_resid_pre" and model.config.n_features == 14
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(4)) * 2
    out = model.forward_raw({"blocks.2.hook_resid_pre": x})
    torch.testing.assert_close(out, naive(cfg, w, x), rtol=1e-5, atol=1e-5)
    if arch == "topk":
        assert model.config.top_k == 4


def test_import_pre_6_layout(tmp_path: pathlib.Path):
    """Pre-6.0 files: top-level hook_point, activation_fn_str/kwargs, boolean normalize, default apply."""
    w = random_weights(seed=5)
    cfg = {"d_in": 6, "d_sae": 14, "hook_point": "blocks.0.hook_resid_pre", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 3}, "normalize_activations": False}
    model = import_saelens(write_saelens(tmp_path / "old", cfg, {**w, "scaling_factor": torch.ones(14)}))
    assert model.config.act_fn == "topk" and model.config.top_k == 3
    assert model.config.apply_decoder_bias_to_input  # SAELens' default when the key is absent
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.forward_raw({"blocks.0.hook_resid_pre": x}),
                               naive({**cfg, "architecture": "topk", "k": 3}, w, x), rtol=1e-5, atol=1e-5)


BASE = {"architecture": "standard", "d_in": 6, "d_sae": 14, "normalize_activations": "none",
        "apply_b_dec_to_input": False, "metadata": {"hook_name": "blocks.1.hook_resid_post"}}


@pytest.mark.parametrize("change,match", [
    ({"architecture": "gated"}, r"cfg.json: 'architecture' = 'gated' is not supported"),
    ({"normalize_activations": "expected_average_only_in"}, r"cfg.json: 'normalize_activations'"),
    ({"d_in": None}, r"cfg.json: missing key 'd_in'"),
    ({"d_sae": 0}, r"cfg.json: 'd_sae' must be a positive integer"),
    ({"architecture": "topk"}, r"cfg.json: missing key 'k'"),
    ({"metadata": {}}, r"cfg.json: missing key 'metadata.hook_name'"),
    ({"reshape_activations": "hook_z"}, r"'reshape_activations'"),
    ({"metadata": {"hook_name": "h", "hook_head_index": 3}}, r"'hook_head_index' = 3"),
    ({"activation_fn_str": "tanh-relu"}, r"activation function 'tanh-relu'"),
])
def test_import_rejects_config(tmp_path: pathlib.Path, change, match):
    cfg = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(CheckpointError, match=match):
        import_saelens(write_saelens(tmp_path / "bad", cfg, random_weights()))


def test_import_rejects_weights(tmp_path: pathlib.Path):
    w = random_weights()
    missing = {k: v for k, v in w.items() if k != "b_enc"}
    with pytest.raises(CheckpointError, match=r"sae_weights.safetensors: missing tensor 'b_enc'"):
        import_saelens(write_saelens(tmp_path / "a", BASE, missing))
    with pytest.raises(CheckpointError, match=r"tensor 'W_dec' has shape \(6, 14\)"):
        import_saelens(write_saelens(tmp_path / "b", BASE, {**w, "W_dec": w["W_dec"].T}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['extra'\]"):
        import_saelens(write_saelens(tmp_path / "c", BASE, {**w, "extra": torch.ones(2)}))
    jr = {**BASE, "architecture": "jumprelu"}
    with pytest.raises(CheckpointError, match=r"missing tensor 'threshold'"):
        import_saelens(write_saelens(tmp_path / "d", jr, w))
    with pytest.raises(CheckpointError, match=r"'threshold' must be finite and > 0"):
        import_saelens(write_saelens(tmp_path / "e", jr, {**w, "threshold": torch.zeros(14)}))
    with pytest.raises(CheckpointError, match=r"cfg.json: no such file"):
        import_saelens(tmp_path / "nowhere")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "cfg.json").write_text(json.dumps(BASE))
    with pytest.raises(CheckpointError, match=r"sae_weights.safetensors: no such file"):
        import_saelens(tmp_path / "f")
    (tmp_path / "f" / "cfg.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        import_saelens(tmp_path / "f")
