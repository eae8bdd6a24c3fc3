"""The MOLT config: rank_counts from TOML (string keys), validation messages, no expansion factor."""

from __future__ import annotations

import json
import tomllib

import pytest

from lmsae.config.base import DictionaryConfig
from lmsae.config.fields import FieldValueError
from lmsae.errors import ConfigError
from lmsae.registry import load_registry

from lmsae_molt.config import MOLTConfig

IN, OUT = "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"

TOML = f"""
architecture = "molt"
hook_point_in = "{IN}"
hook_point_out = "{OUT}"
d_model = 576
act_fn = "topk"
top_k = 16

[rank_counts]
64 = 64
4 = 512
"16" = 256
"""


@pytest.fixture(scope="module")
def registry():
    return load_registry(strict=True)


def structure(registry, data):
    return registry.structure(data, DictionaryConfig)


def problems(registry, data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        structure(registry, data)
    return info.value.problems


def test_toml_rank_counts_with_string_keys(registry):
    cfg = structure(registry, tomllib.loads(TOML))
    assert isinstance(cfg, MOLTConfig)
    assert cfg.rank_groups == ((4, 512), (16, 256), (64, 64))
    assert cfg.ranks == (4, 16, 64) and cfg.counts == (512, 256, 64)
    assert cfg.n_features == 832 and cfg.total_rank == 4 * 512 + 16 * 256 + 64 * 64
    assert cfg.rank_counts == {"4": 512, "16": 256, "64": 64}
    assert cfg.output_width == 576


def test_int_keys_in_python_and_yaml_style_data_give_the_same_config(registry):
    from_python = MOLTConfig(hook_point_in=IN, hook_point_out=OUT, d_model=576, rank_counts={64: 64, 4: 512, 16: 256},
                             act_fn="topk", top_k=16)
    assert from_python == structure(registry, tomllib.loads(TOML))
    data = registry.unstructure(from_python)
    data["rank_counts"] = {4: 512, 16: 256, 64: 64}  # YAML reads bare numeric keys as ints
    assert structure(registry, data) == from_python
    # written back: string keys in ascending rank order, valid TOML and JSON
    assert registry.unstructure(from_python)["rank_counts"] == {"4": 512, "16": 256, "64": 64}
    assert structure(registry, json.loads(json.dumps(registry.unstructure(from_python)))) == from_python


@pytest.mark.parametrize("rank_counts, message", [
    ({}, "must not be empty"),
    ({"four": 3}, "rank 'four' is not a positive integer"),
    ({"0": 3}, "rank '0' must be >= 1"),
    ({"-2": 3}, "is not a positive integer"),
    ({"2.5": 3}, "is not a positive integer"),
    ({"4": 0}, "the count of rank 4 must be an integer >= 1"),
    ({"4": -1}, "the count of rank 4 must be an integer >= 1"),
    ({"4": 3, "04": 2}, "rank 4 is given twice"),
    ({"8": 3}, "rank 8 exceeds min(d_model, d_out) = 6"),
])
def test_invalid_rank_counts_are_located_errors(registry, rank_counts, message):
    data = {"architecture": "molt", "hook_point_in": IN, "hook_point_out": OUT, "d_model": 6,
            "rank_counts": rank_counts}
    found = problems(registry, data)
    assert any(p.startswith("$.rank_counts") and message in p for p in found), found


def test_counts_must_be_integers_not_booleans_or_fractions(registry):
    base = {"architecture": "molt", "hook_point_in": IN, "hook_point_out": OUT, "d_model": 6}
    assert any("rank_counts" in p for p in problems(registry, {**base, "rank_counts": {"2": 1.5}}))
    assert any("rank_counts" in p for p in problems(registry, {**base, "rank_counts": {"2": True}}))
    with pytest.raises(FieldValueError, match="count of rank 2"):
        MOLTConfig(hook_point_in=IN, hook_point_out=OUT, d_model=6, rank_counts={2: True})


@pytest.mark.parametrize("key", ["expansion_factor", "d_sae"])
def test_no_second_size_field(registry, key):
    data = {"architecture": "molt", "hook_point_in": IN, "hook_point_out": OUT, "d_model": 6, "rank_counts": {"2": 4},
            key: 8}
    found = problems(registry, data)
    assert any(p.startswith(f"$.{key}: unknown key") for p in found), found


def test_rank_limit_uses_the_output_width_too():
    with pytest.raises(FieldValueError, match=r"rank 5 exceeds min\(d_model, d_out\) = 4"):
        MOLTConfig(hook_point_in=IN, hook_point_out=OUT, d_model=8, d_out=4, rank_counts={5: 1})
    assert MOLTConfig(hook_point_in=IN, hook_point_out=OUT, d_model=8, d_out=4, rank_counts={4: 1}).ranks == (4,)


def test_same_hook_in_and_out_needs_one_width():
    with pytest.raises(FieldValueError, match="d_out"):
        MOLTConfig(hook_point_in=IN, hook_point_out=IN, d_model=8, d_out=4, rank_counts={2: 1})
    cfg = MOLTConfig(hook_point_in=IN, hook_point_out=IN, d_model=8, rank_counts={2: 1})
    assert cfg.hook_points == (IN,)


def test_missing_hook_points_are_reported(registry):
    found = problems(registry, {"architecture": "molt", "d_model": 6, "rank_counts": {"2": 4}})
    assert any(p.startswith("$.hook_point_in") for p in found), found
    assert any(p.startswith("$.hook_point_out") for p in found), found
