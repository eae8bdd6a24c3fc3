"""SAE training step: lmsae's Trainer against a plain dense PyTorch step, in the same run.

For each configuration (activation x width) the script builds a
``lmsae.dictionary.sae.SparseAutoEncoder`` (normalization "none", fp32) and a
``lmsae.training.trainer.Trainer`` and times ``trainer.train_step(batch)`` -- the whole step a
training run takes: losses, backward, clipping norm, Adam, schedule, dead-feature statistics and
metrics -- so any fast path the Trainer picks up is measured when the script is re-run. Next to it,
in turns (lmsae, baseline, GEMM, lmsae, ...) so that load from other jobs hits all three alike:

- a plain dense PyTorch step at the same shapes, starting from the same weights:
  ``x @ W_E + b_E``, the activation, ``@ W_D + b_D``, squared error (+ the same sparsity penalty),
  backward, ``torch.optim.Adam`` step;
- the encoder-forward GEMM ``torch.addmm(b_E, x, W_E)``, whose rate gives the floor bound: a step
  must at least run it, so no step is faster than ``GEMM FLOP/s / (2 * d * F)`` tokens/s. The
  "% of floor" columns are the measured tokens/s over that bound.

Peak memory is measured per configuration and side in a fresh process, after a tiny warm-up: the
peak resident size (``VmHWM``, reset first) over a few steps minus the resident size before the
model is built (not ``ru_maxrss``: Linux carries the parent's peak into it). It is given as a factor
of the memory a step cannot avoid: parameters + Adam's two moments + one batch,
``4 * (3 * params + batch * 2d)`` bytes.

    .venv/bin/python benchmarks/training.py [--quick] [--acts topk,batchtopk] [--batch 4096]
    .venv/bin/python benchmarks/training.py --configs topk:256:4096 --repeats 7 --no-memory

The first step's loss of both sides (same weights, same batch) is compared as a check that the
baseline computes the same step. Ratios are the result: absolute tokens/s swing with the load of a
shared machine. The header line records ``OMP_WAIT_POLICY``: on a small busy CPU, OpenMP workers
busy-waiting (the default) slow the fused TopK path several times (see the README).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from typing import Any

# as the lmsae CLI does (and `import lmsae` before torch): OpenMP threads wait passively, so
# they do not stall every parallel region (and the compiled kernels' threads) while another
# process holds a core. Set OMP_WAIT_POLICY=ACTIVE to measure the spinning default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _common as C  # noqa: E402
import torch

#: (act_fn, d_in, d_sae) of the full run; k = 32 for TopK / BatchTopK
FULL = ([(act, 256, f) for act in ("relu", "jumprelu", "topk", "batchtopk") for f in (2048, 4096, 8192)]
        + [("topk", 576, 16384)])
QUICK = [("relu", 256, 4096), ("jumprelu", 256, 4096), ("topk", 256, 2048), ("topk", 256, 4096), ("topk", 256, 8192),
         ("batchtopk", 256, 4096), ("topk", 576, 16384)]

K = 32
SPARSITY = {"relu": ("power", 1e-3), "jumprelu": ("tanh", 1e-3)}  # penalty kind and coefficient
TANH_STRETCH = 4.0
JUMPRELU_THRESHOLD, JUMPRELU_BANDWIDTH = 0.01, 0.05
LR = 4e-4
HOOK = "blocks.0.hook_resid_post"


# --- lmsae side ------------------------------------------------------------------------------

def build_lmsae(spec: dict[str, Any]) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """``(trainer, model, batch)`` for one configuration (the trainer is set up)."""
    from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder
    from lmsae.training.trainer import StandardTrainerConfig, Trainer

    act, d, f, n = spec["act"], spec["d"], spec["f"], spec["batch"]
    torch.manual_seed(0)
    model = SparseAutoEncoder(SAEConfig(hook_point_in=HOOK, d_model=d, d_sae=f, act_fn=act, top_k=K,
                                        normalization="none", jumprelu_init_threshold=JUMPRELU_THRESHOLD,
                                        jumprelu_bandwidth=JUMPRELU_BANDWIDTH))
    kind, coef = SPARSITY.get(act, ("power", 0.0))
    cfg = StandardTrainerConfig(total_training_tokens=n * 10**6, lr=LR, lr_warmup_steps=0,
                                sparsity_coefficient=coef, sparsity_loss=kind, tanh_stretch=TANH_STRETCH,
                                sparsity_warmup_steps=0)
    trainer = Trainer(cfg, model, device=spec["device"], progress=False)
    trainer.setup(n)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen).to(spec["device"])
    # what the activation stream gives: the hook point and a token mask (all real tokens)
    batch = {HOOK: x, "mask": torch.ones(n, dtype=torch.bool, device=spec["device"])}
    return trainer, model, batch


# --- plain PyTorch side ----------------------------------------------------------------------

class _PlainJumpReLU(torch.autograd.Function):
    """``h * [h > t]``; straight-through rectangle-kernel gradient to t (the usual JumpReLU)."""

    @staticmethod
    def forward(ctx, h, t):  # type: ignore[override]
        ctx.save_for_backward(h, t)
        return h * (h > t)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        h, t = ctx.saved_tensors
        window = ((h - t).abs() < JUMPRELU_BANDWIDTH / 2) & (h > 0)
        return g * (h > t), (g * window * (-t / JUMPRELU_BANDWIDTH)).sum(0)


def build_baseline(spec: dict[str, Any], init: dict[str, torch.Tensor] | None = None):
    """``(step, params)``: a plain dense training step at the configuration's shapes.

    ``init`` (optional) holds lmsae's initial weights so both sides start equal."""
    act, d, f, n, dev = spec["act"], spec["d"], spec["f"], spec["batch"], spec["device"]
    if init is None:
        torch.manual_seed(0)
        w_d = torch.nn.functional.normalize(torch.rand(f, d) * 2 - 1, dim=1)
        init = {"W_E": w_d.T.clone(), "b_E": torch.zeros(f), "W_D": w_d, "b_D": torch.zeros(d),
                "activation.log_threshold": torch.full((f,), math.log(JUMPRELU_THRESHOLD))}
    p = {name: torch.nn.Parameter(init[name].detach().clone().to(dev)) for name in ("W_E", "b_E", "W_D", "b_D")}
    if act == "jumprelu":
        p["log_threshold"] = torch.nn.Parameter(init["activation.log_threshold"].detach().clone().to(dev))
    opt = torch.optim.Adam(list(p.values()), lr=LR)
    kind, coef = SPARSITY.get(act, ("power", 0.0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen).to(dev)

    def step() -> torch.Tensor:
        h = x @ p["W_E"] + p["b_E"]
        if act == "relu":
            a = torch.relu(h)
        elif act == "jumprelu":
            a = _PlainJumpReLU.apply(h, p["log_threshold"].exp())
        elif act == "topk":
            v, i = torch.relu(h).topk(K, dim=-1, sorted=False)
            a = torch.zeros_like(h).scatter(-1, i, v)
        else:  # batchtopk
            flat = torch.relu(h).reshape(-1)
            v, i = flat.topk(K * n, sorted=False)
            a = torch.zeros_like(flat).scatter(0, i, v).reshape(h.shape)
        y = a @ p["W_D"] + p["b_D"]
        loss = (y - x).square().sum(-1).mean()
        if coef > 0:
            s = a * p["W_D"].norm(dim=1)
            penalty = s.sum(-1) if kind == "power" else torch.tanh(TANH_STRETCH * s).sum(-1)
            loss = loss + coef * penalty.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, list(p.values())


# --- memory (one fresh process per configuration and side) ----------------------------------

def child(spec: dict[str, Any]) -> dict[str, Any]:
    dev = torch.device(spec["device"])
    # a few steps of a tiny version first: imports, thread pools and BLAS/allocator set-up stay
    # out of the measured growth
    tiny = {**spec, "d": 16, "f": 64, "batch": 256}
    if spec["side"] == "lmsae":
        trainer, _, batch = build_lmsae(tiny)
        for _ in range(2):
            trainer.train_step(batch)
        del trainer, batch
    else:
        step, _ = build_baseline(tiny)
        for _ in range(2):
            step()
        del step
    C.reset_peak_rss()
    before = C.rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    if spec["side"] == "lmsae":
        trainer, model, batch = build_lmsae(spec)
        params = sum(q.numel() for q in model.parameters())

        def step() -> None:
            trainer.train_step(batch)
    else:
        step, plist = build_baseline(spec)
        params = sum(q.numel() for q in plist)
    for _ in range(spec["steps"]):
        step()
    C.sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else C.peak_rss_bytes()
    return {"params": params, "growth": peak - before}


# --- the run ---------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="d=256: F=4096 per activation and F=2048/8192 for "
                        "TopK, plus the 576 x 16384 TopK; 3 timed steps (default: every width, 7 timed steps)")
    parser.add_argument("--acts", default="relu,jumprelu,topk,batchtopk", help="activations to run")
    parser.add_argument("--configs", default=None,
                        help="explicit act:d:F list instead of the built-in one, e.g. topk:256:4096,relu:256:2048")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per side")
    parser.add_argument("--device", default="cpu", help="torch device (cuda: synchronised timing, "
                        "memory from torch.cuda.max_memory_allocated)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory processes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    acts = set(args.acts.split(","))
    if args.configs:
        configs = [(a, int(d), int(f)) for a, d, f in (c.split(":") for c in args.configs.split(","))]
    else:
        configs = [c for c in (QUICK if args.quick else FULL) if c[0] in acts]
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    script = os.path.abspath(__file__)
    print(f"SAE training step, batch {args.batch} tokens, fp32, {repeats} timed steps per side (median), "
          f"k = {K}; {C.machine_line(args.device)}", flush=True)
    rows = []
    for act, d, f in configs:
        spec = {"act": act, "d": d, "f": f, "batch": args.batch, "device": args.device}
        trainer, model, batch = build_lmsae(spec)
        init = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        base_step, _ = build_baseline(spec, init)
        # same weights, same batch: the first losses agree if the baseline is the same step
        loss_lmsae = float(trainer.train_step(batch)["loss"].detach())
        loss_base = float(base_step())
        diff = abs(loss_lmsae - loss_base) / max(abs(loss_base), 1e-30)
        gemm, flop = C.gemm_case(args.batch, d, f, device=args.device)
        bare, _ = C.gemm_case(args.batch, d, f, device=args.device, bias=False)
        times = C.interleaved({"lmsae": functools.partial(trainer.train_step, batch), "baseline": base_step,
                               "gemm": gemm, "bare": bare}, repeats=repeats, warmup=warmup, device=args.device)
        tps = {name: args.batch / C.median(times[name]) for name in ("lmsae", "baseline")}
        gflops = flop / C.median(times["gemm"]) / 1e9
        floor = gflops * 1e9 / (2 * d * f)
        bare_floor = args.batch / C.median(times["bare"])
        params = sum(q.numel() for q in model.parameters())
        del trainer, model, batch, base_step
        ref = C.train_reference_bytes(params, args.batch, d, d)
        mem = {}
        if not args.no_memory:
            for side in ("lmsae", "baseline"):
                mem[side] = C.run_child(script, {**spec, "side": side, "steps": 3})["growth"]
        row = [act, d, f, K if act in ("topk", "batchtopk") else "-", C.fmt_int(tps["lmsae"]),
               C.fmt_int(tps["baseline"]), f"{tps['lmsae'] / tps['baseline']:.2f}", f"{gflops:.0f}",
               C.fmt_int(floor), f"{100 * tps['lmsae'] / floor:.1f} %", f"{100 * tps['lmsae'] / bare_floor:.1f} %",
               f"{100 * tps['baseline'] / floor:.1f} %"]
        for side in ("lmsae", "baseline"):
            row.append(f"{mem[side] / C.MiB:,.0f} ({mem[side] / ref:.1f}x)" if side in mem else "-")
        row += [f"{ref / C.MiB:,.0f}", f"{diff:.0e}"]
        rows.append(row)
        print(f"  {act} d={d} F={f}: lmsae {tps['lmsae']:,.0f} tok/s, baseline {tps['baseline']:,.0f} tok/s, "
              f"GEMM {gflops:.0f} GFLOP/s", file=sys.stderr, flush=True)
    print(C.table(["act", "d", "F", "k", "lmsae tok/s", "baseline tok/s", "lmsae / baseline", "GEMM GFLOP/s",
                   "floor tok/s", "lmsae % of floor", "lmsae % of bare-GEMM floor", "baseline % of floor",
                   "peak MiB lmsae (x ref)",
                   "peak MiB baseline (x ref)", "ref MiB", "step-1 loss rel. diff"], rows))
    print(f"ref = parameters + Adam moments + one batch = 4 * (3 * params + batch * 2d) bytes; "
          f"peak = growth of the resident set (VmHWM) over 3 steps in a fresh process; "
          f"this process peak RSS {C.peak_rss_bytes() / C.MiB:,.0f} MiB")


if __name__ == "__main__":
    main()
