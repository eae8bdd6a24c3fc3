"""Periodic held-out evaluation follows eval_every, independently of log_every."""

from __future__ import annotations

import io

from lmsae.config.base import RunConfig
from lmsae.logging.loggers import read_jsonl_metrics
from lmsae.registry import load_registry
from lmsae.runtime import RunContext
from lmsae.testing.plugins import fake_entry_points

HOOK = "blocks.0.hook_resid_post"


def _source(seed: int) -> dict:
    return {"type": "synthetic", "d_model": 16, "n_features": 32, "mean_active": 3.0, "hook_point": HOOK,
            "batch_size": 128, "seed": seed}


def test_evaluation_steps_follow_eval_every_not_log_every(monkeypatch, tmp_path):
    fake_entry_points(monkeypatch, [])
    registry = load_registry()
    data = {
        "task": "train", "output_dir": str(tmp_path), "device": "cpu", "loggers": [{"type": "jsonl"}],
        "dictionary": {"architecture": "sae", "hook_point_in": HOOK, "d_model": 16, "expansion_factor": 4.0,
                       "act_fn": "topk", "top_k": 4},
        "activations": {"batch_size": 128, "sources": [_source(7)]},
        "eval_activations": {"batch_size": 128, "sources": [_source(99)]},
        "trainer": {"total_training_tokens": 32 * 128, "lr": 4e-3, "log_every": 16, "lr_warmup_steps": 0,
                    "eval_every": 12, "eval_tokens": 256},
    }
    cfg = registry.structure(data, RunConfig)
    result = registry.get("task", "train").factory(cfg, RunContext(registry=registry, out=io.StringIO(),
                                                                     progress=False))
    rows = read_jsonl_metrics(tmp_path / "metrics.jsonl")
    evaluated = [r["step"] for r in rows if "eval/explained_variance" in r]
    logged = [r["step"] for r in rows if "metrics/explained_variance" in r]
    assert evaluated[:2] == [12, 24]  # not only where a logging step falls (lcm(12, 16) = 48)
    assert logged == [16, 32]
    # an evaluation-only row carries no training metrics, and the run's final metrics keep both
    assert all("metrics/l0" not in r for r in rows if r["step"] in (12, 24))
    assert "metrics/explained_variance" in result.metrics
    # the synthetic source emits tokens with no active true feature (label exactly 0): they have no
    # L2 ratio and are left out of its mean, which stays near 1 (it was ~1e27 with them)
    ratios = [r[k] for r in rows for k in ("metrics/l2_ratio", "eval/l2_ratio") if k in r]
    assert ratios and all(0.0 < v < 10.0 for v in ratios), ratios


def stop_on_rank_one(rank: int, world_size: int, out_dir: str) -> None:
    """Worker: data-parallel training where only rank 1 asks to stop, after step 2."""
    import json
    import pathlib

    import torch

    from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder
    from lmsae.distributed.mesh import DistributedConfig, build_mesh
    from lmsae.registry import load_registry
    from lmsae.training.trainer import StandardTrainerConfig, Trainer

    mesh = build_mesh(DistributedConfig(data=world_size))
    torch.manual_seed(0)
    model = SparseAutoEncoder(SAEConfig(hook_point_in=HOOK, d_model=8, d_sae=32, act_fn="topk", top_k=2,
                                        normalization="none"))
    rules = load_registry().architecture("sae").sharding_rules(model.config)
    trainer = Trainer(StandardTrainerConfig(total_training_tokens=16 * 10, lr=1e-3, log_every=1), model,
                      progress=False, mesh=mesh, sharding_rules=rules)

    class Hooks:
        def lmsae_before_training(self, trainer, dictionary):
            pass

        def lmsae_after_step(self, trainer, dictionary, step, metrics):
            if rank == 1 and step == 2:
                trainer.request_stop("rank 1 had enough")

        def lmsae_after_training(self, trainer, dictionary, result):
            pass

    trainer.hooks = Hooks()
    g = torch.Generator().manual_seed(rank)
    batches = [{HOOK: torch.randn(8, 8, generator=g), "mask": torch.ones(8, dtype=torch.bool)} for _ in range(10)]
    result = trainer.fit(batches)
    pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"reason": result.reason, "steps": result.steps,
                                                                     "message": result.message}))


def test_a_stop_requested_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    import json

    from lmsae.testing.distributed import run_distributed

    run_distributed(stop_on_rank_one, 2, str(tmp_path), error_dir=tmp_path / "errors")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["steps"] for r in results] == [2, 2]
    assert all(r["reason"] == "stopped" for r in results)
    assert "rank 1 had enough" in results[1]["message"]
    assert "another process of this run requested a stop" in results[0]["message"]
