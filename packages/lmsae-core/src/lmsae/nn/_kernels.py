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

_LOCK = threading.Lock()  # numba's "workqueue" layer must not be entered by two threads at once
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


def _threading_layer() -> str:
    """numba's thread pool for the kernels, measured on 2-core CPUs (benchmarks/topk_step.py).

    OpenMP ("omp") scales the kernels best (2 threads: 1.9-2x for the selection, 1.7x for the
    backward, against 1.0-1.3x with numba's own "workqueue" pool), but it is a second OpenMP
    runtime next to PyTorch's: with spinning waits (the libgomp default) the two teams fight for
    the cores and a Trainer step ran 1.7-2x slower. So "omp" only when OpenMP threads wait
    passively (``OMP_WAIT_POLICY=PASSIVE``, which ``import lmsae`` before torch and the CLI set),
    else "workqueue". Override with ``NUMBA_THREADING_LAYER``."""
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        try:
            from numba.np.ufunc import omppool  # noqa: F401  (present when numba has OpenMP)

            return "omp"
        except ImportError:
            pass
    return "workqueue"


def _build() -> dict[str, Any]:  # noqa: C901 - the kernels are defined together on purpose
    import numba
    import numpy as np
    from numba import njit, prange
    from numba.core import entrypoints

    entrypoints.init_all()  # numba's own extension lookup, done now rather than at the first compile
    if "NUMBA_THREADING_LAYER" not in os.environ:
        os.environ["NUMBA_THREADING_LAYER"] = _threading_layer()
        numba.config.reload_config()  # numba re-reads its configuration from the environment

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
    def select_rows(pre, bias, b, k, out_v, out_i, bad, chunks):
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

        ``bias`` (length ``f``, or 0 for none) is first added to each row in place, so the GEMM
        before can skip it (``x W`` instead of ``b + x W``: no separate pass writing the bias).
        Rows holding a NaN or an infinity are flagged in ``bad`` (the caller redoes them with
        ``torch.topk``). ``out_v`` gets ``max(value, 0)`` (the TopK SAE's ReLU), ``out_i`` the
        columns. Rows are processed in ``chunks`` parallel chunks, each with its own scratch.
        """
        n, f = pre.shape
        nb = f // b
        ng = nb // k
        has_bias = bias.shape[0] == f
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
                if has_bias:  # the encoder bias is added here, in the pass that reads the row anyway
                    for j in range(f):
                        row[j] += bias[j]
                for c in range(nb):
                    bm[c] = row[c]
                # two segments per sweep over bm (half the loads and stores of bm: 2.6x faster
                # than one at a time); "+ (v1 + v2) * 0" lets NaN/inf reach bm
                i = 1
                while i + 1 < b:
                    b1 = i * nb
                    b2 = b1 + nb
                    for c in range(nb):
                        v1 = row[b1 + c]
                        v2 = row[b2 + c]
                        v = v1 if v1 > v2 else v2
                        m = bm[c]
                        bm[c] = (v if v > m else m) + (v1 + v2) * zero
                    i += 2
                if i < b:
                    b1 = i * nb
                    for c in range(nb):
                        v = row[b1 + c]
                        m = bm[c]
                        bm[c] = (v if v > m else m) + v * zero
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
    def decode(indices, values, weight, bias, out, rows_per_block):
        """``out[t] = bias + sum_j values[t, j] * weight[indices[t, j]]`` (``bias`` of length
        ``d`` or 0 for none; ``out`` need not be initialised).

        The rows of ``weight`` are taken ``rows_per_block`` at a time (a block that fits in a
        core's cache, re-read by every token) rather than gathered from memory once per entry."""
        n, k = indices.shape
        n_rows, d = weight.shape
        has_bias = bias.shape[0] == d
        for lo in range(0, n_rows, rows_per_block):
            hi = lo + rows_per_block
            for t in prange(n):
                o = out[t]
                if lo == 0:
                    if has_bias:
                        for c in range(d):
                            o[c] = bias[c]
                    else:
                        for c in range(d):
                            o[c] = 0.0
                pending = -1  # entries are added two at a time: half the loads/stores of o
                for j in range(k):
                    f = indices[t, j]
                    if f >= lo and f < hi:
                        if pending < 0:
                            pending = j
                            continue
                        v0 = values[t, pending]
                        w0 = weight[indices[t, pending]]
                        v1 = values[t, j]
                        w1 = weight[f]
                        for c in range(d):
                            o[c] += v0 * w0[c] + v1 * w1[c]
                        pending = -1
                if pending >= 0:
                    v0 = values[t, pending]
                    w0 = weight[indices[t, pending]]
                    for c in range(d):
                        o[c] += v0 * w0[c]

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
                q = crow[key]
                end = crow[key + 1]
                while q + 1 < end:  # two entries at a time: half the loads/stores of a and e
                    p0 = order[q]
                    t0 = p0 // k
                    j0 = p0 - t0 * k
                    p1 = order[q + 1]
                    t1 = p1 // k
                    j1 = p1 - t1 * k
                    v0 = values[t0, j0]
                    v1 = values[t1, j1]
                    g0 = grad_recon[t0]
                    g1 = grad_recon[t1]
                    for c in range(d_out):
                        a[c] += v0 * g0[c] + v1 * g1[c]
                    gv0 = grad_values[t0, j0]
                    gv1 = grad_values[t1, j1]
                    sb += gv0 + gv1
                    x0 = x_in[t0]
                    x1 = x_in[t1]
                    for c in range(d_in):
                        e[c] += gv0 * x0[c] + gv1 * x1[c]
                    q += 2
                if q < end:
                    p0 = order[q]
                    t0 = p0 // k
                    j0 = p0 - t0 * k
                    v0 = values[t0, j0]
                    g0 = grad_recon[t0]
                    for c in range(d_out):
                        a[c] += v0 * g0[c]
                    gv0 = grad_values[t0, j0]
                    sb += gv0
                    x0 = x_in[t0]
                    for c in range(d_in):
                        e[c] += gv0 * x0[c]
                if first:
                    g_be[f] = sb
                else:
                    g_be[f] += sb

    @njit(parallel=True, nogil=True, cache=_CACHE, boundscheck=False, fastmath=fast)
    def recon_stats(rec, lab, vals, keep, per_token, colsum):
        """Per kept token ``t`` (``keep[t]``; zeros for the others), in float64, ``per_token[t]`` =
        ``(||e||^2, ||y||^2, ||e||, ||y||, ||x|| / ||y|| (0 if y = 0), l0, sum of activations,
        [y != 0])`` with
        ``x = rec[t]``, ``y = lab[t]``, ``e = x - y``, the activations ``vals[t]`` (``(tokens, k)``);
        ``colsum[ch]`` sums the kept label rows of chunk ``ch`` (``colsum.shape[0]`` chunks of
        tokens, in parallel)."""
        n, d = rec.shape
        k = vals.shape[1]
        chunks = colsum.shape[0]
        for ch in prange(chunks):
            r0 = ch * n // chunks
            r1 = (ch + 1) * n // chunks
            for t in range(r0, r1):
                e = 0.0
                ys = 0.0
                xs = 0.0
                l0 = 0.0
                act = 0.0
                if keep[t]:
                    for c in range(d):
                        y = np.float64(lab[t, c])
                        x = np.float64(rec[t, c])
                        e += (x - y) * (x - y)
                        ys += y * y
                        xs += x * x
                    for c in range(d):
                        colsum[ch, c] += lab[t, c]
                    for j in range(k):
                        v = np.float64(vals[t, j])
                        l0 += v > 0
                        act += v
                per_token[t, 0] = e
                per_token[t, 1] = ys
                per_token[t, 2] = np.sqrt(e)
                per_token[t, 3] = np.sqrt(ys)
                per_token[t, 4] = np.sqrt(xs) / np.sqrt(ys) if ys > 0 else 0.0
                per_token[t, 5] = l0
                per_token[t, 6] = act
                per_token[t, 7] = 1.0 if ys > 0 else 0.0

    @njit(nogil=True, cache=_CACHE, boundscheck=False)
    def count_fired(indices, vals, keep, counts):
        """``counts[f] += 1`` for every kept token and slot with ``indices[t, j] == f`` and
        ``vals[t, j] > 0`` (``counts`` float64, zeroed by the caller)."""
        n, k = indices.shape
        for t in range(n):
            if keep[t]:
                for j in range(k):
                    if vals[t, j] > 0:
                        counts[indices[t, j]] += 1.0

    @njit(parallel=True, nogil=True, cache=_CACHE, boundscheck=False)
    def signsgd_sf_step(p, g, z, x, lr, weight_decay, c, beta):
        """One schedule-free sign-SGD update of flat parameters, in one pass (see
        :class:`lmsae.training.optim.SignSGDScheduleFree`): ``z -= lr (wd y + sign(g))``,
        ``x += c (z - x)``, ``y = z + beta (x - z)`` written into ``p`` (``y`` from the stored,
        rounded ``z`` and ``x``, exactly as :func:`interpolate` computes it)."""
        for i in prange(p.shape[0]):
            gi = g[i]
            s = gi if gi != gi else (1.0 if gi > 0 else (-1.0 if gi < 0 else 0.0))  # sign, NaN kept
            zi = z[i]
            if weight_decay != 0.0:
                z[i] = zi - lr * weight_decay * p[i]
                zi = z[i]
            z[i] = zi - lr * s
            zi = z[i]
            xi = x[i]
            x[i] = xi + c * (zi - xi)
            xi = x[i]
            p[i] = zi + beta * (xi - zi)

    @njit(parallel=True, nogil=True, cache=_CACHE, boundscheck=False)
    def interpolate(p, z, x, beta):
        """``p = z + beta (x - z)`` elementwise (flat arrays)."""
        for i in prange(p.shape[0]):
            zi = z[i]
            p[i] = zi + beta * (x[i] - zi)

    del numba
    return {"select_rows": select_rows, "top_front": top_front, "decode": decode, "sampled_dot": sampled_dot,
            "by_feature": by_feature, "feature_grads": feature_grads, "recon_stats": recon_stats,
            "count_fired": count_fired, "signsgd_sf_step": signsgd_sf_step, "interpolate": interpolate}
