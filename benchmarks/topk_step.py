"""TopK SAE training step: the fused sparse path (lmsae.nn.fused) vs a plain dense PyTorch step.

One command::

    .venv/bin/python benchmarks/topk_step.py [--threads 2] [--repeats 7] [--shapes 256x4096,576x16384]
                                            [--k 32] [--batch 4096] [--breakdown]

For each shape (d_in x d_sae) it times, in turns (so load from other jobs hits every side alike),
and keeps the median of each:

- ``gemm``: ``torch.addmm(b_E, x, W_E)`` into a preallocated output, the encoder forward that any
  TopK step must do; its rate gives the floor bound ``GFLOP/s / (2 d F)`` tokens/s;
- ``bare gemm``: ``torch.mm(x, W_E)``, the GEMM without the bias (addmm writes the bias into every
  output row first: the bare GEMM is faster, so "fraction of bare-GEMM floor" is a stricter bound);
- ``dense``: a plain PyTorch TopK SAE step (an ``nn.Module``: dense encode, ReLU, ``topk``,
  scatter, dense decode, MSE, ``backward``, ``torch.optim.Adam`` step with its defaults);
- ``fused``: :func:`lmsae.nn.fused.topk_sae_forward` + MSE + ``backward`` + ``Adam(fused=True)``
  step on a copy of the same parameters (same initial weights and batch);
- ``fused, plain Adam``: the same with ``torch.optim.Adam``'s defaults (for-loop on the CPU), to
  show what the optimiser implementation costs;
- ``fused, torch.topk selection``: the fused step selecting with one ``torch.topk`` instead of
  the default two-stage selection (:func:`lmsae.nn.fused.topk_select`).

Columns: tokens/s, the step time over the GEMM time, the fraction of the floor bound
(= GEMM time / step time) and the speed-up over the dense step. ``--breakdown`` also times the
fused step's phases (forward, backward, optimiser). Peak RSS of the process is printed at the end.

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here (set it to ``ACTIVE`` to override): with spinning
OpenMP waits, every parallel region stalls while another process holds a core, which on a shared
2-core machine made every step 2-5x slower (the fused step, with many small operations, most).
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting turn every parallel region into a stall when another
# process holds a core (2-5x slower steps measured on the shared 2-core machines): wait
# passively unless told otherwise. Must be set before torch (libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "lmsae-core" / "src"))

from lmsae.nn.fused import topk_sae_forward


class DenseTopKSAE(nn.Module):
    """The plain PyTorch reference: everything dense, autograd does the backward."""

    def __init__(self, W_E: torch.Tensor, b_E: torch.Tensor, W_D: torch.Tensor, b_D: torch.Tensor, k: int):
        super().__init__()
        self.W_E = nn.Parameter(W_E.clone())
        self.b_E = nn.Parameter(b_E.clone())
        self.W_D = nn.Parameter(W_D.clone())
        self.b_D = nn.Parameter(b_D.clone())
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(x @ self.W_E + self.b_E)
        values, indices = acts.topk(self.k, dim=-1, sorted=False)
        acts = torch.zeros_like(acts).scatter(-1, indices, values)
        return acts @ self.W_D + self.b_D


def _params(d: int, f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W_D = torch.randn(f, d, generator=g)
    W_D /= W_D.norm(dim=1, keepdim=True)
    return W_D.T.contiguous(), torch.zeros(f), W_D, torch.zeros(d)


def _interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_shape(d: int, f: int, k: int, batch: int, repeats: int, warmup: int, breakdown: bool) -> list[list[str]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, d, generator=g)
    W_E, b_E, W_D, b_D = _params(d, f)

    gemm_out = torch.empty(batch, f)

    def gemm():
        torch.addmm(b_E, x, W_E, out=gemm_out)

    def bare_gemm():  # x W_E without the bias (addmm first writes b_E into every row)
        torch.mm(x, W_E, out=gemm_out)

    dense = DenseTopKSAE(W_E, b_E, W_D, b_D, k)
    dense_opt = torch.optim.Adam(dense.parameters(), lr=1e-4)

    def dense_step():
        loss = F.mse_loss(dense(x), x)
        loss.backward()
        dense_opt.step()
        dense_opt.zero_grad(set_to_none=True)

    def make_fused(fused_adam: bool, method: str = "auto"):
        params = [nn.Parameter(t.clone()) for t in (W_E, b_E, W_D, b_D)]
        opt = torch.optim.Adam(params, lr=1e-4, fused=True) if fused_adam else torch.optim.Adam(params, lr=1e-4)
        buffers: dict = {}

        def step():
            recon, _, _ = topk_sae_forward(x, *params, k, buffers=buffers, select_method=method)
            loss = F.mse_loss(recon, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, params, opt, buffers

    fused_step, f_params, f_opt, f_buffers = make_fused(True)
    fused_plain_adam, _, _, _ = make_fused(False)
    fused_torch_topk, _, _, _ = make_fused(True, "topk")

    fns = {"gemm": gemm, "bare gemm": bare_gemm, "dense": dense_step, "fused": fused_step,
           "fused, plain Adam": fused_plain_adam, "fused, torch.topk selection": fused_torch_topk}
    t = _interleaved(fns, repeats, warmup)
    flop = 2.0 * batch * d * f
    gflops = flop / t["gemm"] / 1e9
    floor_tps = batch / t["gemm"]
    rows = [["gemm (floor bound)", d, f, f"{gflops:.0f} GFLOP/s", f"{floor_tps:,.0f}", "1.00", "1.00",
             f"{t['bare gemm'] / t['gemm']:.2f}", "-"],
            ["bare gemm, no bias", d, f, f"{flop / t['bare gemm'] / 1e9:.0f} GFLOP/s", f"{batch / t['bare gemm']:,.0f}",
             f"{t['bare gemm'] / t['gemm']:.2f}", f"{t['gemm'] / t['bare gemm']:.2f}", "1.00", "-"]]
    for name in ("dense", "fused", "fused, plain Adam", "fused, torch.topk selection"):
        rows.append([name, d, f, f"{t[name] * 1e3:.1f} ms", f"{batch / t[name]:,.0f}",
                     f"{t[name] / t['gemm']:.2f}", f"{t['gemm'] / t[name]:.2f}", f"{t['bare gemm'] / t[name]:.2f}",
                     f"{t['dense'] / t[name]:.2f}"])

    if breakdown:
        state: dict = {}

        def fwd():
            recon, _, _ = topk_sae_forward(x, *f_params, k, buffers=f_buffers)
            state["loss"] = F.mse_loss(recon, x)

        def bwd():
            state["loss"].backward()

        def opt_step():
            f_opt.step()
            f_opt.zero_grad(set_to_none=True)

        phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
        for i in range(repeats + warmup):
            for name, fn in (("forward", fwd), ("backward", bwd), ("optimizer", opt_step)):
                s = time.perf_counter()
                fn()
                if i >= warmup:
                    phases[name].append(time.perf_counter() - s)
        print(f"  fused step phases at {d}x{f}: " + ", ".join(
            f"{n} {statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / t['gemm']:.2f} gemm)"
            for n, v in phases.items()), flush=True)
    return [[str(c) for c in row] for row in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant (median kept)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    parser.add_argument("--shapes", default="256x4096,576x16384", help="d_in x d_sae, comma-separated")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--breakdown", action="store_true", help="also time the fused step's phases")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {load}; k={args.k}, "
          f"batch={args.batch} tokens, fp32", flush=True)
    rows: list[list[str]] = []
    for spec in args.shapes.split(","):
        d, f = (int(v) for v in spec.lower().split("x"))
        rows += run_shape(d, f, args.k, args.batch, args.repeats, args.warmup, args.breakdown)
    headers = ["step", "d_in", "d_sae", "time (median)", "tokens/s", "step / gemm", "fraction of floor",
               "fraction of bare-GEMM floor", "speed-up vs dense"]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process: {peak:,.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
