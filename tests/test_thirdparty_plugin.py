"""Proof of extensibility: the separately installed `lmsae-example-plugin` (tests/thirdparty_plugin)
adds an architecture and a CLI command without touching the core, found through its entry point."""

from __future__ import annotations

import subprocess
import sys
import sysconfig

import pytest

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


class TestTiedContract(ArchitectureContract):
    """The third-party architecture passes the shipped contract, in one line."""

    architecture = "tied"


@pytest.mark.parametrize("script", ["lmsae"])
def test_console_script_exists(script):
    import pathlib

    assert (pathlib.Path(sysconfig.get_path("scripts")) / script).exists()
