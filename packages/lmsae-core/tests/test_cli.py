"""The lmsae command line: exit codes, one-line errors, plugins table, config check/example."""

from __future__ import annotations

import pathlib

import pytest

from lmsae.cli import main
from lmsae.registry import load_registry
from lmsae.testing.plugins import fake_entry_points


@pytest.fixture
def registry(monkeypatch):
    fake_entry_points(monkeypatch, [])
    return load_registry(plugins=["lmsae.testing.toy"])


def run(argv, registry, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv, registry=registry)
        raise SystemExit(0)
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


def write_example(tmp_path, registry, capsys, name="toy") -> pathlib.Path:
    code, out, _ = run(["config", "example", name], registry, capsys)
    assert code == 0
    path = tmp_path / "c.toml"
    path.write_text(out)
    return path


def test_example_then_check(tmp_path, registry, capsys):
    path = write_example(tmp_path, registry, capsys)
    code, out, err = run(["config", "check", str(path)], registry, capsys)
    assert code == 0 and "valid 'train' config" in out and err == ""


def test_check_misspelt_key_exits_2_with_path_and_closest(tmp_path, registry, capsys):
    path = write_example(tmp_path, registry, capsys)
    path.write_text(path.read_text().replace("n_latents", "n_latnets"))
    code, out, err = run(["config", "check", str(path)], registry, capsys)
    assert code == 2
    assert "$.dictionary.n_latnets: unknown key; did you mean 'n_latents'?" in err
    assert "Traceback" not in err


def test_check_unknown_architecture_lists_installed(tmp_path, registry, capsys):
    path = write_example(tmp_path, registry, capsys)
    path.write_text(path.read_text().replace('architecture = "toy"', 'architecture = "nope"'))
    code, _, err = run(["config", "check", str(path)], registry, capsys)
    assert code == 2 and "unknown architecture 'nope'; installed architectures: sae, toy" in err


def test_set_override_is_validated(tmp_path, registry, capsys):
    path = write_example(tmp_path, registry, capsys)
    code, _, err = run(["config", "check", str(path), "--set", "trainer.seed=1.5"], registry, capsys)
    assert code == 2 and "$.trainer.seed: expected an integer, got float 1.5" in err


def test_missing_file_is_one_line(tmp_path, registry, capsys):
    code, _, err = run(["config", "check", str(tmp_path / "nope.toml")], registry, capsys)
    assert code == 2 and "file not found" in err and "Traceback" not in err


def test_debug_shows_traceback(tmp_path, registry):
    from lmsae.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "config", "check", str(tmp_path / "nope.toml")], registry=registry)


def test_example_unknown_name(registry, capsys):
    code, _, err = run(["config", "example", "tyo"], registry, capsys)
    assert code == 2 and "no task or architecture called 'tyo'" in err and "did you mean 'toy'" in err


def test_plugins_table_lists_builtins_with_distribution(registry, capsys):
    code, out, _ = run(["plugins"], registry, capsys)
    lines = out.splitlines()
    assert lines[0].split() == ["name", "kind", "distribution", "version"]
    rows = {tuple(line.split()[:3]) for line in lines[2:]}
    assert ("init", "task", "lmsae-core") in rows
    assert ("toy", "architecture", "local") in rows


def test_run_init_task_writes_a_loadable_dictionary(tmp_path, registry, capsys):
    from lmsae.dictionary import load_dictionary

    path = write_example(tmp_path, registry, capsys, name="init")
    out_dir = tmp_path / "dict"
    code, out, _ = run(["run", str(path), "--set", f'output_dir="{out_dir}"'], registry, capsys)
    assert code == 0 and "initialised 'sae' dictionary" in out
    model = load_dictionary(out_dir, registry)
    assert model.n_features == 64
    # refuses to overwrite, and leaves the existing dictionary untouched
    before = (out_dir / "sae_weights.safetensors").read_bytes()
    code, _, err = run(["run", str(path), "--set", f'output_dir="{out_dir}"', "--set", "seed=3"], registry, capsys)
    assert code == 2 and "already holds a dictionary" in err
    assert (out_dir / "sae_weights.safetensors").read_bytes() == before


def test_help_works(registry, capsys):
    code, out, _ = run(["--help"], registry, capsys)
    assert code == 0 and "run" in out and "plugins" in out and "config" in out
