"""Feature analysis: lmsae's FeatureAnalyzer against a plain dense statistics pass, in the same run.

Synthetic sparse feature activations of whole sequences, ``(B, T, F)`` = 16 x 128 x F for
F = 4,608 and 16,384: each token draws ~32 features (L0 ~ 32; feature frequencies follow a power
law, so a few features fire often and most rarely), with log-normal magnitudes; the first token of
each sequence is masked (as a BOS token is). Every batch is new (the stream moves on, so the top-k
contexts keep being replaced as they would on real data); generating it is not timed.

- lmsae: ``FeatureAnalyzer(F).update(acts, tokens, mask)`` -- counts, maxima, log-spaced
  histograms, the top-16 contexts and the stratified (quantile) samples of every feature;
- baseline: the same per-feature counts, maxima and histograms (same bins) with plain dense torch
  ops over ``(B, T, F)`` (no contexts, no samples).

Both consume the same batches in turns; the first update of each (allocation) is left out of the
rates. At the end the counts, maxima and histograms of the two are compared. Peak memory is
measured per side and width in a fresh process (growth of the peak resident size, VmHWM, over
the first batches, after a tiny warm-up) and set against the analyzer's own state plus one batch.

    .venv/bin/python benchmarks/analysis.py [--quick] [--features 4608,16384] [--batches 24]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import _common as C
import torch

B, T, L0 = 16, 128, 32
MEMORY_BATCHES = 6  # batches of the memory processes (the state is allocated by the first)


class Stream:
    """Fresh synthetic batches: ``(acts (B, T, F), tokens (B, T), mask (B, T))``."""

    def __init__(self, n_features: int, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.n_features = n_features
        rank = torch.randperm(n_features, generator=self.gen).double() + 1
        self.freq = (rank ** -0.8) / (rank ** -0.8).sum()  # power-law feature frequencies
        self.scale = torch.exp(torch.randn(n_features, generator=self.gen) * 0.5)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = B * T
        # a few more draws than L0: repeated draws of a feature merge, leaving ~L0 distinct ones
        draws = L0 + 2
        feats = torch.multinomial(self.freq, n * draws, replacement=True, generator=self.gen).view(n, draws)
        values = torch.exp(torch.randn(n, draws, generator=self.gen) * 0.7) * self.scale[feats]
        acts = torch.zeros(n, self.n_features).scatter_(1, feats, values).view(B, T, self.n_features)
        tokens = torch.randint(0, 50_000, (B, T), generator=self.gen)
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[:, 0] = False
        return acts, tokens, mask


class DenseStats:
    """Per-feature counts, maxima and histograms with dense ops (the baseline)."""

    def __init__(self, n_features: int, edges: Any):
        self.n_features = n_features
        self.edges = torch.as_tensor(edges, dtype=torch.float32)
        self.n_bins = len(edges) - 1
        self.count = torch.zeros(n_features, dtype=torch.int64)
        self.max = torch.zeros(n_features)
        self.hist = torch.zeros(n_features * self.n_bins, dtype=torch.int64)
        self.offsets = torch.arange(n_features) * self.n_bins

    def update(self, acts: torch.Tensor, mask: torch.Tensor) -> None:
        a = acts * mask[..., None]
        on = a > 0
        self.count += on.sum((0, 1))
        self.max = torch.maximum(self.max, a.amax((0, 1)))
        bins = (torch.bucketize(a, self.edges, right=True) - 1).clamp_(0, self.n_bins - 1)
        self.hist.scatter_add_(0, (bins + self.offsets).reshape(-1), on.reshape(-1).long())


def state_bytes(analyzer: Any) -> int:
    """Bytes of the analyzer's tensors (its per-feature state and kept rows)."""
    total = 0
    for value in vars(analyzer).values():
        if torch.is_tensor(value):
            total += value.numel() * value.element_size()
    return total


def child(spec: dict[str, Any]) -> dict[str, Any]:
    from lmsae.analysis.features import FeatureAnalyzer

    def make(n_features: int) -> Any:
        if spec["side"] == "lmsae":
            analyzer = FeatureAnalyzer(n_features)
            return analyzer, lambda a, t, m: analyzer.update(a, t, m)
        stats = DenseStats(n_features, FeatureAnalyzer(n_features).histogram_edges)
        return stats, lambda a, t, m: stats.update(a, m)

    _, update = make(64)  # warm-up: imports, pools, allocator
    tiny = Stream(64)
    for _ in range(2):
        update(*tiny.next())
    del update, tiny
    stream = Stream(spec["features"])
    C.reset_peak_rss()
    before = C.rss_bytes()
    obj, update = make(spec["features"])
    for _ in range(spec["batches"]):
        update(*stream.next())
    out = {"growth": C.peak_rss_bytes() - before}
    if spec["side"] == "lmsae":
        out["state"] = state_bytes(obj)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 batches per width (default 24)")
    parser.add_argument("--features", default="4608,16384")
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from lmsae.analysis.features import FeatureAnalyzer

    n_batches = args.batches or (8 if args.quick else 24)
    script = os.path.abspath(__file__)
    print(f"feature analysis, batches of {B} x {T} tokens, L0 ~ {L0}, {n_batches} batches per width "
          f"(first one = warm-up); {C.machine_line()}", flush=True)
    rows = []
    for n_features in (int(f) for f in args.features.split(",")):
        stream = Stream(n_features)
        analyzer = FeatureAnalyzer(n_features)
        dense = DenseStats(n_features, analyzer.histogram_edges)
        times: dict[str, list[float]] = {"lmsae": [], "baseline": []}
        tokens_seen, l0 = 0, []
        for i in range(n_batches):
            acts, tokens, mask = stream.next()
            l0.append(float((acts > 0).sum(-1)[mask].float().mean()))
            t0 = time.perf_counter()
            analyzer.update(acts, tokens, mask)
            t1 = time.perf_counter()
            dense.update(acts, mask)
            t2 = time.perf_counter()
            if i > 0:
                times["lmsae"].append(t1 - t0)
                times["baseline"].append(t2 - t1)
                tokens_seen += int(mask.sum())
            del acts
        tps = {k: tokens_seen / sum(v) for k, v in times.items()}
        hist_lmsae = analyzer.histogram.reshape(n_features, -1)
        hist_dense = dense.hist.reshape(n_features, -1)
        equal = (torch.equal(analyzer.act_count, dense.count) and torch.equal(analyzer.max_activation, dense.max))
        hist_off = int((hist_lmsae != hist_dense).sum())
        check = "yes" if equal and hist_off == 0 else (f"counts/max {'yes' if equal else 'NO'}, "
                                                         f"{hist_off} histogram cells differ")
        state = state_bytes(analyzer)
        del analyzer, dense, stream
        mem = {}
        if not args.no_memory:
            for side in ("lmsae", "baseline"):
                mem[side] = C.run_child(script, {"side": side, "features": n_features,
                                                 "batches": min(n_batches, MEMORY_BATCHES)})
        batch_bytes = B * T * n_features * 4
        ref = state + batch_bytes
        rows.append([
            f"{n_features:,}", f"{sum(l0) / len(l0):.1f}", C.fmt_int(tps["lmsae"]),
            f"{1000 * C.median(times['lmsae']):.0f}", C.fmt_int(tps["baseline"]),
            f"{1000 * C.median(times['baseline']):.0f}", f"{tps['lmsae'] / tps['baseline']:.2f}", check,
            f"{state / C.MiB:,.0f}",
            f"{mem['lmsae']['growth'] / C.MiB:,.0f} ({mem['lmsae']['growth'] / ref:.1f}x)" if mem else "-",
            f"{mem['baseline']['growth'] / C.MiB:,.0f}" if mem else "-"])
    print(C.table(["F", "L0", "lmsae tok/s", "lmsae ms/update", "baseline tok/s", "baseline ms/update",
                   "lmsae / baseline", "counts, max, histograms equal", "analyzer state MiB",
                   "peak MiB lmsae (x state+batch)", "peak MiB baseline"], rows))
    print(f"tok/s over updates 2..{n_batches} (unmasked tokens); ms/update = median; peak = growth of the "
          f"resident set (VmHWM) over {min(n_batches, MEMORY_BATCHES)} batches in a fresh process; "
          f"this process peak RSS {C.peak_rss_bytes() / C.MiB:,.0f} MiB")


if __name__ == "__main__":
    main()
