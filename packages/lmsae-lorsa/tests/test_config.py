"""Lorsa configs as a user meets them: rules checked when the config is read, with the key named."""

from __future__ import annotations

import pytest
from lmsae.config.base import RunConfig
from lmsae.errors import ConfigError
from lmsae.registry import load_registry

IN, OUT = "blocks.0.ln1.hook_normalized", "blocks.0.hook_attn_out"


def _stream(layout: str) -> dict:
    return {"layout": layout, "batch_size": 4,
            "sources": [{"type": "synthetic", "d_model": 16, "n_features": 32, "mean_active": 2.0, "hook_point": IN,
                         "hook_point_out": OUT, "context_size": 8, "batch_size": 4}]}


def _train(layout: str = "sequences", eval_layout: str | None = None) -> dict:
    data = {"task": "train", "output_dir": "runs/x",
            "dictionary": {"architecture": "lorsa", "hook_point_in": IN, "hook_point_out": OUT, "d_model": 16,
                           "n_qk_heads": 2, "d_qk_head": 8, "d_sae": 8, "n_ctx": 8},
            "activations": _stream(layout), "trainer": {"total_training_tokens": 64}}
    if eval_layout is not None:
        data["eval_activations"] = _stream(eval_layout)
    return data


@pytest.mark.parametrize("key", ["activations", "eval_activations"])
def test_a_train_config_on_single_tokens_fails_when_read(key):
    registry = load_registry()
    registry.structure(_train(eval_layout="sequences"), RunConfig)  # the valid one
    data = _train(**({"layout": "tokens"} if key == "activations" else {"eval_layout": "tokens"}))
    with pytest.raises(ConfigError) as err:
        registry.structure(data, RunConfig)
    assert err.value.problems == [f"$.{key}.layout: architecture 'lorsa' reads whole sequences (got layout = "
                                  "'tokens'): set layout = \"sequences\""]
