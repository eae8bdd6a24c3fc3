"""Proof of extensibility: the separately installed `lmsae-example-plugin` (tests/thirdparty_plugin)
adds an architecture and a CLI command without touching the core, found through its entry point."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import sysconfig

import pytest
import torch

from lmsae.registry import load_registry
from lmsae.testing import ArchitectureContract

LMSAE = [sys.executable, "-m", "lmsae.cli"]


def lmsae(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*LMSAE, *args], capture_output=True, text=True, timeout=300, **kw)


def test_plugin_is_installed_and_discovered_through_its_entry_point():
    reg = load_registry()
    entry = reg.entry("architecture", "tied")
    assert entry.distribution == "lmsae-example-plugin" and entry.plugin == "example"
    assert reg.failures == []


def test_plugin_command_appears_in_help_and_runs():
    help_out = lmsae("--help")
    assert help_out.returncode == 0 and "tied-info" in help_out.stdout
    out = lmsae("tied-info", "--d-model", "8")
    assert out.returncode == 0 and "tied SAE: 32 features" in out.stdout


def test_plugins_table_shows_distribution():
    out = lmsae("plugins").stdout
    rows = [line.split() for line in out.splitlines()[2:]]
    assert ["tied", "architecture", "lmsae-example-plugin", "0.0.1"] in rows
    assert ["tied-info", "command", "lmsae-example-plugin", "0.0.1"] in rows


def test_architecture_accepted_in_a_config(tmp_path):
    example = lmsae("config", "example", "tied")
    assert example.returncode == 0, example.stderr
    path = tmp_path / "tied.toml"
    path.write_text(example.stdout)
    check = lmsae("config", "check", str(path))
    assert check.returncode == 0, check.stderr
    path.write_text(example.stdout.replace("expansion_factor", "expansion_factr"))
    bad = lmsae("config", "check", str(path))
    assert bad.returncode == 2 and "$.dictionary.expansion_factr: unknown key; did you mean 'expansion_factor'?" in bad.stderr


def test_disabling_the_plugin_removes_it_but_keeps_the_cli_working():
    import os

    env = {**os.environ, "LMSAE_DISABLE_PLUGINS": "example"}
    out = lmsae("--help", env=env)
    assert out.returncode == 0 and "tied-info" not in out.stdout


def test_example_config_trains_end_to_end(tmp_path):
    """`lmsae config example tied` then `lmsae run`, shortened: the default [initializer] (encoder
    from decoder) works for the tied SAE, and the folded result loads back."""
    from lmsae.dictionary import load_dictionary

    example = lmsae("config", "example", "tied")
    assert example.returncode == 0, example.stderr
    path = tmp_path / "tied.toml"
    path.write_text(example.stdout)
    assert "encoder_from_decoder = true" in example.stdout and 'type = "synthetic"' in example.stdout
    out = tmp_path / "run"
    run = lmsae("run", str(path), "--set", f'output_dir="{out}"', "--set", "trainer.total_training_tokens=4096",
                cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["reason"] == "completed" and summary["steps"] == 4
    model = load_dictionary(out, load_registry())
    assert type(model).__name__ == "TiedSAE" and model.config.normalization == "none"  # folded


def _tied_model():
    from lmsae_example_plugin.plugin import TiedConfig, TiedSAE

    torch.manual_seed(0)
    model = TiedSAE(TiedConfig(hook_point="h", d_model=8, expansion_factor=4)).double()
    with torch.no_grad():  # away from the init: a non-zero decoder bias, gains other than 1
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(("s_in", "s_out"), [(2.0, 3.0), (3.0, 2.0), (0.25, 5.0), (2.0, 2.0)])
def test_fold_scales_is_exact_when_input_and_output_scales_differ(s_in, s_out):
    model = _tied_model()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = model(x * s_in) / s_out  # the definition: the old model on normalised input
    fired = model.encode(x * s_in) > 0
    folded = copy.deepcopy(model)
    with torch.no_grad():
        folded.fold_scales({"h": s_in}, {"h": s_out})
    torch.testing.assert_close(folded(x), reference, rtol=1e-10, atol=1e-10)
    assert torch.equal(folded.encode(x) > 0, fired)


def test_init_encoder_from_decoder_makes_the_encoder_factor_times_the_decoder_transpose():
    model = _tied_model()
    model.init_encoder_from_decoder(2.0)
    decoder = model.gain[:, None] * model.W.T  # (n_features, d_model): feature i's decoder row
    torch.testing.assert_close(model.W, 2.0 * decoder.T)


class TestTiedContract(ArchitectureContract):
    """The third-party architecture passes the shipped contract, in one line."""

    architecture = "tied"


@pytest.mark.parametrize("script", ["lmsae"])
def test_console_script_exists(script):
    import pathlib

    assert (pathlib.Path(sysconfig.get_path("scripts")) / script).exists()
