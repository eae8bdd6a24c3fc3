"""Distributed training on CPU with gloo: the mesh, sharding, exact feature-parallel selection, and
data/feature-parallel training matching one process (in-process spawn and end to end through
``torchrun -m lmsae run``)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmsae.config.base import RunConfig
from lmsae.distributed.mesh import DistributedConfig, Mesh, build_mesh
from lmsae.distributed.sharding import GroupedDim, shard_state, unshard_state
from lmsae.errors import ConfigError
from lmsae.testing.distributed import check_parallel_training, fail_on_rank, run_distributed

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[3]
TORCHRUN = pathlib.Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def registry():
    from lmsae.registry import load_registry

    return load_registry()


# --- the mesh ----------------------------------------------------------------------------------


def test_rank_layout_is_model_innermost():
    mesh = Mesh({"data": 2, "head": 1, "model": 3}, rank=4)
    assert mesh.coords == {"sweep": 0, "data": 1, "head": 0, "model": 1}
    assert mesh.rank_of({"data": 0, "model": 2}) == 2
    assert mesh.group_ranks("model") == [3, 4, 5] and mesh.group_ranks("data") == [1, 4]
    assert mesh.group_ranks("data", "model") == [0, 1, 2, 3, 4, 5]
    assert mesh.size("data", "model") == 6 and not Mesh.single().is_distributed


def test_mesh_errors():
    from lmsae.distributed.mesh import DistributedError

    with pytest.raises(DistributedError, match="unknown mesh axis 'tensor'"):
        Mesh.single().group("tensor")
    with pytest.raises(DistributedError, match="rank 6 outside"):
        Mesh({"model": 2, "data": 3}, rank=6)


def test_sizes_that_do_not_match_the_launch_name_the_key_and_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as info:
        build_mesh(DistributedConfig(model=2, data=2))
    (problem,) = info.value.problems
    assert problem.startswith("$.distributed: sweep 1 * data 2 * head 1 * model 2 = 4 processes")
    assert "torchrun --nproc-per-node 4 -m lmsae run" in problem


def test_train_config_checks_the_batch_splits_over_data_ranks(registry):
    data = {"task": "train", "dictionary": {"architecture": "sae", "hook_point_in": "h", "d_model": 4, "d_sae": 8},
            "activations": {"batch_size": 10, "sources": [{"type": "synthetic", "hook_point": "h", "d_model": 4,
                                                                 "n_features": 8, "mean_active": 2.0}]},
            "trainer": {"total_training_tokens": 100}, "distributed": {"data": 3}}
    with pytest.raises(ConfigError) as info:
        registry.structure(data, RunConfig)
    assert any(p.startswith("$.activations") and "data = 3" in p for p in info.value.problems)


# --- sharding ----------------------------------------------------------------------------------


def test_shard_then_unshard_over_two_axes_is_the_identity_with_grouped_dims():
    g = torch.Generator().manual_seed(0)
    state = {"W": torch.randn(4, 12, generator=g), "b": torch.randn(12, generator=g), "c": torch.randn(3, generator=g)}
    # W: heads on dim 0, features (two groups of 6) on dim 1
    rules = {"W": {"head": 0, "model": GroupedDim(1, (6, 6))}, "b": {"model": GroupedDim(0, (6, 6))}, "c": {}}
    shards = {(h, m): shard_state(state, rules, {"head": (h, 2), "model": (m, 3)}) for h in range(2) for m in range(3)}
    assert shards[(1, 2)]["W"].shape == (2, 4)
    # shard (m) holds block m of every group: features [2m, 2m+1] and [6+2m, 6+2m+1]
    torch.testing.assert_close(shards[(0, 1)]["b"], state["b"][[2, 3, 8, 9]])
    back = unshard_state(shards, rules, ["head", "model"], [2, 3])
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=0, atol=0)


# --- exact selection and training, spawned ------------------------------------------------------

SAE = {"hook_point_in": "blocks.0.hook_resid_post", "d_model": 8, "d_sae": 32, "top_k": 4}


@pytest.mark.parametrize(("act_fn", "sizes", "trainer"), [
    ("topk", {"model": 2}, {"auxk_coefficient": 0.1, "dead_threshold_tokens": 1, "clip_grad_norm": 0.5}),
    ("batchtopk", {"data": 2, "model": 2}, {}),
    ("jumprelu", {"model": 2}, {"sparsity_coefficient": 0.01, "lp_coefficient": 0.01, "jumprelu_lr_factor": 3.0}),
    ("relu", {"data": 2}, {"sparsity_coefficient": 0.01, "sparsity_loss": "tanh", "clip_grad_norm": 0.1}),
])
def test_parallel_training_matches_one_process(tmp_path, act_fn, sizes, trainer):
    """Weights after 3 steps and the logged metrics equal a one-process run on the same global
    batches (float64): exact TopK/BatchTopK/AuxK selection, summed gradients, global clipping."""
    result = check_parallel_training("sae", {**SAE, "act_fn": act_fn}, sizes, tmp_path, trainer=trainer)
    assert result["single"]["metrics/l0"] > 0


def test_feature_parallel_with_every_sae_option(tmp_path):
    """b_D subtracted from the input (a replicated parameter every shard's encoder uses), a GLU
    encoder, decoder-norm gating."""
    cfg = {**SAE, "act_fn": "topk", "decoder_norm_gating": True, "apply_decoder_bias_to_input": True,
           "use_glu_encoder": True}
    check_parallel_training("sae", cfg, {"model": 2}, tmp_path, trainer={"auxk_coefficient": 0.1,
                                                                         "dead_threshold_tokens": 1})


def test_transcoder_data_and_feature_parallel(tmp_path):
    cfg = {**SAE, "hook_point_out": "blocks.0.hook_mlp_out", "act_fn": "batchtopk"}
    check_parallel_training("sae", cfg, {"data": 2, "model": 2}, tmp_path)


def test_a_failing_rank_stops_the_run_with_its_error(tmp_path):
    import time

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 broke"):
        run_distributed(fail_on_rank, 2, 1, "rank 1 broke", error_dir=tmp_path)
    assert time.monotonic() - start < 60  # the waiting rank is stopped, not left to its timeout


# --- end to end through torchrun ---------------------------------------------------------------


def _config(tmp_path: pathlib.Path, out: str, **extra: object) -> pathlib.Path:
    from lmsae.config.files import dumps_toml

    source = {"type": "synthetic", "hook_point": "synthetic.hook_in", "d_model": 16, "n_features": 48,
              "mean_active": 4.0, "seed": 1}
    data = {"task": "train", "output_dir": str(tmp_path / out), "overwrite": True, "device": "cpu",
            "dictionary": {"architecture": "sae", "hook_point_in": "synthetic.hook_in", "d_model": 16, "d_sae": 64,
                           "act_fn": "topk", "top_k": 4},
            "activations": {"batch_size": 256, "shuffle_buffer": 1024, "prefetch": 0, "sources": [source]},
            "trainer": {"optimizer": "adam", "total_training_tokens": 256 * 12, "lr": 1e-3, "log_every": 4,
                        "n_checkpoints": 2,
                        "auxk_coefficient": 0.03, "dead_threshold_tokens": 512, "calibration_batches": 2},
            "loggers": [{"type": "jsonl"}], **extra}
    path = tmp_path / f"{out}.toml"
    path.write_text(dumps_toml(data))
    return path


def _lmsae(args: list[str], nproc: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmsae", *args]
    else:
        cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), "-m", "lmsae", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "sae_weights.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training run in one process and feature-parallel over 2 processes."""
    tmp = tmp_path_factory.mktemp("torchrun")
    single = _lmsae(["run", str(_config(tmp, "single"))])
    assert single.returncode == 0, single.stderr[-3000:]
    parallel = _lmsae(["run", str(_config(tmp, "model2", distributed={"model": 2}))], nproc=2)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    return tmp, single, parallel


def test_torchrun_feature_parallel_run_matches_one_process(runs):
    tmp, _, parallel = runs
    a, b = _weights(tmp / "single"), _weights(tmp / "model2")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    # one voice: only rank 0 reports, logs and writes
    assert parallel.stdout.count("saved dictionary to") == 1 and "process mesh: model=2" in parallel.stdout
    lines = (tmp / "model2" / "metrics.jsonl").read_text().splitlines()
    single_lines = (tmp / "single" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(single_lines)
    last, single_last = json.loads(lines[-1]), json.loads(single_lines[-1])
    assert last["metrics/l0"] == pytest.approx(single_last["metrics/l0"], rel=1e-5)
    assert last["metrics/explained_variance"] == pytest.approx(single_last["metrics/explained_variance"], abs=1e-4)


def test_resume_a_feature_parallel_checkpoint_in_one_process(runs, tmp_path):
    """Checkpoints are canonical: the model=2 run's first checkpoint continues in one process
    to the same final weights."""
    tmp, _, _ = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp / "model2", resumed)
    checkpoints = sorted((resumed / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step_000000006"]  # of 12 steps
    # sharded: one file per feature shard, no gathered copy of the dictionary
    shard_files = sorted(p.name for p in (checkpoints[0] / "shards").glob("*.safetensors"))
    assert shard_files == ["head0-model0.safetensors", "head0-model1.safetensors"]
    assert not (checkpoints[0] / "dictionary").exists()
    (resumed / "config.json").unlink()
    config = _config(tmp_path, "resumed", resume=True)
    done = _lmsae(["run", str(config), "--set", "overwrite=false"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    a, b = _weights(tmp / "single"), _weights(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_resume_a_one_process_checkpoint_feature_parallel(runs, tmp_path):
    """...and the other way round: the one-process run's checkpoint continues on model = 2."""
    tmp, _, _ = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp / "single", resumed)
    (resumed / "config.json").unlink()
    config = _config(tmp_path, "resumed", resume=True, distributed={"model": 2})
    done = _lmsae(["run", str(config), "--set", "overwrite=false"], nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(tmp / "single"), _weights(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_torchrun_data_parallel_shards_the_stream_and_checks_resume_layout(tmp_path):
    run = _lmsae(["run", str(_config(tmp_path, "data2", distributed={"data": 2}))], nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "data2" / "training_summary.json").read_text())
    assert summary["steps"] == 12 and summary["reason"] == "completed"
    checkpoint = sorted((tmp_path / "data2" / "checkpoints").iterdir())[-1]
    assert (checkpoint / "stream.json").exists() and (checkpoint / "stream_d1.json").exists()
    # the stream positions are per data rank: a one-process resume is refused with the reason
    (tmp_path / "data2" / "config.json").unlink()
    again = _lmsae(["run", str(_config(tmp_path, "data2", resume=True)), "--set", "overwrite=false"])
    assert again.returncode == 2 and "[distributed] data = 1" in again.stderr


def test_torchrun_with_sizes_that_do_not_match_fails_fast(tmp_path):
    run = _lmsae(["run", str(_config(tmp_path, "bad", distributed={"model": 4}))], nproc=2, timeout=120)
    assert run.returncode != 0
    assert "4 processes, but the run was launched as 2 processes" in run.stderr
