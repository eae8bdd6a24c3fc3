"""One training step per plugin architecture, against a comparable SAE step in the same run.

Each architecture is built through the registry (``registry.architecture(name).model_class``) at a
small-but-real size, fp32, TopK, normalization "none", and trained with the core
``lmsae.training.trainer.Trainer`` on batches of 4,096 token positions made by the architecture's
own ``model.example_batch(n, generator)`` (the contract method: the right hooks, layout and mask).
Its step is timed in turns with the step of a reference TopK SAE (the same Trainer) chosen to be
comparable:

- crosscoder (2 heads, d = 256, 4,096 features, k = 32) vs an SAE on the concatenated heads
  (d = 512, 4,096 features, k = 32): the same parameters and the same dense FLOP;
- clt (4 layers, d = 256, 1,024 features per layer, k = 8 per layer) vs an SAE with d = 256,
  4,096 features, k = 32: the same features and L0 (the CLT also has the cross-layer decoders);
- lorsa (d = 256, 4 QK heads of 64, 4,096 rank-1 OV features, k = 32, sequences of 128) vs an
  SAE with d = 256, 4,096 features, k = 32: the same features and L0 (plus attention);
- molt (d = 256, ranks 1/2/4/8 x 1,024/512/256/128 transforms, k = 32) vs an SAE with d = 256 and
  the same number of parameters.

Peak memory per architecture is measured in a fresh process (growth of the peak resident size,
VmHWM, over a few steps, after a tiny warm-up) as a factor of parameters + Adam moments + one
batch. An architecture
whose plugin is not installed (or disabled) is skipped and listed as such.

    .venv/bin/python benchmarks/architectures.py [--quick] [--only crosscoder,clt]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any

# as the lmsae CLI does (and `import lmsae` before torch): OpenMP threads wait passively, so
# they do not stall every parallel region (and the compiled kernels' threads) while another
# process holds a core. Set OMP_WAIT_POLICY=ACTIVE to measure the spinning default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _common as C  # noqa: E402
import torch

TOKENS = 4096
CONTEXT = 128  # sequence length of the architectures that need sequences (lorsa)


def arch_kwargs(name: str, scale: int = 1) -> dict[str, Any]:
    """Config fields of each benchmarked architecture (``scale`` divides the sizes: warm-up)."""
    d = 256 // scale
    if name == "crosscoder":
        return {"hook_points": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], "d_model": d,
                "d_sae": 4096 // scale, "act_fn": "topk", "top_k": 32}
    if name == "clt":
        return {"hook_points_in": [f"blocks.{i}.ln2.hook_normalized" for i in range(4)],
                "hook_points_out": [f"blocks.{i}.hook_mlp_out" for i in range(4)], "d_model": d,
                "d_sae": 1024 // scale, "act_fn": "topk", "top_k": 8}
    if name == "lorsa":
        return {"hook_point_in": "blocks.0.ln1.hook_normalized", "hook_point_out": "blocks.0.hook_attn_out",
                "d_model": d, "n_qk_heads": 4, "d_qk_head": 64 // scale, "d_sae": 4096 // scale,
                "n_ctx": CONTEXT, "act_fn": "topk", "top_k": 32}
    if name == "molt":
        return {"hook_point_in": "blocks.0.ln2.hook_normalized", "hook_point_out": "blocks.0.hook_mlp_out",
                "d_model": d, "rank_counts": {"1": 1024 // scale, "2": 512 // scale, "4": 256 // scale,
                                              "8": 128 // scale},
                "act_fn": "topk", "top_k": 32}
    raise KeyError(name)


ARCHITECTURES = ("crosscoder", "clt", "lorsa", "molt")
WHY = {"crosscoder": "SAE on the concatenated heads: same params and FLOP",
       "clt": "same features (4 x 1,024) and L0 (4 x 8)",
       "lorsa": "same features and L0",
       "molt": "same parameters"}


def reference_kwargs(name: str, model: Any, scale: int = 1) -> dict[str, Any]:
    d = 256 // scale
    if name == "crosscoder":
        return {"d_model": 2 * d, "d_sae": model.n_features, "top_k": 32}
    if name in ("clt", "lorsa"):
        return {"d_model": d, "d_sae": model.n_features, "top_k": 32}
    # molt: an SAE of the same parameter count, 2*d*F + F + d = params
    params = sum(p.numel() for p in model.parameters())
    return {"d_model": d, "d_sae": max(64, round((params - d) / (2 * d + 1))), "top_k": 32}


def _trainer(model: Any, tokens: int) -> Any:
    from lmsae.training.trainer import StandardTrainerConfig, Trainer

    cfg = StandardTrainerConfig(total_training_tokens=tokens * 10**6, lr_warmup_steps=0)
    trainer = Trainer(cfg, model, progress=False)
    trainer.setup(tokens)
    return trainer


def build(registry: Any, name: str, scale: int = 1) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """``(trainer, model, batch)`` of one architecture (``scale`` > 1: a smaller warm-up version)."""
    spec = registry.architecture(name)
    torch.manual_seed(0)
    model = spec.model_class(spec.config_class(normalization="none", **arch_kwargs(name, scale)))
    gen = torch.Generator().manual_seed(1)
    n = TOKENS // scale
    batch = (model.example_batch(n // CONTEXT, gen, context=CONTEXT) if model.needs_sequences
             else model.example_batch(n, gen))
    return _trainer(model, int(batch["mask"].numel())), model, batch


def build_reference(registry: Any, name: str, model: Any, tokens: int,
                    scale: int = 1) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """``(trainer, model, batch)`` of the reference SAE of architecture ``name`` (built as ``model``)."""
    spec = registry.architecture("sae")
    torch.manual_seed(0)
    ref = spec.model_class(spec.config_class(hook_point_in="blocks.0.hook_resid_post", act_fn="topk",
                                             normalization="none", **reference_kwargs(name, model, scale)))
    batch = ref.example_batch(tokens, torch.Generator().manual_seed(1))
    return _trainer(ref, tokens), ref, batch


def nbytes(batch: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v) and v.is_floating_point())


def child(spec: dict[str, Any]) -> dict[str, Any]:
    from lmsae.registry import load_registry

    registry = load_registry()
    trainer, _, batch = build(registry, spec["name"], scale=8)  # warm-up: imports, pools, allocator
    for _ in range(2):
        trainer.train_step(batch)
    del trainer, batch
    C.reset_peak_rss()
    before = C.rss_bytes()
    trainer, model, batch = build(registry, spec["name"])
    for _ in range(spec["steps"]):
        trainer.train_step(batch)
    return {"growth": C.peak_rss_bytes() - before, "params": sum(p.numel() for p in model.parameters()),
            "batch_bytes": nbytes(batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps per side (default 7)")
    parser.add_argument("--only", default=",".join(ARCHITECTURES), help="architectures to run")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-architecture memory processes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from lmsae.registry import load_registry

    registry = load_registry()
    installed = set(registry.names("architecture"))
    repeats, warmup = (3, 1) if args.quick else (7, 2)
    script = os.path.abspath(__file__)
    print(f"one training step per architecture, {TOKENS} token positions per batch, fp32, TopK, "
          f"{repeats} timed steps per side (median); {C.machine_line()}", flush=True)
    rows, skipped = [], []
    for name in args.only.split(","):
        if name not in installed:
            skipped.append(name)
            continue
        trainer, model, batch = build(registry, name)
        tokens = int(batch["mask"].numel())
        ref_trainer, ref_model, ref_batch = build_reference(registry, name, model, tokens)
        times = C.interleaved({"arch": functools.partial(trainer.train_step, batch),
                               "sae": functools.partial(ref_trainer.train_step, ref_batch)},
                              repeats=repeats, warmup=warmup)
        tps = {k: tokens / C.median(v) for k, v in times.items()}
        params = sum(p.numel() for p in model.parameters())
        ref_params = sum(p.numel() for p in ref_model.parameters())
        ref_cfg = ref_model.config
        layout = "x".join(str(s) for s in next(v for k, v in batch.items() if k != "mask").shape)
        del trainer, model, batch, ref_trainer, ref_model, ref_batch
        mem = "-"
        if not args.no_memory:
            out = C.run_child(script, {"name": name, "steps": 3})
            ref_bytes = 4 * 3 * out["params"] + out["batch_bytes"]
            mem = f"{out['growth'] / C.MiB:,.0f} ({out['growth'] / ref_bytes:.1f}x)"
        rows.append([name, layout, f"{params:,}", C.fmt_int(tps["arch"]),
                     f"SAE {ref_cfg.d_model} x {ref_cfg.d_sae}, k {ref_cfg.top_k} ({WHY[name]})", f"{ref_params:,}",
                     C.fmt_int(tps["sae"]), f"{tps['arch'] / tps['sae']:.2f}", mem])
        print(f"  {name}: {tps['arch']:,.0f} tok/s, reference SAE {tps['sae']:,.0f} tok/s", file=sys.stderr,
              flush=True)
    print(C.table(["architecture", "batch (per hook)", "params", "tok/s", "reference", "ref params", "ref tok/s",
                   "arch / ref", "peak MiB (x params+Adam+batch)"], rows))
    for name in skipped:
        print(f"skipped {name}: its plugin is not installed (or is disabled); installed architectures: "
              f"{', '.join(sorted(installed))}")
    print(f"peak = growth of the resident set (VmHWM) over 3 steps in a fresh process; "
          f"this process peak RSS {C.peak_rss_bytes() / C.MiB:,.0f} MiB")


if __name__ == "__main__":
    main()
