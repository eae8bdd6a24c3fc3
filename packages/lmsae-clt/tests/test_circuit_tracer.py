"""Export to and import from circuit-tracer's CLT layout: file layout, semantics, round trip."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lmsae.cli import main
from lmsae.dictionary import load_dictionary, save_dictionary
from lmsae.errors import CheckpointError, LmsaeError
from lmsae_clt.circuit_tracer import export_circuit_tracer, import_circuit_tracer


def circuit_tracer_forward(directory, inputs: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's CLT inference, written from its file layout: inputs (n, L, d) -> outputs (n, L, d)."""
    n_layers = inputs.shape[1]
    enc = [load_file(str(directory / f"W_enc_{i}.safetensors")) for i in range(n_layers)]
    dec = [load_file(str(directory / f"W_dec_{i}.safetensors")) for i in range(n_layers)]
    feats = []
    for i in range(n_layers):
        g = inputs[:, i] @ enc[i][f"W_enc_{i}"].T.double() + enc[i][f"b_enc_{i}"].double()
        if f"threshold_{i}" in enc[i]:
            feats.append(g * (g > enc[i][f"threshold_{i}"].double()))
        else:
            feats.append(torch.relu(g))
    out = torch.zeros(inputs.shape[0], n_layers, inputs.shape[2], dtype=torch.float64)
    for j in range(n_layers):
        out[:, j] = enc[j][f"b_dec_{j}"].double()
        for i in range(j + 1):
            out[:, j] += feats[i] @ dec[i][f"W_dec_{i}"][:, j - i].double()
    return out


@pytest.mark.parametrize("act_fn, gating, normalization", [
    ("relu", False, "none"),
    ("jumprelu", False, "dataset"),
    ("jumprelu", True, "dataset"),
    ("relu", True, "none"),
])
def test_export_matches_circuit_tracer_semantics_and_round_trips(make_model, raw_batch, tmp_path, act_fn, gating,
                                                                 normalization):
    model = make_model(n_layers=3, d_model=6, d_sae=5, act_fn=act_fn, decoder_norm_gating=gating,
                       normalization=normalization, jumprelu_init_threshold=0.4)
    batch = raw_batch(model, n=12)
    reference = model.forward_raw(batch).detach()
    export_circuit_tracer(model, tmp_path / "ct", model_name="toy")
    assert model.config.normalization == normalization  # exported from a copy

    names = sorted(p.name for p in (tmp_path / "ct").iterdir())
    assert names == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors", "W_enc_0.safetensors",
                     "W_enc_1.safetensors", "W_enc_2.safetensors", "config.yaml"]
    for i in range(3):
        enc = load_file(str(tmp_path / "ct" / f"W_enc_{i}.safetensors"))
        expected = {f"W_enc_{i}": (5, 6), f"b_enc_{i}": (5,), f"b_dec_{i}": (6,)}
        if act_fn == "jumprelu":
            expected[f"threshold_{i}"] = (5,)
        assert {k: tuple(v.shape) for k, v in enc.items()} == expected
        dec = load_file(str(tmp_path / "ct" / f"W_dec_{i}.safetensors"))
        assert {k: tuple(v.shape) for k, v in dec.items()} == {f"W_dec_{i}": (5, 3 - i, 6)}
    meta = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert meta["model_kind"] == "cross_layer_transcoder" and meta["model_name"] == "toy"
    assert meta["feature_input_hook"] == "ln2.hook_normalized" and meta["feature_output_hook"] == "hook_mlp_out"

    x, _ = model.prepare_input(batch)  # raw inputs
    torch.testing.assert_close(circuit_tracer_forward(tmp_path / "ct", x), reference, rtol=1e-9, atol=1e-9)

    back = import_circuit_tracer(tmp_path / "ct", dtype=torch.float64)
    assert back.config.act_fn == act_fn and back.config.normalization == "none"
    assert back.config.hooks_in == model.config.hooks_in and back.config.hooks_out == model.config.hooks_out
    torch.testing.assert_close(back.forward_raw(batch), reference, rtol=1e-9, atol=1e-9)
    # export -> import -> export gives the same files
    export_circuit_tracer(back, tmp_path / "ct2")
    for i in range(3):
        for kind in ("enc", "dec"):
            a = load_file(str(tmp_path / "ct" / f"W_{kind}_{i}.safetensors"))
            b = load_file(str(tmp_path / "ct2" / f"W_{kind}_{i}.safetensors"))
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)


def test_float32_round_trip_is_exact_without_gating(make_model, raw_batch, tmp_path):
    model = make_model(act_fn="jumprelu", dtype=torch.float32, jumprelu_init_threshold=0.4)
    export_circuit_tracer(model, tmp_path / "ct")
    back = import_circuit_tracer(tmp_path / "ct")
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        if name == "activation.log_threshold":  # stored as θ, not log θ: exp/log may move one ulp
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b), name
    batch = raw_batch(model)
    torch.testing.assert_close(back.forward_raw(batch), model.forward_raw(batch), rtol=1e-6, atol=1e-6)


def test_hooks_of_non_consecutive_layers_survive_the_round_trip(make_config, make_model, tmp_path):
    from lmsae_clt.config import CLTConfig

    cfg = CLTConfig(hook_points_in=["blocks.5.hook_resid_mid", "blocks.7.hook_resid_mid"],
                    hook_points_out=["blocks.5.hook_mlp_out", "blocks.7.hook_mlp_out"], d_model=4, d_sae=3,
                    act_fn="relu", normalization="none")
    export_circuit_tracer(make_model(cfg), tmp_path / "ct")
    meta = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert meta["lmsae"]["hook_points_in"] == cfg.hook_points_in
    assert import_circuit_tracer(tmp_path / "ct").config.hook_points_out == cfg.hook_points_out


def test_import_of_a_plain_circuit_tracer_directory(tmp_path):
    """Files as circuit-tracer writes them (no lmsae block; a zero threshold; a {layer} template)."""
    g = torch.Generator().manual_seed(0)
    n_layers, n_feat, d = 2, 4, 3
    for i in range(n_layers):
        save_file({f"W_enc_{i}": torch.randn(n_feat, d, generator=g), f"b_enc_{i}": torch.randn(n_feat, generator=g),
                   f"b_dec_{i}": torch.randn(d, generator=g),
                   f"threshold_{i}": torch.tensor([0.0, 0.1, 0.2, 0.3])}, str(tmp_path / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": torch.randn(n_feat, n_layers - i, d, generator=g)},
                  str(tmp_path / f"W_dec_{i}.safetensors"))
    (tmp_path / "config.yaml").write_text("model_name: toy\nmodel_kind: cross_layer_transcoder\n"
                                          "feature_input_hook: blocks.{layer}.hook_resid_mid\n"
                                          "feature_output_hook: hook_mlp_out\n")
    model = import_circuit_tracer(tmp_path, dtype=torch.float64)
    assert model.config.hooks_in == ("blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid")
    assert model.config.hooks_out == ("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out")
    x = torch.randn(9, n_layers, d, generator=g, dtype=torch.float64)
    batch = {h: x[:, i] for i, h in enumerate(model.config.hooks_in)}
    batch.update({h: torch.zeros(9, d, dtype=torch.float64) for h in model.config.hooks_out})
    torch.testing.assert_close(model.forward_raw(batch), circuit_tracer_forward(tmp_path, x), rtol=1e-6, atol=1e-6)


def test_refusals_and_bad_directories(make_model, tmp_path):
    with pytest.raises(LmsaeError, match="to-jumprelu"):
        export_circuit_tracer(make_model(act_fn="topk", top_k=2), tmp_path / "a")
    with pytest.raises(LmsaeError, match="single width"):
        export_circuit_tracer(make_model(act_fn="relu", d_out=4), tmp_path / "b")
    with pytest.raises(LmsaeError, match="depends on the data"):
        export_circuit_tracer(make_model(act_fn="relu", normalization="token"), tmp_path / "c")
    with pytest.raises(CheckpointError, match="config.yaml"):
        import_circuit_tracer(tmp_path)
    export_circuit_tracer(make_model(act_fn="relu"), tmp_path / "d")
    (tmp_path / "d" / "W_dec_1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="W_dec_1"):
        import_circuit_tracer(tmp_path / "d")
    export_circuit_tracer(make_model(act_fn="relu"), tmp_path / "e")
    text = (tmp_path / "e" / "config.yaml").read_text().replace("cross_layer_transcoder", "transcoder_set")
    (tmp_path / "e" / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="transcoder_set"):
        import_circuit_tracer(tmp_path / "e")


def test_cli_export_and_import(make_model, raw_batch, registry, tmp_path, capsys):
    model = make_model(act_fn="jumprelu", dtype=torch.float32, jumprelu_init_threshold=0.4, decoder_norm_gating=True)
    save_dictionary(model, tmp_path / "dict", registry)
    main(["clt", "export-circuit-tracer", str(tmp_path / "dict"), str(tmp_path / "ct"), "--model-name", "smollm2"],
         registry=registry)
    main(["clt", "import-circuit-tracer", str(tmp_path / "ct"), str(tmp_path / "back")], registry=registry)
    out = capsys.readouterr().out
    assert "exported" in out and "imported" in out
    back = load_dictionary(tmp_path / "back", registry)
    batch = raw_batch(model)
    torch.testing.assert_close(back.forward_raw(batch), model.forward_raw(batch), rtol=1e-5, atol=1e-5)
