"""Compiled CPU kernels (numba) for the fused TopK SAE path: selection, sparse decode, sparse backward.

Importing this module compiles nothing; each kernel is compiled on its first call (a second or
two each, then cached on disk by numba). :func:`available` says whether numba imports; every
caller keeps a pure-PyTorch path for when it does not (and for accelerators).

All kernels take NumPy views of contiguous CPU tensors (float32 or float64 values, int64
indices) and write into preallocated outputs; they parallelise over rows (tokens) or features
with ``numba.prange`` and never allocate anything of size ``(tokens, d_sae)``.

Floating-point reductions (dot products) are compiled with ``reassoc``/``contract`` so they
vectorise; the results therefore differ from PyTorch's by summation order only (~1e-7 relative
in float32, ~1e-16 in float64).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

_LOCK = threading.Lock()  # numba's default "workqueue" layer must not be entered by two threads at once
_STATE: dict[str, Any] = {}


def available() -> bool:
    """Whether numba imports (the kernels can be used) and they are not switched off
    (``LMSAE_DISABLE_NUMBA=1`` or :func:`disabled`)."""
    if _STATE.get("off"):
        return False
    if "ok" not in _STATE:
        if os.environ.get("LMSAE_DISABLE_NUMBA", "").strip() not in ("", "0"):
            _STATE["ok"] = False
        else:
            try:
                _STATE["kernels"] = _build()
                _STATE["ok"] = True
            except Exception as exc:  # ImportError, or a numba that rejects this numpy
                _STATE["ok"] = False
                _STATE["error"] = f"{type(exc).__name__}: {exc}"
    return bool(_STATE["ok"])


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use the pure-PyTorch paths inside the block (tests compare both paths with it)."""
    before = _STATE.get("off", False)
    _STATE["off"] = True
    try:
        yield
    finally:
        _STATE["off"] = before


def unavailable_reason() -> str | None:
    if _STATE.get("off"):
        return "switched off (lmsae.nn._kernels.disabled)"
    if available():
        return None
    return _STATE.get("error", "disabled by LMSAE_DISABLE_NUMBA")


def call(name: str, *args: Any, threads: int = 1) -> Any:
    """Run kernel ``name`` on ``threads`` threads (serialised with other kernel calls)."""
    if not available():
        raise RuntimeError(f"numba kernels unavailable: {unavailable_reason()}")
    import numba

    kernel = _STATE["kernels"][name]
    with _LOCK:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
        return kernel(*args)


def _build() -> dict[str, Any]:  # noqa: C901 - the kernels are defined together on purpose
    import numba
    import numpy as np
    from numba import njit, prange
    from numba.core import entrypoints

    entrypoints.init_all()  # numba's own extension lookup, done now rather than at the first compile
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba's own thread pool rather than a second OpenMP runtime next to PyTorch's: two
        # OpenMP teams spinning for the same cores made the Trainer step 1.7-2x slower on a 2-core
        # CPU (benchmarks/training.py); kernel launches are serialised by _LOCK, as it requires.
        # (An environment variable: numba re-reads its configuration from it when compiling.)
        os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
        numba.config.reload_config()

    _CACHE = os.environ.get("LMSAE_NUMBA_CACHE", "1") != "0"  # noqa: N806
    fast = {"reassoc", "contract"}  # vectorised sums; no "nnan"/"ninf": NaN handling stays IEEE

    @njit(nogil=True, cache=_CACHE, boundscheck=False)
    def top_front(cv, ci, cnt, k):
        """Reorder ``cv[:cnt]`` (and ``ci`` alongside) so that its ``k`` largest come first
        (quickselect, Hoare partition around a median of three)."""
        lo = 0
        hi = cnt - 1
        target = k - 1
        while lo < hi:
            mid = (lo + hi) >> 1
            a = cv[lo]
            b = cv[mid]
            c = cv[hi]
            if a < b:
                a, b = b, a
            if b < c:
                b, c = c, b
                if a < b:
                    a, b = b, a
            pivot = b
            i = lo
            j = hi
            while i <= j:
                while cv[i] > pivot:
                    i += 1
                while cv[j] < pivot:
                    j -= 1
                if i <= j:
                    tv = cv[i]
                    cv[i] = cv[j]
                    cv[j] = tv
                    ti = ci[i]
                    ci[i] = ci[j]
                    ci[j] = ti
                    i += 1
                    j -= 1
            if target <= j:
                hi = j
            elif target >= i:
                lo = i
            else:
                break

    @njit(nogil=True, cache=_CACHE, boundscheck=False, fastmath={"reassoc"})
    def not_finite(a, zero):
        """Whether ``a`` holds a NaN or an infinity (a vectorised sum of ``a * 0``)."""
        s = zero
        for c in range(a.shape[0]):
            s += a[c] * zero
        return s != s

    @njit(parallel=True, nogil=True, cache=_CACHE, boundscheck=False)
    def select_rows(pre, b, k, out_v, out_i, bad, chunks):
        """Exact top-k of each row of ``pre`` (``(n, f)``, ``f = b * nb``, ``nb >= k``).

        Per row, in one pass over it (then from the L1 cache):

        1. the maxima ``bm`` of the ``nb`` strided blocks ``{c, c + nb, ..., c + (b - 1) nb}``
           (an elementwise, vectorised max of the row's ``b`` segments);
        2. a lower bound ``t`` of the k-th largest value: the blocks are dealt into ``k`` groups
           (``c mod k``) and ``t`` is the smallest group maximum (each group holds an entry
           ``>= t``, so at least ``k`` entries are);
        3. bisection rounds raise ``t`` while at least ``k`` block maxima stay ``>= t`` (again
           ``k`` entries ``>= t``), until about ``1.5 k`` blocks pass;
        4. only the passing blocks can hold a top-k entry: their entries ``>= t`` are collected
           (branch-free) and a quickselect puts the ``k`` largest first.

        Rows holding a NaN or an infinity are flagged in ``bad`` (the caller redoes them with
        ``torch.topk``). ``out_v`` gets ``max(value, 0)`` (the TopK SAE's ReLU), ``out_i`` the
        columns. Rows are processed in ``chunks`` parallel chunks, each with its own scratch.
        """
        n, f = pre.shape
        nb = f // b
        ng = nb // k
        for ch in prange(chunks):
            r0 = ch * n // chunks
            r1 = (ch + 1) * n // chunks
            cv = np.empty(f, pre.dtype)
            ci = np.empty(f, np.int64)
            bl = np.empty(nb, np.int64)
            bm = np.empty(nb, pre.dtype)
            gm = np.empty(k, pre.dtype)
            consts = np.zeros(2, pre.dtype)
            consts[1] = 0.5
            zero = consts[0]
            half = consts[1]
            for r in range(r0, r1):
                row = pre[r]
                for c in range(nb):
                    bm[c] = row[c]
                for i in range(1, b):
                    base = i * nb
                    for c in range(nb):
                        v = row[base + c]
                        m = bm[c]
                        bm[c] = (v if v > m else m) + v * zero  # + v * 0: NaN/inf reach bm
                if not_finite(bm, zero) or not_finite(row[:nb], zero):
                    bad[r] = True
                    continue
                bad[r] = False
                for g in range(k):
                    gm[g] = bm[g]
                for j in range(1, ng):
                    base = j * k
                    for g in range(k):
                        v = bm[base + g]
                        m = gm[g]
                        gm[g] = v if v > m else m
                t = gm[0]
                hi_t = gm[0]
                for g in range(1, k):
                    v = gm[g]
                    t = v if v < t else t
                    hi_t = v if v > hi_t else hi_t
                for _ in range(16):
                    mid = t + (hi_t - t) * half
                    c2 = 0
                    for c in range(nb):
                        c2 += bm[c] >= mid
                    if c2 >= k:
                        t = mid
                        if 2 * c2 <= 3 * k:
                            break
                    else:
                        hi_t = mid
                nbl = 0
                for c in range(nb):
                    bl[nbl] = c
                    nbl += bm[c] >= t
                cnt = 0
                for i in range(b):
                    base = i * nb
                    for q in range(nbl):
                        j = base + bl[q]
                        v = row[j]
                        cv[cnt] = v
                        ci[cnt] = j
                        cnt += v >= t
                if cnt > k:
                    top_front(cv, ci, cnt, k)
                for q in range(k):
                    v = cv[q]
                    out_v[r, q] = v if v > 0 else 0
                    out_i[r, q] = ci[q]

    @njit(parallel=True, nogil=True, cache=_CACHE, boundscheck=False, fastmath=fast)
    def decode(indices, values, weight, out, rows_per_block):
        """``out[t] += sum_j values[t, j] * weight[indices[t, j]]`` (``out`` holds the bias or 0).

        The rows of ``weight`` are taken ``rows_per_block`` at a time (a block that fits in a
        core's cache, re-read by every token) rather than gathered from memory once per entry."""
        n, k = indices.shape
        n_rows, d = weight.shape
        for lo in range(0, n_rows, rows_per_block):
            hi = lo + rows_per_block
            for t in prange(n):
                o = out[t]
                for j in range(k):
                    f = indices[t, j]
                    if f >= lo and f < hi:
                        v = values[t, j]
                        w = weight[f]
                        for c in range(d):
                            o[c] += v * w[c]

    @njit(parallel=True, nogil=True, cache=_CACHE, boundscheck=False, fastmath=fast)
    def sampled_dot(grad, weight, indices, values, extra, out, rows_per_block):
        """``out[t, j] = <grad[t], weight[indices[t, j]]> (+ extra[t, j])``, 0 where ``values[t, j] <= 0``
        (``weight`` read ``rows_per_block`` rows at a time, as in :func:`decode`)."""
        n, k = indices.shape
        n_rows = weight.shape[0]
        d = grad.shape[1]
        has_extra = extra.shape[0] == n
        zero = np.zeros(1, out.dtype)
        for lo in range(0, n_rows, rows_per_block):
            hi = lo + rows_per_block
            for t in prange(n):
                g = grad[t]
                for j in range(k):
                    f = indices[t, j]
                    if f >= lo and f < hi:
                        if values[t, j] > 0:
                            w = weight[f]
                            s = zero[0]
                            for c in range(d):
                                s += g[c] * w[c]
                            if has_extra:
                                s += extra[t, j]
                            out[t, j] = s
                        else:
                            out[t, j] = zero[0]

    @njit(nogil=True, cache=_CACHE, boundscheck=False)
    def by_feature(indices, n_features, block, crow, order):
        """Counting sort of the flat selection by (token block, feature): with ``key = (t // block)
        * n_features + f``, ``order[crow[key]:crow[key + 1]]`` are the flat positions ``t * k + j``
        with ``indices[t, j] == f`` and ``t`` in that block of ``block`` tokens, increasing."""
        n, k = indices.shape
        crow[:] = 0
        for t in range(n):
            base = t // block * n_features + 1
            for j in range(k):
                crow[base + indices[t, j]] += 1
        for key in range(crow.shape[0] - 1):
            crow[key + 1] += crow[key]
        fill = crow[:-1].copy()
        p = 0
        for t in range(n):
            base = t // block * n_features
            for j in range(k):
                key = base + indices[t, j]
                order[fill[key]] = p
                fill[key] += 1
                p += 1

    @njit(parallel=True, nogil=True, cache=_CACHE, boundscheck=False, fastmath=fast)
    def feature_grads(crow, order, k, values, grad_recon, grad_values, x_in, g_wd, g_we_t, g_be):
        """Per feature ``f`` (rows of the outputs, in parallel):
        ``g_wd[f] = sum values[t, j] grad_recon[t]``, ``g_we_t[f] = sum grad_values[t, j] x_in[t]``,
        ``g_be[f] = sum grad_values[t, j]`` over the selected ``(t, j)`` with ``indices[t, j] == f``,
        one block of tokens at a time (``crow``/``order`` from :func:`by_feature`): a block's rows
        of ``grad_recon`` and ``x_in`` stay in cache while every feature reads them, instead of
        gathering each token's rows from memory once per selected feature. An output that is not
        wanted is passed with 0 columns (and its operand too)."""
        n_features = g_be.shape[0]
        n_blocks = (crow.shape[0] - 1) // n_features
        d_out = g_wd.shape[1]
        d_in = g_we_t.shape[1]
        for blk in range(n_blocks):
            first = blk == 0
            for f in prange(n_features):
                key = blk * n_features + f
                a = g_wd[f]
                e = g_we_t[f]
                if first:
                    for c in range(d_out):
                        a[c] = 0.0
                    for c in range(d_in):
                        e[c] = 0.0
                sb = 0.0
                for q in range(crow[key], crow[key + 1]):
                    p = order[q]
                    t = p // k
                    j = p - t * k
                    v = values[t, j]
                    gr = grad_recon[t]
                    for c in range(d_out):
                        a[c] += v * gr[c]
                    gv = grad_values[t, j]
                    sb += gv
                    xr = x_in[t]
                    for c in range(d_in):
                        e[c] += gv * xr[c]
                if first:
                    g_be[f] = sb
                else:
                    g_be[f] += sb

    del numba
    return {"select_rows": select_rows, "top_front": top_front, "decode": decode, "sampled_dot": sampled_dot,
            "by_feature": by_feature, "feature_grads": feature_grads}
