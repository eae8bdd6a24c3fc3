"""Initialisation from a language model's attention layer: a Lorsa copied from a TransformerLens
attention layer reproduces its patterns (RoPE, GQA, QK-norm, layer-norm weights, NTK-by-parts) and,
with ±basis directions and ReLU, its output exactly."""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch
import transformer_lens as tl
from lmsae.errors import LmsaeError
from lmsae_lorsa.config import LorsaConfig
from lmsae_lorsa.init import attention_settings, init_from_attention
from lmsae_lorsa.model import LowRankSparseAttention

pytestmark = pytest.mark.lm

IN, OUT = "blocks.1.ln1.hook_normalized", "blocks.1.hook_attn_out"


def tiny(seed: int = 0, **kw):
    """A 2-layer attention-only HookedTransformer in float64, every attention/norm parameter random."""
    base = dict(n_layers=2, d_model=24, d_head=6, n_heads=4, d_vocab=60, n_ctx=32, attn_only=True,
                positional_embedding_type="rotary", rotary_dim=6, rotary_base=500, normalization_type="RMS",
                dtype=torch.float64, device="cpu")
    cfg = tl.HookedTransformerConfig(**{**base, **kw})
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.manual_seed(seed)
        model = tl.HookedTransformer(cfg, move_to_device=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("blocks.1."):
                    p.add_(0.3 * torch.randn_like(p))  # biases, norm weights and biases non-trivial
    return model


def run(hooked, T: int = 9, n: int = 3, seed: int = 1):
    tokens = torch.randint(0, hooked.cfg.d_vocab, (n, T), generator=torch.Generator().manual_seed(seed))
    _, cache = hooked.run_with_cache(tokens)
    batch = {IN: cache[IN], OUT: cache[OUT], "mask": torch.ones(n, T, dtype=torch.bool)}
    return batch, cache["blocks.1.attn.hook_pattern"]


def lorsa_for(hooked, *, repeat: int = 1, group: int | None = None, normalization: str = "dataset",
              **kw) -> LowRankSparseAttention:
    settings = attention_settings(hooked, 1)
    n_heads = settings.pop("n_qk_heads")
    G = group or 2 * settings["d_qk_head"]
    cfg = LorsaConfig(hook_point_in=IN, hook_point_out=OUT, n_qk_heads=n_heads * repeat, d_sae=n_heads * repeat * G,
                      n_ctx=32, normalization=normalization,
                      dataset_norms={IN: 3.7, OUT: 0.8} if normalization == "dataset" else {},
                      **{"act_fn": "relu", **settings, **kw})
    return LowRankSparseAttention(cfg).double()


def basis_directions(model: LowRankSparseAttention) -> torch.Tensor:
    e = model.config.d_qk_head
    eye = torch.eye(e, dtype=torch.float64)
    return torch.cat([eye, -eye]).expand(model.config.n_qk_heads, 2 * e, e)


MODELS = {
    "neox-rms": dict(),
    "gptj-layernorm": dict(rotary_adjacent_pairs=True, normalization_type="LN"),
    "gqa-partial-rotary": dict(n_key_value_heads=2, rotary_dim=4),
    "ntk-by-parts": dict(use_NTK_by_parts_rope=True, NTK_original_ctx_len=16, NTK_by_parts_factor=4.0,
                         NTK_by_parts_low_freq_factor=1.0, NTK_by_parts_high_freq_factor=4.0),
    "qk-norm-gqa": dict(use_qk_norm=True, n_key_value_heads=1),
    "absolute-positions": dict(positional_embedding_type="standard", normalization_type="LN"),
}


@pytest.mark.parametrize("name", MODELS)
def test_copied_heads_reproduce_the_patterns_and_the_output(name):
    hooked = tiny(**MODELS[name])
    batch, pattern = run(hooked)
    model = lorsa_for(hooked)
    init_from_attention(model, hooked, directions=basis_directions(model))
    x, _ = model.prepare_input(model.normalize(batch))
    # TransformerLens computes NTK-by-parts frequencies in float32
    tol = 1e-6 if name == "ntk-by-parts" else 1e-10
    torch.testing.assert_close(model.attention_pattern(x), pattern, rtol=0, atol=tol)
    # ± basis directions with ReLU: each group is its head's OV circuit, exactly
    torch.testing.assert_close(model.forward_raw(batch), batch[OUT], rtol=0, atol=100 * tol)
    # and after folding, on raw activations
    model.fold_normalization()
    torch.testing.assert_close(model.forward_raw(batch), batch[OUT], rtol=0, atol=100 * tol)


def test_repeated_qk_heads_follow_their_source_head():
    hooked = tiny(n_key_value_heads=2)
    batch, pattern = run(hooked)
    model = lorsa_for(hooked, repeat=3, group=4, normalization="none")
    report = init_from_attention(model, hooked, generator=torch.Generator().manual_seed(0))
    assert report["source_heads"] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    x, _ = model.prepare_input(batch)
    torch.testing.assert_close(model.attention_pattern(x), pattern.repeat_interleave(3, dim=1), rtol=0, atol=1e-10)
    torch.testing.assert_close(model.decoder_norm(), torch.ones(48, dtype=torch.float64))


def test_active_subspace_per_head_and_output_scale_fit():
    hooked = tiny()
    batch, _ = run(hooked, T=16, n=6)
    model = lorsa_for(hooked, group=20, act_fn="topk", top_k=5)
    report = init_from_attention(model, hooked, batch=batch, generator=torch.Generator().manual_seed(0),
                                 subspace_dim=2)
    assert report["subspace_dim"] == 2
    attn, ln = hooked.blocks[1].attn, hooked.blocks[1].ln1
    x_raw = batch[IN].reshape(-1, 24)
    u = report["directions"].double()
    for h in range(4):
        W_V = ln.w[:, None] * attn.W_V[h]
        values = x_raw @ W_V + attn.b_V[h]
        _, _, vh = torch.linalg.svd(values.detach(), full_matrices=False)
        top = vh[:2]
        outside = u[h] - u[h] @ top.T @ top  # every direction lies in the head's top-2 value subspace
        assert float(outside.abs().max()) < 1e-6
    # the fitted output scale beats the unfitted one, and the report's EV is the model's own
    fitted = report["explained_variance"]
    x, _ = model.prepare_input(model.normalize(batch))
    label = model.normalize(batch)[OUT]
    recon = model.forward(x).detach()
    ev = 1 - float((recon - label).pow(2).sum() / (label - label.reshape(-1, 24).mean(0)).pow(2).sum())
    assert ev == pytest.approx(fitted, abs=1e-9)
    plain = lorsa_for(hooked, group=20, act_fn="topk", top_k=5)
    init_from_attention(plain, hooked, batch=batch, generator=torch.Generator().manual_seed(0), subspace_dim=2,
                        fit_output_scale=False)
    recon = plain.forward(x).detach()
    ev_plain = 1 - float((recon - label).pow(2).sum() / (label - label.reshape(-1, 24).mean(0)).pow(2).sum())
    assert fitted > ev_plain and fitted > 0.2


def test_the_proposed_initializer_capability_is_init_from_attention():
    hooked = tiny()
    batch, _ = run(hooked)
    a, b = lorsa_for(hooked, group=5), lorsa_for(hooked, group=5)
    report = a.initialize_from_language_model(hooked, batch, generator=torch.Generator().manual_seed(3))
    init_from_attention(b, hooked, batch=batch, generator=torch.Generator().manual_seed(3))
    assert report["layer"] == 1
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_mismatched_settings_name_the_values_to_use():
    hooked = tiny(rotary_adjacent_pairs=True)
    settings = attention_settings(hooked, 1)
    assert settings["rotary_style"] == "gptj" and settings["rotary_base"] == 500.0
    model = lorsa_for(hooked, rotary_style="neox", rotary_base=10_000.0)
    with pytest.raises(LmsaeError) as info:
        init_from_attention(model, hooked)
    assert "rotary_style = 'gptj'" in str(info.value) and "rotary_base = 500.0" in str(info.value)
    wrong_heads = LowRankSparseAttention(attrs.evolve(lorsa_for(hooked).config, n_qk_heads=3, d_sae=36))
    with pytest.raises(LmsaeError, match="n_qk_heads = 4"):
        init_from_attention(wrong_heads, hooked)
    wrong_hook = LowRankSparseAttention(attrs.evolve(lorsa_for(hooked).config,
                                                     hook_point_in="blocks.1.hook_resid_pre"))
    with pytest.raises(LmsaeError, match="ln1.hook_normalized"):
        init_from_attention(wrong_hook, hooked)
    token_norm = LowRankSparseAttention(attrs.evolve(lorsa_for(hooked).config, normalization="token"))
    with pytest.raises(LmsaeError, match="normalization"):
        init_from_attention(token_norm, hooked)


def test_unsupported_attention_is_refused():
    with pytest.raises(LmsaeError, match="alibi"):
        attention_settings(tiny(positional_embedding_type="alibi"), 1)
    with pytest.raises(LmsaeError, match="layer 5"):
        attention_settings(tiny(), 5)
    with pytest.raises(LmsaeError, match="TransformerLens"):
        init_from_attention(lorsa_for(tiny()), object())


@pytest.mark.lm
def test_smollm2_layer_three_grouped_query_attention():
    """The real model: GQA (9 query heads, 3 KV heads), NeoX RoPE with base 100000, folded RMSNorm."""
    from lmsae.models.transformer_lens import TransformerLensConfig, build_transformer_lens

    lm = build_transformer_lens(TransformerLensConfig(model="smollm2-135m", device="cpu"))
    settings = attention_settings(lm, 3)
    assert settings == {"d_model": 576, "d_qk_head": 64, "n_qk_heads": 9, "attn_scale": 8.0,
                        "positional_embedding": "rotary", "rotary_dim": 64, "rotary_base": 100_000.0,
                        "rotary_style": "neox", "ntk_by_parts": False, "qk_norm": "none"}
    tokens = torch.tensor([[lm.bos_token_id, *lm.tokenize(["def f(x):\n    return x + 1"])[0][:15]]])
    hooks = ["blocks.3.ln1.hook_normalized", "blocks.3.hook_attn_out", "blocks.3.attn.hook_pattern"]
    _, cache = lm.hooked.run_with_cache(tokens, names_filter=hooks)
    cfg = LorsaConfig(hook_point_in=hooks[0], hook_point_out=hooks[1], n_qk_heads=9, d_sae=9 * 128, n_ctx=128,
                      act_fn="relu", normalization="none", **{k: v for k, v in settings.items() if k != "n_qk_heads"})
    model = LowRankSparseAttention(cfg).double()
    init_from_attention(model, lm, directions=basis_directions(model))
    x = cache[hooks[0]].double()
    torch.testing.assert_close(model.attention_pattern(x), cache[hooks[2]].double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(model.forward(x), cache[hooks[1]].double(), rtol=0, atol=1e-4)


def test_an_exact_lorsa_spliced_into_the_model_changes_nothing():
    """Evaluation with the attention output replaced (core splice, mode "all"): a Lorsa reproducing
    the layer exactly leaves the loss unchanged, a perturbed one does not."""
    from lmsae.evaluation.splice import splice_losses
    from lmsae.models.transformer_lens import ByteTokenizer, TransformerLensConfig, TransformerLensModel

    hooked = tiny(n_key_value_heads=2, d_vocab=257)
    lm = TransformerLensModel(hooked, ByteTokenizer(), TransformerLensConfig(model="tiny-random", device="cpu"),
                              "tiny-rotary")
    model = lorsa_for(hooked)
    init_from_attention(model, hooked, directions=basis_directions(model))
    model.fold_normalization()
    tokens = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    out = splice_losses(lm, model, tokens, mask=mask)
    torch.testing.assert_close(out["spliced"], out["clean"], rtol=0, atol=1e-9)
    assert float(out["kl"].abs().max()) < 1e-9 and float(out["kl_ablated"].max()) > 1e-4
    with torch.no_grad():
        model.W_O.mul_(0.5)
    assert float(splice_losses(lm, model, tokens, mask=mask)["kl"].max()) > 1e-4
