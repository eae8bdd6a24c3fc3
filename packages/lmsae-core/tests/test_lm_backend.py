"""The TransformerLens backend on the tiny random model: hook points, early stopping, padding,
masks, losses with replacements, configuration and offline failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from lmsae.config.fields import FieldValueError, field_doc
from lmsae.errors import ConfigError, DataError, LmsaeError, ShapeError
from lmsae.models.base import LanguageModel
from lmsae.models.transformer_lens import (
    TRANSFORMER_LENS_SPEC,
    ByteTokenizer,
    TransformerLensConfig,
    TransformerLensModel,
    build_transformer_lens,
    resolve_cache_dir,
    stop_at_layer_for,
)
from lmsae.registry import Registry

pytestmark = pytest.mark.lm

EOS = ByteTokenizer.eos_token_id


def tiny(**overrides) -> TransformerLensModel:
    return build_transformer_lens(TransformerLensConfig(model="tiny-random", **overrides))


@pytest.fixture(scope="module")
def model() -> TransformerLensModel:
    return tiny()


def greedy_tokens(model: TransformerLensModel, batch: int = 4, length: int = 24) -> torch.Tensor:
    """Sequences the model predicts itself, so that it has a loss below uniform on them."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (batch, 2), generator=g).to(model.device)
    while tokens.shape[1] < length:
        nxt = model.logits(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


# --- the object ------------------------------------------------------------------------------


def test_tiny_model_implements_the_protocol(model):
    assert isinstance(model, LanguageModel)
    assert (model.name, model.d_model, model.n_layers, model.n_ctx, model.d_vocab) == ("tiny-random", 64, 2, 256, 1000)
    assert model.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert model.bos_token_id == model.eos_token_id == EOS
    assert model.pad_token_id == EOS  # the tokenizer has no pad token: padding falls back to EOS
    assert TRANSFORMER_LENS_SPEC.name == "transformer_lens"
    assert TRANSFORMER_LENS_SPEC.factory is build_transformer_lens


def test_modules_do_not_import_transformer_lens():
    code = ("import sys, lmsae.models.transformer_lens, lmsae.models.smollm2; "
            "print('transformer_lens' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_tiny_random_is_seeded_without_touching_the_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = tiny(seed=3), tiny(seed=3), tiny(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.hooked.W_E, b.hooked.W_E)
    assert not torch.equal(a.hooked.W_E, c.hooked.W_E)


def test_byte_tokenizer_round_trips_text_with_offsets(model):
    text = "héllo wörld"
    ids, offsets = model.tokenize_with_offsets([text])
    assert ids == model.tokenize([text]) == [list(text.encode())]
    assert model.tokenizer.decode(ids[0]) == text
    # "é" is two bytes: both point at the one character
    assert offsets[0][1] == offsets[0][2] == (1, 2)
    assert [text[a:b] for a, b in offsets[0]][:3] == ["h", "é", "é"]
    assert model.tokenizer.convert_ids_to_tokens([104, 10, EOS]) == ["h", "<0x0A>", "<|endoftext|>"]
    assert model.tokenizer.convert_tokens_to_ids(["h", "<|endoftext|>"]) == [104, EOS]
    assert model.tokenizer("ab").input_ids == [97, 98]
    assert model.tokenizer.decode([97, EOS, 98], skip_special_tokens=True) == "ab"


def test_make_batch_prepends_bos_truncates_and_right_pads(model):
    tokens, attention = model.make_batch([[1, 2, 3], [4]], context_size=3)
    assert tokens.tolist() == [[EOS, 1, 2], [EOS, 4, EOS]]
    assert attention.tolist() == [[1, 1, 1], [1, 1, 0]]
    tokens, attention = tiny(prepend_bos=False).make_batch([[1, 2], [4]], context_size=5, pad_to_context_size=True)
    assert tokens.tolist() == [[1, 2, EOS, EOS, EOS], [4, EOS, EOS, EOS, EOS]]
    with pytest.raises(DataError, match="context_size"):
        model.make_batch([[1]], context_size=1000)


# --- hook points -----------------------------------------------------------------------------


def test_hook_dims(model):
    dims = model.hook_dims(["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post",
                            "hook_embed", "hook_pos_embed", "ln_final.hook_normalized"])
    assert dims == {"blocks.1.hook_resid_post": 64, "blocks.0.attn.hook_z": 64, "blocks.0.mlp.hook_post": 256,
                    "hook_embed": 64, "hook_pos_embed": 64, "ln_final.hook_normalized": 64}
    assert "blocks.0.hook_resid_pre" in model.hook_names()
    assert "blocks.0.attn.hook_pattern" not in model.hook_names()


def test_unknown_hook_names_the_closest_valid_one(model):
    with pytest.raises(DataError) as info:
        model.hook_dims(["blocks.1.hook_resid_pots"])
    assert "'blocks.1.hook_resid_pots'" in str(info.value)
    assert "did you mean 'blocks.1.hook_resid_post'?" in str(info.value)
    with pytest.raises(DataError, match=r"has 2 layers \(blocks.0 to blocks.1\)"):
        model.activations(torch.zeros(1, 4, dtype=torch.long), ["blocks.7.hook_resid_post"])
    with pytest.raises(DataError, match="not a per-token activation"):
        model.hook_dims(["blocks.0.attn.hook_pattern"])
    with pytest.raises(DataError, match="not computed"):
        model.hook_dims(["blocks.0.attn.hook_result"])  # needs use_attn_result


# --- activations -----------------------------------------------------------------------------


def test_stop_at_layer_for():
    assert stop_at_layer_for(["hook_embed", "hook_pos_embed"]) == 0
    assert stop_at_layer_for(["blocks.0.hook_resid_pre"]) == 1
    assert stop_at_layer_for(["blocks.0.hook_resid_post", "blocks.11.attn.hook_z", "hook_embed"]) == 12
    assert stop_at_layer_for(["blocks.0.hook_resid_post", "ln_final.hook_normalized"]) is None


HOOKS = ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post",
         "blocks.1.hook_resid_post", "ln_final.hook_normalized"]


def test_activations_equal_a_full_run_with_cache(model):
    tokens = torch.randint(0, 1000, (3, 17), generator=torch.Generator().manual_seed(0))
    _, cache = model.hooked.run_with_cache(tokens)
    together = model.activations(tokens, HOOKS)
    for hook in HOOKS:
        expected = cache[hook].reshape(3, 17, -1)
        alone = model.activations(tokens, [hook])[hook]
        assert alone.shape == together[hook].shape == (3, 17, model.hook_dims([hook])[hook])
        torch.testing.assert_close(alone, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(together[hook], expected, rtol=0, atol=1e-6)
    assert not together["blocks.1.hook_resid_post"].requires_grad


class Spy:
    """Counts the calls of a block and records the stop_at_layer each forward pass received."""

    def __init__(self, model, monkeypatch):
        self.block_calls = [0] * model.n_layers
        self.stops: list = []
        for i, block in enumerate(model.hooked.blocks):
            block.register_forward_hook(lambda *_, i=i: self.block_calls.__setitem__(i, self.block_calls[i] + 1))
        forward = model.hooked.forward

        def spy(*args, **kwargs):
            self.stops.append(kwargs.get("stop_at_layer"))
            return forward(*args, **kwargs)

        monkeypatch.setattr(model.hooked, "forward", spy)


@pytest.mark.parametrize(("hook", "stop", "blocks_run"), [
    ("hook_embed", 0, [0, 0]),
    ("blocks.0.hook_resid_pre", 1, [1, 0]),
    ("blocks.0.hook_resid_post", 1, [1, 0]),
    ("blocks.1.attn.hook_z", 2, [1, 1]),
])
def test_activations_stop_after_the_last_block_needed(hook, stop, blocks_run, monkeypatch):
    model = tiny()  # its own instance: the spy stays on this one
    model.hook_names()  # the one-off shape probe runs the whole model: not what is measured here
    spy = Spy(model, monkeypatch)
    model.activations(torch.zeros(2, 5, dtype=torch.long), [hook])
    assert spy.stops == [stop]
    assert spy.block_calls == blocks_run


def test_right_padding_does_not_change_real_token_activations(model):
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23]]
    tokens, attention = model.make_batch(seqs)
    padded = model.activations(tokens, HOOKS, attention)
    other_pad = tokens.masked_fill(attention == 0, 77)  # the pad value must not matter either
    padded_other = model.activations(other_pad, HOOKS, attention)
    for i, s in enumerate(seqs):
        alone_tokens, _ = model.make_batch([s])
        alone = model.activations(alone_tokens, HOOKS)
        n = alone_tokens.shape[1]
        for hook in HOOKS:
            torch.testing.assert_close(padded[hook][i, :n], alone[hook][0], rtol=0, atol=1e-5)
            torch.testing.assert_close(padded_other[hook][i, :n], alone[hook][0], rtol=0, atol=1e-5)
    assert all(torch.isfinite(v).all() for v in padded.values())


def test_left_padding_uses_the_attention_mask(model):
    seq = [5, 6, 7, 8]
    alone = model.activations(torch.tensor([seq]), ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    tokens = torch.tensor([[EOS, EOS] + seq])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1]])
    left = model.activations(tokens, ["blocks.1.hook_resid_post"], attention)["blocks.1.hook_resid_post"]
    torch.testing.assert_close(left[0, 2:], alone[0], rtol=0, atol=1e-5)


def test_bad_token_tensors_are_rejected(model):
    with pytest.raises(ShapeError, match="integer tensor"):
        model.activations(torch.zeros(2, 3), ["hook_embed"])
    with pytest.raises(ShapeError, match="attention_mask"):
        model.activations(torch.zeros(2, 3, dtype=torch.long), ["hook_embed"], torch.ones(2, 4))
    with pytest.raises(DataError, match=r"token ids must be in \[0, 1000\)"):
        model.activations(torch.full((1, 3), 1000), ["hook_embed"])
    with pytest.raises(ShapeError, match="n_ctx=256"):
        model.activations(torch.zeros(1, 257, dtype=torch.long), ["hook_embed"])


# --- masks -----------------------------------------------------------------------------------


def test_mask_drops_bos_and_padding_but_keeps_eos_even_when_pad_is_eos(model):
    assert model.pad_token_id == model.eos_token_id
    tokens, attention = model.make_batch([[97, 98, EOS, 99], [97, EOS]])
    # [[BOS a b EOS c], [BOS a EOS pad pad]] where BOS = EOS = pad = 256
    mask = model.token_mask(tokens, attention)
    assert mask.tolist() == [[False, True, True, True, True], [False, True, True, False, False]]
    # without an attention mask nothing is padding: only the prepended BOS goes
    assert model.token_mask(tokens).tolist() == [[False, True, True, True, True], [False, True, True, True, True]]


def test_mask_eos_and_ignored_ids_and_bos_options():
    seqs = [[97, 98, EOS, 99], [97, EOS]]
    m = tiny(mask_eos=True)
    tokens, attention = m.make_batch(seqs)
    assert m.token_mask(tokens, attention).tolist() == [[False, True, True, False, True],
                                                        [False, True, False, False, False]]
    m = tiny(ignore_token_ids=[98, 99])
    assert m.token_mask(*m.make_batch(seqs)).tolist() == [[False, True, False, True, False],
                                                          [False, True, True, False, False]]
    m = tiny(mask_bos=False)
    assert m.token_mask(*m.make_batch(seqs)).tolist() == [[True] * 5, [True, True, True, False, False]]
    # BOS was not prepended by us: a first token that happens to be EOS is a real token
    m = tiny(prepend_bos=False)
    tokens, attention = m.make_batch([[EOS, 97], [97]])
    assert m.token_mask(tokens, attention).tolist() == [[True, True], [True, False]]


def test_mask_finds_bos_after_left_padding(model):
    tokens = torch.tensor([[EOS, EOS, 97, 98], [EOS, 97, 98, 99]])
    attention = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert model.token_mask(tokens, attention).tolist() == [[False, False, True, True], [False, True, True, True]]


# --- losses and replacements -----------------------------------------------------------------


def test_token_losses_equal_a_manual_log_softmax_gather(model):
    tokens = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(2)).to(model.device)
    losses = model.token_losses(tokens)
    assert losses.shape == (3, 11) and losses.dtype == torch.float32
    logp = model.hooked(tokens).log_softmax(-1)
    expected = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-5)
    assert model.logits(tokens).shape == (3, 12, 1000)


def test_replacements_splice_into_the_forward_pass(model):
    tokens = greedy_tokens(model)
    clean = model.token_losses(tokens)
    hook = "blocks.0.hook_resid_post"
    same = model.token_losses(tokens, replacements={hook: lambda act, name: act})
    assert torch.equal(same, clean)
    ablated = model.token_losses(tokens, replacements={hook: lambda act, name: torch.zeros_like(act)})
    assert ablated.mean() > clean.mean() + 0.1
    seen = {}

    def record(act, name):
        seen[name] = act.shape
        return act

    model.token_losses(tokens, replacements={"blocks.1.attn.hook_z": record})
    assert seen == {"blocks.1.attn.hook_z": (*tokens.shape, 64)}  # flattened like activations()


def test_bad_replacements_are_rejected(model):
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ShapeError, match="'blocks.0.hook_resid_post' returned shape"):
        model.logits(tokens, replacements={"blocks.0.hook_resid_post": lambda act, name: act[..., :3]})
    with pytest.raises(DataError, match="did you mean 'blocks.0.hook_resid_post'"):
        model.logits(tokens, replacements={"blocks.0.hook_resid_pots": lambda act, name: act})
    # hooks are removed after a failure: the next forward pass is clean
    torch.testing.assert_close(model.logits(tokens), model.hooked(tokens), rtol=0, atol=0)


# --- configuration ---------------------------------------------------------------------------


def test_config_defaults_and_docs():
    cfg = TransformerLensConfig()
    assert (cfg.model, cfg.dtype, cfg.device, cfg.fold_ln, cfg.center_writing_weights, cfg.center_unembed) == (
        "smollm2-135m", "float32", "auto", True, False, False)
    assert (cfg.prepend_bos, cfg.mask_bos, cfg.mask_eos, cfg.ignore_token_ids) == (True, True, False, [])
    import attrs

    assert all(field_doc(f) for f in attrs.fields(TransformerLensConfig))


def test_config_validation_messages():
    registry = Registry()
    with pytest.raises(ConfigError) as info:
        registry.structure({"dtype": "float8"}, TransformerLensConfig)
    assert "$.dtype: expected one of 'float32', 'float64', 'bfloat16', 'float16', got 'float8'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        registry.structure({"cache_dir": "/data/Llama-cache"}, TransformerLensConfig)
    assert "$.cache_dir: must not contain 'llama'" in str(info.value)
    with pytest.raises(FieldValueError, match="must be one of"):
        TransformerLensConfig(dtype="float8")
    with pytest.raises(FieldValueError, match="'auto' or a torch device"):
        TransformerLensConfig(device="gpu")
    with pytest.raises(FieldValueError, match="must not contain 'gemma'"):
        TransformerLensConfig(cache_dir="/x/gemma")
    assert TransformerLensConfig(device="cuda:1").device == "cuda:1"


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LMSAE_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.setenv("LMSAE_CACHE_DIR", str(tmp_path / "my-gemma"))
    with pytest.raises(ConfigError, match="LMSAE_CACHE_DIR.*contains 'gemma'"):
        resolve_cache_dir()
    monkeypatch.delenv("LMSAE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_cache_dir() == tmp_path / ".cache" / "lmsae"


def test_float64_tiny_model():
    m = tiny(dtype="float64")
    acts = m.activations(torch.zeros(1, 3, dtype=torch.long), ["blocks.0.hook_resid_post"])
    assert acts["blocks.0.hook_resid_post"].dtype == torch.float64
    assert m.token_losses(torch.zeros(1, 3, dtype=torch.long)).dtype == torch.float32


# --- other model sources ---------------------------------------------------------------------


def test_unknown_official_name_fails_fast_and_clearly():
    start = time.perf_counter()
    with pytest.raises(LmsaeError, match="not an official TransformerLens model name") as info:
        build_transformer_lens(TransformerLensConfig(model="tiny-randon", device="cpu"))
    assert "tiny-random" in str(info.value)  # suggested
    with pytest.raises(LmsaeError, match="does not exist"):
        build_transformer_lens(TransformerLensConfig(model="./no/such/dir", device="cpu"))
    assert time.perf_counter() - start < 30


def test_official_name_not_cached_offline_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(LmsaeError, match="'gpt2' is not in the local Hugging Face cache.*must be available locally"):
        build_transformer_lens(TransformerLensConfig(model="gpt2", device="cpu"))
    assert time.perf_counter() - start < 30


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory whose path contains 'llama'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(words), max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    directory = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_local_hugging_face_directory_matches_transformers(hf_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_transformer_lens(TransformerLensConfig(model=str(hf_llama_dir), device="cpu",
                                                         cache_dir=str(tmp_path / "cache")))
    assert (model.name, model.n_layers, model.d_model, model.d_vocab) == ("tiny-llama", 2, 64, 10)
    assert (model.bos_token_id, model.eos_token_id, model.pad_token_id) == (0, 1, 1)
    ids = model.tokenize(["the cat sat on the mat"])
    assert ids == [[3, 4, 5, 6, 3, 7]]
    tokens, _ = model.make_batch(ids)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_llama_dir), dtype=torch.float32)
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    torch.testing.assert_close(model.logits(tokens).log_softmax(-1), out.logits.log_softmax(-1),
                               rtol=0, atol=1e-4)
    resid = model.activations(tokens, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    torch.testing.assert_close(resid, out.hidden_states[1], rtol=0, atol=1e-4)
    # the 'llama' path went through a neutral symlink in the cache
    assert any((tmp_path / "cache" / "links").iterdir())
    assert os.path.realpath(next((tmp_path / "cache" / "links").iterdir())) == str(hf_llama_dir.resolve())
