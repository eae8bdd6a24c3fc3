"""The initializer: each step, its order, the grid search, and its errors."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

from lmsae.config.fields import FieldValueError
from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder
from lmsae.errors import LmsaeError
from lmsae.nn.losses import reconstruction_loss
from lmsae.testing.toy import ToyConfig, ToyDictionary
from lmsae.training.initializer import COARSE_GRID, InitializerConfig, fine_grid, initialize

HOOK = "blocks.2.hook_resid_post"


def sae(**kw) -> SparseAutoEncoder:
    cfg = SAEConfig(**{"hook_point_in": HOOK, "d_model": 8, "d_sae": 24, "act_fn": "relu",
                       "normalization": "dataset", "dataset_norms": {HOOK: 11.0}, **kw})
    return SparseAutoEncoder(cfg).double()


def raw_batch(n: int = 64, seed: int = 0, d: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 4.0 + torch.linspace(-3, 5, d, dtype=torch.float64)
    return {HOOK: x, "mask": torch.ones(n, dtype=torch.bool)}


def normalised(model, batch):
    return model.normalize(batch)[HOOK]


def test_defaults_reset_and_transpose():
    m = sae()
    report = initialize(m, InitializerConfig(), None)
    torch.testing.assert_close(m.W_E, m.W_D.T, rtol=0, atol=0)
    torch.testing.assert_close(m.decoder_norm(), torch.ones(24, dtype=torch.float64))
    assert bool((m.b_D == 0).all()) and bool((m.b_E == 0).all())
    assert report == {"decoder_norm": pytest.approx(1.0)}
    # seeded: the same seed gives the same dictionary, another seed another one
    again = sae()
    initialize(again, InitializerConfig(), None)
    assert torch.equal(again.W_D, m.W_D)
    other = sae()
    initialize(other, InitializerConfig(seed=1), None)
    assert not torch.equal(other.W_D, m.W_D)


def test_encoder_is_decoder_transpose_times_factor_and_norm_exact():
    m = sae()
    initialize(m, InitializerConfig(decoder_norm=0.37, encoder_from_decoder_factor=2.5), None)
    torch.testing.assert_close(m.decoder_norm(), torch.full((24,), 0.37, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(m.W_E, m.W_D.T * 2.5, rtol=0, atol=0)
    m2 = sae()
    initialize(m2, InitializerConfig(encoder_from_decoder=False, decoder_norm=3.0), None)
    assert not torch.allclose(m2.W_E, m2.W_D.T)


def test_decoder_bias_is_the_normalised_label_mean():
    m = sae()
    batch = raw_batch()
    batch["mask"][::4] = False  # masked tokens do not count
    initialize(m, InitializerConfig(decoder_bias="mean"), batch)
    xn = normalised(m, batch)
    torch.testing.assert_close(m.b_D, xn[batch["mask"]].mean(dim=0), rtol=1e-12, atol=1e-12)


def test_decoder_bias_for_a_transcoder_uses_the_labels():
    cfg = SAEConfig(hook_point_in="in", hook_point_out="out", d_model=8, d_out=5, d_sae=16, act_fn="relu",
                    normalization="dataset", dataset_norms={"in": 3.0, "out": 7.0})
    m = SparseAutoEncoder(cfg).double()
    g = torch.Generator().manual_seed(2)
    batch = {"in": torch.randn(30, 8, generator=g, dtype=torch.float64),
             "out": torch.randn(30, 5, generator=g, dtype=torch.float64) + 2.0}
    initialize(m, InitializerConfig(decoder_bias="mean", encoder_from_decoder=False), batch)
    torch.testing.assert_close(m.b_D, (batch["out"] * math.sqrt(5) / 7.0).mean(dim=0))


def test_encoder_bias_from_mean_pre_centres_the_pre_activations():
    m = sae(apply_decoder_bias_to_input=True)
    batch = raw_batch()
    initialize(m, InitializerConfig(decoder_bias="mean", encoder_bias_from_mean_pre=True), batch)
    pre = m.encode_pre(normalised(m, batch))
    torch.testing.assert_close(pre.mean(dim=0), torch.zeros(24, dtype=torch.float64), atol=1e-12, rtol=0)


def test_active_subspace_rows_lie_in_the_top_subspace():
    m = sae()
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64)).Q
    x = torch.randn(100, 3, generator=g, dtype=torch.float64) * 5 @ basis.T + 2.0
    batch = {HOOK: x}
    report = initialize(m, InitializerConfig(active_subspace_dim=3, decoder_norm=0.5), batch)
    residual = (m.W_D - m.W_D @ basis @ basis.T).detach()
    assert float(residual.abs().max()) < 1e-10
    torch.testing.assert_close(m.decoder_norm(), torch.full((24,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(m.W_E, m.W_D.T, rtol=0, atol=0)
    assert "loss" in report


def _loss_at(model_cfg_kwargs, init: InitializerConfig, batch, norm: float) -> float:
    m = sae(**model_cfg_kwargs)
    initialize(m, attrs.evolve(init, grid_search_decoder_norm=False, decoder_norm=norm), batch)
    xn = normalised(m, batch)
    with torch.no_grad():
        return float(reconstruction_loss(m.forward(xn), xn, ("batch", "d_model")))


@pytest.mark.parametrize("kw", [{"act_fn": "relu"}, {"act_fn": "topk", "top_k": 3}])
def test_grid_search_beats_every_coarse_candidate(kw):
    batch = raw_batch(48)
    init = InitializerConfig(grid_search_decoder_norm=True, encoder_bias_from_mean_pre=True, decoder_bias="mean")
    m = sae(**kw)
    report = initialize(m, init, batch)
    best = report["grid_search_best_norm"]
    torch.testing.assert_close(m.decoder_norm(), torch.full((24,), best, dtype=torch.float64))
    torch.testing.assert_close(m.W_E, m.W_D.T, rtol=0, atol=0)
    assert report["loss"] == pytest.approx(report["grid_search_loss"], rel=1e-12)
    for norm in COARSE_GRID:
        assert report["grid_search_loss"] <= _loss_at(kw, init, batch, norm) + 1e-12
    # the chosen point really is the loss at that norm, recomputed from scratch
    assert _loss_at(kw, init, batch, best) == pytest.approx(report["grid_search_loss"], rel=1e-9)


def test_grids():
    assert len(COARSE_GRID) == 50 and COARSE_GRID[0] == pytest.approx(0.1) and COARSE_GRID[-1] == pytest.approx(5.0)
    fine = fine_grid(1.0)
    assert len(fine) == 20 and fine[0] == pytest.approx(0.91) and fine[-1] == pytest.approx(1.1)
    assert all(v > 0 for v in fine_grid(0.1))


def test_missing_batch_is_a_clear_error():
    for cfg, name in ((InitializerConfig(decoder_bias="mean"), "decoder_bias"),
                      (InitializerConfig(grid_search_decoder_norm=True), "grid_search_decoder_norm"),
                      (InitializerConfig(encoder_bias_from_mean_pre=True), "encoder_bias_from_mean_pre"),
                      (InitializerConfig(active_subspace_dim=2), "active_subspace_dim")):
        with pytest.raises(LmsaeError, match=f"needs a batch.*initializer.{name}"):
            initialize(sae(), cfg, None)


def test_unsupported_capability_names_architecture_and_option():
    toy = ToyDictionary(ToyConfig(hook_point=HOOK, d_model=8, n_latents=16, normalization="none"))
    before = {n: p.clone() for n, p in toy.named_parameters()}
    with pytest.raises(LmsaeError) as info:
        initialize(toy, InitializerConfig(decoder_norm=2.0), raw_batch())
    msg = str(info.value)
    assert "'toy'" in msg and "initializer.decoder_norm = 2.0" in msg and "set_decoder_norm" in msg
    assert "initializer.encoder_from_decoder = true" in msg
    # nothing was touched before the error
    for n, p in toy.named_parameters():
        assert torch.equal(p, before[n])
    # with every option off, an architecture without capabilities is just reset
    report = initialize(toy, InitializerConfig(encoder_from_decoder=False), raw_batch())
    assert set(report) == {"decoder_norm", "loss"}


def test_a_transcoder_of_another_width_cannot_transpose():
    cfg = SAEConfig(hook_point_in="in", hook_point_out="out", d_model=8, d_out=5, d_sae=16, normalization="none")
    with pytest.raises(LmsaeError, match="encoder_from_decoder = false"):
        initialize(SparseAutoEncoder(cfg), InitializerConfig(), None)
    initialize(SparseAutoEncoder(cfg), InitializerConfig(encoder_from_decoder=False), None)


def test_config_validation():
    with pytest.raises(FieldValueError, match="decoder_norm: cannot be set together with grid_search"):
        InitializerConfig(decoder_norm=1.0, grid_search_decoder_norm=True)
    with pytest.raises(FieldValueError):
        InitializerConfig(active_subspace_dim=0)
    with pytest.raises(FieldValueError):
        InitializerConfig(encoder_from_decoder_factor=0.0)
