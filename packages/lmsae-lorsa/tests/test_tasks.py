"""End to end on the tiny random TransformerLens model (absolute positions, unfolded LayerNorm):
``task = "lorsa_init"`` and ``lmsae lorsa init-from-model`` save a Lorsa copied from attention layer
1, and the train task continues it with ``[pretrained]`` then evaluates (splice) and analyses it."""

from __future__ import annotations

import io
import json
import pathlib

import pytest
import torch
from lmsae.cli import main
from lmsae.config.base import RunConfig
from lmsae.config.files import dumps_toml
from lmsae.dictionary.io import load_dictionary
from lmsae.errors import ConfigError
from lmsae.runtime import RunContext

pytestmark = [pytest.mark.lm, pytest.mark.slow]

IN, OUT = "blocks.1.ln1.hook_normalized", "blocks.1.hook_attn_out"
MODEL = {"backend": "transformer_lens", "model": "tiny-random", "device": "cpu"}
DICTIONARY = {"architecture": "lorsa", "hook_point_in": IN, "hook_point_out": OUT, "d_model": 64, "n_qk_heads": 4,
              "d_qk_head": 16, "d_sae": 64, "n_ctx": 64, "positional_embedding": "none", "act_fn": "topk",
              "top_k": 8}


def activations(split: str) -> dict:
    return {"layout": "sequences", "batch_size": 4, "prefetch": 0,
            "sources": [{"type": "text", "dataset": {"path": "builtin:python-docs", "split": split},
                         "context_size": 32, "model_batch_size": 4}]}


def init_config(out: pathlib.Path) -> dict:
    return {"task": "lorsa_init", "output_dir": str(out), "model": MODEL, "dictionary": DICTIONARY,
            "activations": activations("train[:90%]"), "calibration_batches": 2, "init_tokens": 256,
            "initializer": {"encoder_from_decoder": False}, "device": "cpu"}


def run_task(registry, data: dict) -> str:
    out = io.StringIO()
    cfg = registry.structure(data, RunConfig)
    registry.get("task", cfg.name).factory(cfg, RunContext(registry=registry, out=out, progress=False))
    return out.getvalue()


def test_lorsa_init_then_train_from_pretrained(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("LMSAE_STORE_DIR", str(tmp_path / "store"))
    text = run_task(registry, init_config(tmp_path / "init"))
    assert "copied attention layer 1 of tiny-random" in text and "explained variance" in text
    model = load_dictionary(tmp_path / "init", registry)
    assert model.config.normalization == "dataset" and set(model.config.dataset_norms) == {IN, OUT}

    # the copied heads reproduce the model's own patterns on the model's activations
    from lmsae.models.transformer_lens import TransformerLensConfig, build_transformer_lens

    lm = build_transformer_lens(TransformerLensConfig(model="tiny-random", device="cpu"))
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    _, cache = lm.hooked.run_with_cache(tokens)
    x, _ = model.prepare_input(model.normalize({IN: cache[IN], OUT: cache[OUT]}))
    torch.testing.assert_close(model.attention_pattern(x), cache["blocks.1.attn.hook_pattern"], rtol=0, atol=1e-5)

    train = {"task": "train", "output_dir": str(tmp_path / "trained"), "device": "cpu", "model": MODEL,
             "pretrained": {"path": str(tmp_path / "init")}, "activations": activations("train[:90%]"),
             "eval_activations": activations("train[90%:]"), "loggers": [{"type": "jsonl"}],
             "trainer": {"total_training_tokens": 4 * 32 * 3, "lr": 1e-3, "log_every": 1, "eval_tokens": 256},
             "after_training": {"evaluate": True, "evaluate_tokens": 256, "splice_tokens": 64, "analyze": True,
                                "analyze_tokens": 256}}
    text = run_task(registry, train)
    summary = json.loads((tmp_path / "trained" / "training_summary.json").read_text())
    assert summary["reason"] == "completed" and summary["steps"] == 3
    assert "CE loss recovered" in text and "analysed 64 features" in text
    metrics = json.loads((tmp_path / "trained" / "evaluation" / "evaluation.json").read_text())["metrics"]
    assert 0.0 < metrics["explained_variance"] <= 1.0 and "ce_loss_recovered" in metrics
    lines = (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()
    assert "lorsa/l0_qk_head_3" in json.loads(lines[-1])
    trained = load_dictionary(tmp_path / "trained", registry)
    assert trained.config.normalization == "none"  # folded at save

    # z-patterns of the kept contexts were stored with them in the same pass; they match the
    # contributions recomputed from the sample's tokens with the saved (folded) dictionary
    from lmsae.stores.configs import LocalStoreConfig
    from lmsae.stores.local import LocalStore

    with LocalStore(LocalStoreConfig(directory=tmp_path / "store")) as store:
        (record,) = store.list_dictionaries()
        stats = store.feature_statistics(record.name, record.series)
        busiest = int(stats["index"][stats["act_count"].argmax()])
        fa = store.get_feature_analysis(record.name, record.series, busiest)
    samples = [s for sampling in fa.samplings for s in sampling.samples]
    assert samples and all(set(s.extras) == {"z_pattern_positions", "z_pattern_values"} for s in samples)
    checked = 0
    for sample in samples[:6]:
        pos, val = sample.extras["z_pattern_positions"], sample.extras["z_pattern_values"]
        assert pos.shape == val.shape == (16,) and pos.dtype.kind == "i"
        peak = int(sample.activations.argmax())
        _, cache = lm.hooked.run_with_cache(torch.as_tensor(sample.tokens)[None])
        x, _ = trained.prepare_input(trained.normalize({IN: cache[IN], OUT: cache[OUT]}))
        contrib = trained.z_pattern(x[0], busiest, peak).double()
        stored = pos >= 0
        assert stored.any() and (pos[stored] <= peak).all()  # causal: sources at or before the query
        # the stored entries are the largest contributions, in order, with the same relative size
        expected = contrib.abs().argsort(descending=True)[:int(stored.sum())].numpy()
        assert pos[stored].tolist() == expected.tolist()
        ratio = torch.as_tensor(val[stored]).double() / contrib[expected]
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-3, atol=1e-3)
        checked += 1
    assert checked > 0


def test_init_from_model_command(registry, tmp_path):
    config = tmp_path / "train.toml"
    train = {"task": "train", "output_dir": str(tmp_path / "unused"), "device": "cpu", "model": MODEL,
             "dictionary": DICTIONARY, "activations": activations("train[:90%]"),
             "trainer": {"total_training_tokens": 1000}}
    config.write_text(dumps_toml(train))
    main(["lorsa", "init-from-model", str(config), str(tmp_path / "out"), "--set", "activations.batch_size=2"],
         registry=registry)
    model = load_dictionary(tmp_path / "out", registry)
    assert model.config.n_qk_heads == 4
    # a second run replaces it; a config without [dictionary] is refused with the key's path
    main(["lorsa", "init-from-model", str(config), str(tmp_path / "out")], registry=registry)
    no_dict = tmp_path / "pretrained.toml"
    no_dict.write_text(dumps_toml({**{k: v for k, v in train.items() if k != "dictionary"},
                                   "pretrained": {"path": str(tmp_path / "out")}}))
    with pytest.raises(SystemExit) as info:
        main(["lorsa", "init-from-model", str(no_dict), str(tmp_path / "x")], registry=registry)
    assert info.value.code == 2


def test_lorsa_init_config_errors(registry, tmp_path):
    data = init_config(tmp_path)
    bad = {**data, "activations": {**data["activations"], "layout": "tokens"}}
    with pytest.raises(ConfigError) as info:
        registry.structure(bad, RunConfig)
    assert any("sequences" in p for p in info.value.problems)
    sae = {**data, "dictionary": {"architecture": "sae", "hook_point_in": IN, "d_model": 64}}
    with pytest.raises(ConfigError) as info:
        registry.structure(sae, RunConfig)
    assert any("lorsa" in p for p in info.value.problems)


def test_train_initialises_from_the_language_model_in_one_run(registry, tmp_path, monkeypatch):
    """``[initializer] from_language_model = true``: the train task copies the attention layer itself
    (no separate lorsa_init run) and the copied heads reproduce the model's own patterns."""
    monkeypatch.setenv("LMSAE_STORE_DIR", str(tmp_path / "store"))
    train = {"task": "train", "output_dir": str(tmp_path / "trained"), "device": "cpu", "model": MODEL,
             "dictionary": {**DICTIONARY, "normalization": "dataset"}, "activations": activations("train[:90%]"),
             "initializer": {"encoder_from_decoder": False, "from_language_model": True},
             "trainer": {"total_training_tokens": 4 * 32, "lr": 1e-12, "log_every": 1, "calibration_batches": 2}}
    text = run_task(registry, train)
    assert "initialised from the language model" in text and "explained_variance" in text
    model = load_dictionary(tmp_path / "trained", registry)
    from lmsae.models.transformer_lens import TransformerLensConfig, build_transformer_lens

    lm = build_transformer_lens(TransformerLensConfig(model="tiny-random", device="cpu"))
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    _, cache = lm.hooked.run_with_cache(tokens)
    x, _ = model.prepare_input(model.normalize({IN: cache[IN], OUT: cache[OUT]}))
    # one step at lr 1e-12 leaves the copied QK heads in place
    torch.testing.assert_close(model.attention_pattern(x), cache["blocks.1.attn.hook_pattern"], rtol=0, atol=1e-4)


def test_from_language_model_errors(registry, tmp_path):
    base = {"task": "train", "output_dir": str(tmp_path / "x"), "device": "cpu", "model": MODEL,
            "dictionary": DICTIONARY, "activations": activations("train[:90%]"),
            "initializer": {"from_language_model": True}, "trainer": {"total_training_tokens": 128}}
    no_model = {k: v for k, v in base.items() if k != "model"}
    with pytest.raises(ConfigError) as info:
        registry.structure(no_model, RunConfig)
    assert any(p.startswith("$.initializer") and "[model]" in p for p in info.value.problems)
    sae = {**base, "dictionary": {"architecture": "sae", "hook_point_in": IN, "d_model": 64, "d_sae": 128},
           "activations": {**base["activations"], "layout": "tokens"}}
    with pytest.raises(ConfigError) as info:
        run_task(registry, sae)
    assert "cannot initialise from a language model" in str(info.value)
    assert not (tmp_path / "x" / "config.json").exists()
