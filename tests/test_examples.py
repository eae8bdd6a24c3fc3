"""Every example config is valid, and the synthetic ones run end to end (shortened)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
LMSAE = [sys.executable, "-m", "lmsae.cli"]


def lmsae(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*LMSAE, *args], capture_output=True, text=True, timeout=900, cwd=cwd, env=env)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    res = lmsae("config", "check", str(path))
    assert res.returncode == 0, res.stderr


SYNTHETIC = [p for p in EXAMPLES if 'type = "synthetic"' in p.read_text()]


@pytest.mark.parametrize("path", SYNTHETIC, ids=lambda p: p.name)
def test_synthetic_example_trains(path, tmp_path):
    res = lmsae("run", str(path), "--set", f'output_dir="{tmp_path}"', "--set", "trainer.total_training_tokens=40000",
                "--set", "trainer.eval_every=0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "explained variance" in res.stdout and "L0" in res.stdout and "dead fraction" in res.stdout
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["reason"] == "completed"
    assert (tmp_path / "config.json").exists() and (tmp_path / "sae_weights.safetensors").exists()


def test_saelens_commands_round_trip(tmp_path):
    run = lmsae("run", str(ROOT / "examples" / "synthetic_topk.toml"), "--set", f'output_dir="{tmp_path / "d"}"',
                "--set", "trainer.total_training_tokens=20000", "--set", "trainer.eval_every=0")
    assert run.returncode == 0, run.stderr[-2000:]
    exp = lmsae("saelens", "export", str(tmp_path / "d"), str(tmp_path / "sl"))
    assert exp.returncode == 0, exp.stderr
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_sae"] == 256 and cfg["k"] == 8
    imp = lmsae("saelens", "import", str(tmp_path / "sl"), str(tmp_path / "back"))
    assert imp.returncode == 0, imp.stderr
    bad = lmsae("saelens", "import", str(tmp_path / "d"), str(tmp_path / "x"))
    assert bad.returncode == 2 and "cfg.json" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.lm
def test_quickstart_then_evaluate_analyze_show_report(tmp_path):
    """The README's quickstart, shortened (SmolLM2, built-in corpus, TopK SAE, held-out evaluation),
    then the evaluate / analyze / attribute-logits examples, `lmsae show feature` and `lmsae report`
    on the result with only the embedded store."""
    import os

    env = {**os.environ, "LMSAE_STORE_DIR": str(tmp_path / "store")}
    sae = tmp_path / "quickstart"
    res = lmsae("run", str(ROOT / "examples" / "quickstart.toml"), "--set", f'output_dir="{sae}"',
                "--set", "trainer.total_training_tokens=8192", "--set", "trainer.eval_tokens=2048",
                "--set", "activations.shuffle_buffer=4096", "--set", "trainer.initial_k=64")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "final metrics (held-out evaluation)" in res.stdout
    summary = json.loads((sae / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_tokens"] >= 2048
    assert 0.0 < summary["explained_variance"] < 1.0 and summary["l0"] == pytest.approx(32, abs=0.01)

    common = ["--set", f'pretrained.path="{sae}"']
    ev = lmsae("run", str(ROOT / "examples" / "evaluate.toml"), *common, "--set", f'output_dir="{tmp_path / "eval"}"',
               "--set", "n_tokens=2048", "--set", "splice.n_tokens=512", env=env)
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["metrics"]
    assert {"explained_variance", "ce_loss_recovered", "kl_div"} <= set(metrics)
    an = lmsae("run", str(ROOT / "examples" / "analyze.toml"), *common, "--set", "n_tokens=2048", env=env)
    assert an.returncode == 0, an.stderr[-3000:]
    dla = lmsae("run", str(ROOT / "examples" / "attribute_logits.toml"), *common, env=env)
    assert dla.returncode == 0, dla.stderr[-3000:]
    show = lmsae("show", "feature", "quickstart", "0", "--no-color", env=env)
    assert show.returncode == 0 and "quickstart · feature 0" in show.stdout and "promotes" in show.stdout
    report = lmsae("report", "quickstart", "--out", str(tmp_path / "report"), "--max-features", "20", env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (tmp_path / "report" / "index.html").exists() and (tmp_path / "report" / "features" / "0.html").exists()


@pytest.mark.lm
def test_generate_then_train_from_cache(tmp_path):
    cache = tmp_path / "cache"
    gen = lmsae("run", str(ROOT / "examples" / "generate_smollm2.toml"), "--set", f'output_dir="{cache}"',
                "--set", "total_tokens=4096")
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "cache: 32 sequences, 4,096 tokens" in gen.stdout
    check = lmsae("activations", "check", str(cache), "--no-progress")
    assert check.returncode == 0 and "ok" in check.stdout
    train = lmsae("run", str(ROOT / "examples" / "train_from_cache.toml"), "--set", f'output_dir="{tmp_path / "sae"}"',
                  "--set", f'activations.sources.0.path="{cache}"', "--set", "trainer.total_training_tokens=2048",
                  "--set", "activations.shuffle_buffer=2048")
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((tmp_path / "sae" / "training_summary.json").read_text())
    assert summary["reason"] == "completed" and summary["steps"] == 1


def _architectures() -> list[str]:
    from lmsae.registry import load_registry

    names = load_registry().names("architecture")
    # the monorepo's own: a plugin that failed to install must fail here, not drop out of the list
    assert {"sae", "crosscoder", "clt", "lorsa", "molt"} <= set(names), names
    return names


ARCHITECTURES = _architectures()


def _example_config(arch: str, tmp_path: pathlib.Path) -> pathlib.Path:
    res = lmsae("config", "example", arch)
    assert res.returncode == 0, res.stderr
    path = tmp_path / f"{arch}.toml"
    path.write_text(res.stdout)
    check = lmsae("config", "check", str(path))
    assert check.returncode == 0 and "valid 'train' config" in check.stdout, check.stderr
    return path


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_example_of_every_architecture_is_valid(arch, tmp_path):
    """`lmsae config example ARCH` prints a config that `lmsae config check` accepts; the ones on the
    synthetic source also train (shortened; the others need the language model, below)."""
    path = _example_config(arch, tmp_path)
    if 'type = "synthetic"' not in path.read_text():
        return
    run = lmsae("run", str(path), "--set", f'output_dir="{tmp_path / "out"}"', "--set", 'device="cpu"',
                "--set", "trainer.total_training_tokens=8192")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "training_summary.json").read_text())["reason"] == "completed"


@pytest.mark.lm
def test_config_example_on_the_language_model_trains(tmp_path):
    """Architectures reading more hook points than the synthetic source provides (the CLT) get an
    example on SmolLM2's activations; it trains (shortened)."""
    on_lm = [a for a in ARCHITECTURES if 'type = "text"' in _example_config(a, tmp_path).read_text()]
    assert "clt" in on_lm
    for arch in on_lm:
        out = tmp_path / f"out-{arch}"
        run = lmsae("run", str(tmp_path / f"{arch}.toml"), "--set", f'output_dir="{out}"', "--set", 'device="cpu"',
                    "--set", "trainer.total_training_tokens=2048")
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads((out / "training_summary.json").read_text())
        assert summary["reason"] == "completed" and summary["steps"] == 2
