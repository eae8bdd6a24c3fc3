"""TopK -> JumpReLU conversion with per-layer thresholds: L0 and reconstruction preserved."""

from __future__ import annotations

import pytest
import torch

from lmsae.cli import main
from lmsae.dictionary import load_dictionary
from lmsae.errors import LmsaeError
from lmsae_clt.convert import calibrate_layer_thresholds, convert_topk_to_jumprelu, reconstruction_report


def test_trained_topk_clt_converts_with_l0_and_reconstruction_preserved(trained_topk_clt, layered_registry, held_out):
    model = load_dictionary(trained_topk_clt, layered_registry)
    calibration = held_out(layered_registry, n_chunks=4, start=2000)
    evaluation = held_out(layered_registry, n_chunks=4, start=3000)
    converted, report = convert_topk_to_jumprelu(model, calibration, evaluation)
    print("\n".join(report.lines()))
    assert converted.config.act_fn == "jumprelu" and model.config.act_fn == "topk"
    assert converted.activation.log_threshold.shape == (3, 48)
    assert all(t > 0 for t in report.thresholds)
    # every feature of a layer shares the layer's threshold
    theta = converted.activation.threshold.detach()
    assert torch.allclose(theta, theta[:, :1].expand_as(theta))
    assert report.calibration_l0 == pytest.approx([3.0] * 3, abs=0.05)
    for before, after in zip(report.l0_before, report.l0_after):
        assert after == pytest.approx(before, rel=0.1)
    assert report.ev_total_after == pytest.approx(report.ev_total_before, abs=0.05)
    for before, after in zip(report.ev_before, report.ev_after):
        assert after == pytest.approx(before, abs=0.08)
    # on the calibration tokens themselves the per-layer L0 is exact (up to ties)
    on_calibration = reconstruction_report(converted, calibration)
    assert on_calibration["l0"] == pytest.approx(report.calibration_l0, abs=1e-3)
    # weights are shared, the source model is untouched
    assert torch.equal(converted.W_E, model.W_E) and all(torch.equal(a, b) for a, b in zip(converted.W_D, model.W_D))


@pytest.mark.parametrize("gating", [False, True])
def test_batchtopk_single_batch_conversion_fires_exactly_the_same_entries(make_model, raw_batch, gating):
    model = make_model(n_layers=3, d_model=6, d_sae=10, act_fn="batchtopk", top_k=2, decoder_norm_gating=gating,
                       normalization="dataset")
    batch = raw_batch(model, n=40)
    converted, report = convert_topk_to_jumprelu(model, [batch])
    nb = model.normalize(batch)
    x, _ = model.prepare_input(nb)
    with torch.no_grad():
        before = model.encode(x, mask=batch["mask"])
        after = converted.encode(x, mask=batch["mask"])
    assert torch.equal(before > 0, after > 0)
    torch.testing.assert_close(after, before)
    assert report.l0_after == pytest.approx(report.l0_before)
    assert report.ev_total_after == pytest.approx(report.ev_total_before)


@pytest.mark.parametrize("act_fn, k", [("topk", 2), ("layertopk", 5), ("batchlayertopk", 5)])
def test_per_layer_l0_is_exact_on_the_calibration_tokens(make_model, raw_batch, act_fn, k):
    model = make_model(n_layers=3, d_model=6, d_sae=12, act_fn=act_fn, top_k=k, decoder_norm_gating=True)
    batches = [raw_batch(model, n=30, seed=s) for s in range(3)]
    for b in batches:
        b["mask"][::7] = False  # masked tokens count neither in the TopK nor in the calibration
    _, report = convert_topk_to_jumprelu(model, batches)
    assert report.calibration_tokens == sum(int(b["mask"].sum()) for b in batches)
    assert report.l0_after == pytest.approx(report.l0_before, abs=1e-9)
    assert report.l0_after == pytest.approx(report.calibration_l0, abs=1e-9)
    if act_fn != "topk":
        assert len({round(v, 6) for v in report.l0_before}) > 1  # layers differ: one threshold each


def test_thresholds_midway_between_the_last_kept_and_first_dropped_value(make_model, raw_batch):
    model = make_model(n_layers=2, d_model=4, d_sae=6, act_fn="batchtopk", top_k=1)
    batch = raw_batch(model, n=5)
    thresholds, counts, n = calibrate_layer_thresholds(model, [batch])
    assert n == 5 and counts.tolist() == [5, 5]
    x, _ = model.prepare_input(batch)
    h = torch.relu(model.encode_pre(x)).detach()
    for i in range(2):
        v = h[:, i].reshape(-1).sort(descending=True).values
        assert float(thresholds[i]) == pytest.approx(float(v[4] + v[5]) / 2)


def test_a_layer_that_never_fires_gets_a_threshold_above_every_value(make_model, raw_batch):
    model = make_model(n_layers=2, d_model=4, d_sae=6, act_fn="topk", top_k=2)
    with torch.no_grad():
        model.b_E[1].fill_(-1e3)  # layer 1 never fires
    batch = raw_batch(model, n=8)
    _, report = convert_topk_to_jumprelu(model, [batch])
    assert report.l0_before[1] == 0 and report.l0_after[1] == 0
    assert report.thresholds[1] > 0


def test_only_topk_clts_convert(make_model, raw_batch):
    model = make_model(act_fn="relu")
    with pytest.raises(LmsaeError, match="only TopK"):
        convert_topk_to_jumprelu(model, [raw_batch(model)])


def test_cli_to_jumprelu_prints_the_report_and_saves(trained_topk_clt, layered_registry, tmp_path, capsys):
    calibration = tmp_path / "calibration.toml"
    calibration.write_text('[activations]\nbatch_size = 256\nprefetch = 0\n\n[[activations.sources]]\n'
                           'type = "clt_test_layers"\nseed = 3\n')
    main(["clt", "to-jumprelu", str(trained_topk_clt), str(tmp_path / "jump"), "--calibration", str(calibration),
          "--tokens", "512", "--eval-tokens", "512", "--set", "activations.seed=1"], registry=layered_registry)
    out = capsys.readouterr()
    assert "L0 before" in out.out and "EV after" in out.out and "saved the JumpReLU CLT" in out.out
    converted = load_dictionary(tmp_path / "jump", layered_registry)
    assert converted.config.act_fn == "jumprelu"
    # a non-CLT dictionary and a file without [activations] are clear errors
    calibration.write_text("[trainer]\nlr = 1\n")
    with pytest.raises(SystemExit) as info:
        main(["clt", "to-jumprelu", str(trained_topk_clt), str(tmp_path / "x"), "--calibration", str(calibration)],
             registry=layered_registry)
    assert info.value.code == 2 and "activations" in capsys.readouterr().err
