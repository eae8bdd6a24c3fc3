"""``lmsae crosscoder heads``: the distribution of features over heads, as text and JSON."""

from __future__ import annotations

import json

import pytest
import torch

from lmsae.cli import main
from lmsae.dictionary.io import save_dictionary
from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder
from lmsae.registry import load_registry
from lmsae.testing.plugins import fake_entry_points

from lmsae_crosscoder.config import CrosscoderConfig
from lmsae_crosscoder.model import Crosscoder

HOOKS = ["blocks.2.hook_resid_post", "blocks.3.hook_resid_post", "blocks.4.hook_resid_post"]


@pytest.fixture
def registry(monkeypatch):
    fake_entry_points(monkeypatch, [])
    return load_registry(plugins=["lmsae_crosscoder.plugin"])


def crafted(norms: list[tuple[float, ...]], weights: tuple[float, ...] | None = None) -> Crosscoder:
    """A crosscoder whose feature i has decoder norm norms[i][h] in head h (g_h = weights[h])."""
    heads = len(norms[0])
    model = Crosscoder(CrosscoderConfig(hook_points=HOOKS[:heads], d_model=4, d_sae=len(norms),
                                        normalization="none"))
    with torch.no_grad():
        model.W_D.zero_()
        g = torch.tensor(weights if weights is not None else (1.0,) * heads)
        model.head_norm_weight.copy_(g)
        for i, row in enumerate(norms):
            for h, n in enumerate(row):
                model.W_D[h, i, h % 4] = n / float(g[h])
    return model


def run(registry, capsys, *args: str) -> str:
    main(["crosscoder", "heads", *args], registry=registry)
    return capsys.readouterr().out


def test_two_heads_text_report(registry, tmp_path, capsys):
    # shares of head 0: 0.5, 1.0, 0.0, 0.75, 0.95 (the last two via head weights 2 and 0.5)
    model = crafted([(1, 1), (1, 0), (0, 2), (3, 1), (19, 1)], weights=(2.0, 0.5))
    save_dictionary(model, tmp_path, registry)
    out = run(registry, capsys, str(tmp_path), "--bins", "4", "--per-feature")
    assert "crosscoder with 2 heads, 5 features" in out
    lines = out.splitlines()
    assert any(line.split()[-2:] == ["2", "40.0%"] and "shared by all heads" in line for line in lines)
    assert any("specific to blocks.2.hook_resid_post" in line and line.split()[-1] == "40.0%" for line in lines)
    assert any("specific to blocks.3.hook_resid_post" in line and line.split()[-1] == "20.0%" for line in lines)
    histogram = [line for line in lines if line.strip().startswith("[")]
    assert [int(line.split()[2].replace(",", "")) for line in histogram] == [1, 0, 1, 3]
    assert "[0.75, 1.00]" in histogram[-1]
    table = lines[lines.index(next(line for line in lines if line.startswith("feature "))) + 1:]
    assert table[2].split() == ["2", "0.000", "1.000", "blocks.3.hook_resid_post"]
    assert table[4].split() == ["4", "0.950", "0.050", "blocks.2.hook_resid_post"]


def test_three_heads_and_the_threshold(registry, tmp_path, capsys):
    model = crafted([(1, 1, 1), (1, 1, 0), (0, 0, 1), (5, 4, 1)])
    save_dictionary(model, tmp_path, registry)
    # feature 3 has shares 0.5 / 0.4 / 0.1: shared at the default threshold 0.1, partial at 0.2
    data = json.loads(run(registry, capsys, str(tmp_path), "--json"))
    assert data["counts"] == {"shared": 2, "partial": 1, "zero": 0,
                              "specific": {HOOKS[0]: 0, HOOKS[1]: 0, HOOKS[2]: 1}}
    assert data["heads_used"] == [0, 1, 1, 2]
    strict = json.loads(run(registry, capsys, str(tmp_path), "--json", "--threshold", "0.2"))
    assert strict["counts"]["shared"] == 1 and strict["counts"]["partial"] == 2
    text = run(registry, capsys, str(tmp_path))
    assert "number of heads using each feature:" in text and "used by some heads" in text


def test_heads_command_errors(registry, tmp_path, capsys):
    sae = SparseAutoEncoder(SAEConfig(hook_point_in=HOOKS[0], d_model=4, d_sae=8))
    save_dictionary(sae, tmp_path / "sae", registry)
    with pytest.raises(SystemExit) as info:
        main(["crosscoder", "heads", str(tmp_path / "sae")], registry=registry)
    assert info.value.code == 2
    assert "holds a 'sae' dictionary, not a crosscoder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["crosscoder", "heads", str(tmp_path / "missing")], registry=registry)
    assert info.value.code == 2 and "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["crosscoder", "heads", str(tmp_path), "--threshold", "0"], registry=registry)


def test_help_lists_the_command(registry, capsys):
    main(["crosscoder", "--help"], registry=registry)  # help exits normally (no SystemExit outside click)
    assert "heads  Distribution of a crosscoder's features" in capsys.readouterr().out
