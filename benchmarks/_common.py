"""Helpers shared by the benchmark scripts (not a benchmark itself).

The scripts run as ``.venv/bin/python benchmarks/<name>.py``, so this module is imported as
``_common`` (the script's directory is on ``sys.path``).

- timing: :func:`interleaved` times several callables in turns (A, B, A, B, ...) and keeps the
  median of each, so that load from other jobs on a shared machine hits every side alike;
- the floor bound: :func:`gemm_gflops` measures ``torch.addmm`` at the encoder-forward shape;
- memory: :func:`run_child` runs one measurement in a fresh Python process; there
  :func:`reset_peak_rss`, :func:`rss_bytes` and :func:`peak_rss_bytes` give the growth of the
  resident set over the measured part;
- output: :func:`table` prints a Markdown table (pasted as is into ``benchmarks/README.md``).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

MiB = 1024 * 1024


# --- device --------------------------------------------------------------------------------

def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA is asynchronous; a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def machine_line(device: torch.device | str = "cpu") -> str:
    """One line describing where the numbers were measured."""
    dev = torch.device(device)
    if dev.type == "cuda":
        where = torch.cuda.get_device_name(dev)
    else:
        where = f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    try:
        load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux/macOS
        load = "?"
    # OpenMP workers busy-wait after each parallel region by default; on a small loaded machine
    # that steals the CPU from the main thread (op-heavy code runs several times slower)
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return f"torch {torch.__version__}, {where}, OMP_WAIT_POLICY {policy}, load average {load}"


# --- timing --------------------------------------------------------------------------------

def interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds of each call of each function, run in turns ``warmup + repeats`` times.

    Returns ``{name: [seconds of each timed call]}`` (warm-up calls excluded)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def gemm_case(rows: int, d_in: int, d_out: int, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", bias: bool = True) -> tuple[Callable[[], Any], float]:
    """``(fn, flop)``: ``fn()`` runs ``torch.addmm(b, x, W)`` with x (rows, d_in), W (d_in, d_out)
    into a preallocated output -- the encoder forward of a dictionary -- and ``flop`` is its
    ``2 * rows * d_in * d_out``. Time it next to the step it bounds (:func:`interleaved`).
    ``bias=False``: the bare GEMM ``torch.mm(x, W)`` (on a CPU addmm first writes the bias into
    every output row, a whole extra pass: the bare GEMM is 10-20 % faster, a stricter bound)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=gen, dtype=dtype).to(device)
    w = torch.randn(d_in, d_out, generator=gen, dtype=dtype).to(device)
    b = torch.randn(d_out, generator=gen, dtype=dtype).to(device)
    out = torch.empty(rows, d_out, dtype=dtype, device=device)
    if not bias:
        return (lambda: torch.mm(x, w, out=out)), 2.0 * rows * d_in * d_out
    return (lambda: torch.addmm(b, x, w, out=out)), 2.0 * rows * d_in * d_out


def gemm_gflops(rows: int, d_in: int, d_out: int, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", repeats: int = 7, warmup: int = 2) -> float:
    """Measured GFLOP/s of :func:`gemm_case` (median of ``repeats``)."""
    fn, flop = gemm_case(rows, d_in, d_out, dtype=dtype, device=device)
    times = interleaved({"addmm": fn}, repeats=repeats, warmup=warmup, device=device)["addmm"]
    return flop / median(times) / 1e9


# --- memory --------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process (``VmRSS``; elsewhere the peak so far)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def reset_peak_rss() -> None:
    """Reset this process's peak resident size to the current one (Linux >= 4.0:
    ``/proc/self/clear_refs`` = 5), so that :func:`peak_rss_bytes` covers what runs next."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # pragma: no cover - not Linux, or not allowed
        pass


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: ``VmHWM`` on Linux.

    Not ``ru_maxrss``: Linux carries a parent's peak over ``fork`` + ``exec`` into ``ru_maxrss``
    of the child, so a measurement process started by a big parent would report the parent's peak.
    ``ru_maxrss`` (KiB on Linux, bytes on macOS) is the fallback elsewhere."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_child(script: str, spec: Mapping[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python <script> --child '<spec as JSON>'`` in a fresh process; the child prints its
    result as one JSON object on its last stdout line. Raises with the child's stderr on failure."""
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(dict(spec))], capture_output=True, check=False,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {script} {dict(spec)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_reference_bytes(params: int, batch_tokens: int, width_in: int, width_out: int,
                          bytes_per_value: int = 4) -> int:
    """The memory a training step cannot avoid: parameters, Adam's two moments and one batch
    (inputs and labels), ``bytes * (3 * params + batch * (width_in + width_out))``. Gradients and
    activations are not counted: the measured peak over this is the step's overhead factor."""
    return bytes_per_value * (3 * params + batch_tokens * (width_in + width_out))


# --- output --------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"
