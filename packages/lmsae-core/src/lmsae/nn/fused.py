"""Fast, exact training path for TopK sparse autoencoders.

The plain path computes dense ``(tokens, d_sae)`` tensors three times per step (the
pre-activations, the ReLU output and the scattered TopK activations), decodes with a dense
``(tokens, d_sae) @ (d_sae, d_out)`` product, and back-propagates through all of it. A TopK SAE
only needs the dense encoder product once: every other quantity involves the ``k`` active
latents of each token only. :func:`topk_sae_forward` does that:

forward (no autograd graph is built inside)
    ``x' = x - input_bias`` (when the SAE subtracts ``b_D`` from its input), ``pre = x' W_E + b_E``
    written into a reusable buffer, ``values, indices = topk(pre, k)``, ``values = relu(values)``
    (the same activations as :class:`lmsae.nn.activations.TopK`, which applies ReLU first), and
    ``recon = b_D + sum_j values[:, j] W_D[indices[:, j]]`` (a sparse decode, ``O(k d_out)`` per
    token).

backward (hand-written, see :class:`_TopKSAEFunction`)
    ``grad_values[t, j] = <grad_recon[t], W_D[indices[t, j]]>`` (a sampled product), zeroed where
    ``values == 0`` (ReLU); then ``grad_W_D = S^T grad_recon`` and ``grad_W_E = (G^T x')^T`` with
    ``S`` and ``G`` the ``(tokens, d_sae)`` sparse matrices holding ``values`` and ``grad_values``
    at ``indices`` (the *sparse encoder backward*: only the ``k`` active latents of a token get
    encoder gradient), ``grad_b_E`` a scatter-add of ``grad_values``, ``grad_b_D`` the token sum
    of ``grad_recon``, and, with an input bias, ``grad_input_bias = -W_E grad_b_E``.

The results equal the plain path (``encode_pre`` -> ``TopK`` -> ``decode`` under autograd) up to
the order of floating-point summation: outputs and every gradient agree to ~1e-12 in float64
(tested in ``tests/test_fused.py``). Only the *choice* among exactly tied pre-activations at the
k-th place can differ, as it can between two calls of ``torch.topk``. Entries whose
pre-activation is <= 0 may be selected when a token has fewer than ``k`` positive ones; their
value is 0 and they get no gradient, exactly like the zeros the plain TopK keeps.

No ``(tokens, d_sae)`` tensor is allocated per step except the pre-activation buffer, which is
reused across steps when the caller keeps a ``buffers`` dict. After a call, ``buffers["pre"]``
holds the pre-activations (no gradient) until the next call; :func:`auxk_sae_forward` reads them
for the AuxK loss.

Token masks: like the plain TopK, the forward pass ignores the mask (TopK is per token). Masked
tokens get a reconstruction that a masked loss ignores, so they receive no gradient from it.
Padding garbage (NaN/inf) on masked tokens poisons gradients exactly as it does in the plain path
(the masked mean multiplies by 0).

:func:`sparse_batch_statistics` gives the training metrics of
:func:`lmsae.training.metrics.batch_statistics` from ``(indices, values)`` without building the
dense activations.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmsae.errors import ShapeError
from lmsae.nn import _kernels

__all__ = [
    "auxk_sae_forward",
    "squared_error_loss",
    "sparse_batch_statistics",
    "topk_sae_forward",
    "topk_select",
]

Buffers = MutableMapping[str, Any]

# ----------------------------------------------------------------------------------- helpers


def _buffer(buffers: Buffers | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A tensor of ``shape`` with ``like``'s dtype/device, reused from ``buffers[name]`` when possible."""
    if buffers is not None:
        buf = buffers.get(name)
        if (isinstance(buf, Tensor) and tuple(buf.shape) == shape and buf.dtype == like.dtype
                and buf.device == like.device):
            return buf
    buf = torch.empty(shape, dtype=like.dtype, device=like.device)
    if buffers is not None:
        buffers[name] = buf
    return buf


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _row_csr(indices: Tensor, values: Tensor, n_features: int) -> Tensor:
    """``(tokens, n_features)`` CSR matrix with ``values[t, j]`` at ``(t, indices[t, j])``."""
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, dtype=indices.dtype, device=indices.device)
    return _csr(crow, indices.reshape(-1), values.reshape(-1), (n, n_features))


class _Transpose:
    """The ``(n_features, tokens)`` CSR structure of the selection, shared by both weight gradients."""

    def __init__(self, indices: Tensor, n_features: int):
        n, k = indices.shape
        flat = indices.reshape(-1)
        if flat.device.type == "cpu" and flat.numel() < 2**31 and n_features < 2**31:
            # numpy's vectorised sort of (feature << 32 | position) keys: ~4x faster than
            # torch.sort on one thread, and torch.sort's parallel passes stall badly on a busy
            # machine (over 100 ms for 131k keys with 2 threads); bincount likewise.
            pos = torch.arange(flat.numel(), dtype=torch.int64)
            keys = np.sort(((flat << 32) | pos).numpy())
            self.order = torch.from_numpy(keys & 0xFFFFFFFF)
            counts = torch.from_numpy(np.bincount(flat.numpy(), minlength=n_features))
        else:
            self.order = torch.sort(flat, stable=False).indices
            counts = torch.bincount(flat, minlength=n_features)
        crow = torch.zeros(n_features + 1, dtype=torch.int64, device=flat.device)
        torch.cumsum(counts, 0, out=crow[1:])
        self.crow = crow
        self.col = torch.div(self.order, k, rounding_mode="floor")
        self.shape = (n_features, n)

    def matmul(self, values: Tensor, dense: Tensor) -> Tensor:
        """``S^T @ dense`` where ``S`` holds ``values`` (``(tokens, k)``) at the selection."""
        return _csr(self.crow, self.col, values.reshape(-1)[self.order], self.shape) @ dense


def _sampled_dot(grad: Tensor, weight: Tensor, indices: Tensor) -> Tensor:
    """``out[t, j] = <grad[t], weight[indices[t, j]]>``, shape of ``indices``."""
    pattern = _row_csr(indices, torch.zeros(indices.shape, dtype=grad.dtype, device=grad.device),
                       weight.shape[0])
    out = torch.sparse.sampled_addmm(pattern, grad, weight.t(), beta=0.0, alpha=1.0)
    return out.values().reshape(indices.shape)


_GRAD_BLOCK_BYTES = 2 << 20  # operand bytes per token block of the weight gradients (best of 0.5-64 MiB, 2-core CPU)


def _compiled(*tensors: Tensor) -> bool:
    """Whether the compiled CPU kernels apply: numba available, CPU float32/float64 tensors."""
    first = tensors[0]
    return (first.device.type == "cpu" and first.dtype in (torch.float32, torch.float64)
            and all(t.device.type == "cpu" and (t.dtype == first.dtype or not t.is_floating_point())
                    for t in tensors)
            and _kernels.available())


def _threads() -> int:
    return torch.get_num_threads()


_ROW_BLOCK_BYTES = 2 << 20  # decoder rows read per block by the sparse decode / sampled products


def _rows_per_block(weight: Tensor, k: int) -> int:
    """Rows of ``weight`` per block for :func:`_kernels.decode` / ``sampled_dot``: a cache-sized
    block, unless that takes so many blocks that re-reading the outputs once per block would
    cost more than gathering each entry's row (about ``k / 4`` blocks): then all rows at once."""
    n_rows, width = weight.shape
    rows = max(1, _ROW_BLOCK_BYTES // max(1, width * weight.element_size()))
    return rows if -(-n_rows // rows) <= max(1, k // 4) else n_rows


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _decode(indices: Tensor, values: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if _compiled(values, weight) and indices.dtype == torch.int64:
        n = indices.shape[0]
        out = torch.empty(n, weight.shape[1], dtype=weight.dtype)
        b = _np(bias) if bias is not None else np.empty(0, dtype=out.numpy().dtype)
        _kernels.call("decode", _np(indices), _np(values), _np(weight), b, out.numpy(),
                      _rows_per_block(weight, indices.shape[1]), threads=_threads())
        return out
    out = F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")
    if bias is not None:
        out.add_(bias)
    return out


# --------------------------------------------------------------------------------- selection

SELECT_METHODS = ("auto", "compiled", "topk", "two_stage", "two_stage_numpy")

_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool) for numpy selections on several threads


def _pool() -> ThreadPoolExecutor:
    global _POOL
    pid = os.getpid()
    if _POOL is None or _POOL[0] != pid:  # a forked child cannot use its parent's threads
        workers = max(2, os.cpu_count() or 1)
        _POOL = (pid, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmsae-topk"))
    return _POOL[1]


def _largest_columns(a: Tensor, k: int) -> Tensor:
    """Column indices ``(n, k)`` of the ``k`` largest entries of each row of a 2-D CPU tensor.

    ``numpy.argpartition`` (vectorised selection in numpy >= 2; it releases the GIL, so the rows
    are split over ``torch.get_num_threads()`` threads): for short rows it costs a fraction of
    ``torch.topk``, whose per-row overhead dominates there.
    """
    arr = a.numpy()
    n, m = arr.shape
    kth = m - k
    threads = min(torch.get_num_threads(), n // 256, os.cpu_count() or 1)
    if threads <= 1:
        # contiguous: index arithmetic and gathers on a strided view are several times slower
        return torch.from_numpy(np.ascontiguousarray(np.argpartition(arr, kth, axis=1)[:, kth:]))
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [_pool().submit(np.argpartition, arr[lo:hi], kth, axis=1) for lo, hi in pairwise(bounds)]
    return torch.from_numpy(np.concatenate([f.result()[:, kth:] for f in futures]))


def _two_stage_block(f: int, k: int) -> int:
    """Block size ``b`` of the two-stage selection, 0 when plain ``torch.topk`` is used.

    ``b`` is the largest power of two with ``b^2 k <= f`` (it minimises the ``f/b + k b`` entries
    the two selections look at), at least 4, dividing ``f``."""
    b = 1
    while (2 * b) ** 2 * k <= f:
        b *= 2
    while b >= 4 and f % b:
        b //= 2
    return b if b >= 4 else 0


@torch.no_grad()
def topk_select(pre: Tensor, k: int, *, buffers: Buffers | None = None,
                method: str = "auto", add_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(values, indices)``, each ``(tokens, min(k, d_sae))``: the TopK activations of ``pre``.

    ``values = relu(top-k values of pre)``; the dense activation ``zeros.scatter(indices,
    values)`` equals :class:`lmsae.nn.activations.TopK` applied to ``pre`` (which takes the
    top-k of ``relu(pre)``; they differ only in which zeros are listed). Order within a row is
    unspecified.

    ``add_bias`` (``(d_sae,)``): added to ``pre`` in place first (``pre`` then holds the
    pre-activations); the compiled selection does it in the pass that reads ``pre`` anyway, so a
    caller can compute ``x W`` without the bias (a plain GEMM) and save a pass.

    ``method``: ``"topk"`` is one ``torch.topk``; ``"two_stage"`` / ``"two_stage_numpy"`` an
    exact two-stage selection: the features are split into ``b`` strided blocks, the ``k`` blocks
    with the largest maxima are kept (every top-k entry lies in one of them: each of the k blocks
    whose maximum is >= the k-th largest value holds at least one top-k entry, and there are only
    k such entries), and the top-k is taken among their ``k * b`` entries; both selections use
    ``torch.topk`` or ``numpy.argpartition``. ``"compiled"``: the strided block maxima (one
    vectorised ``amax``), then one compiled pass per row (:mod:`lmsae.nn._kernels`) that scans
    only the blocks able to hold a top-k entry and selects among their entries above a
    guaranteed lower bound of the k-th value (rows holding NaN are redone with ``torch.topk``).
    ``"auto"`` (measured on 2-core CPUs: ``benchmarks/topk_step.py``): ``"compiled"`` on the CPU
    for float32/float64 when numba is available (about a fifth of ``torch.topk``'s time at
    ``d_sae = 4096, k = 32``), else the numpy two-stage selection when ``d_sae >= 16 k``,
    ``torch.topk`` otherwise (and always on accelerators).
    """
    if pre.ndim != 2:
        raise ShapeError(f"topk_select expects (tokens, d_sae) pre-activations, got shape {tuple(pre.shape)}")
    if method not in SELECT_METHODS:
        raise ValueError(f"unknown selection method {method!r}; valid: {', '.join(SELECT_METHODS)}")
    if add_bias is not None and not pre.is_contiguous():
        pre.add_(add_bias)  # in place, as documented, before a contiguous copy is taken
        add_bias = None
    pre = pre.contiguous()
    n, f = pre.shape
    k = min(int(k), f)
    b = _two_stage_block(f, k) if k > 0 else 0
    use_numpy = pre.device.type == "cpu" and pre.dtype in (torch.float32, torch.float64)
    if method == "auto":
        if use_numpy and k > 0 and n > 0 and _kernels.available():
            method = "compiled"
        else:
            method = "two_stage_numpy" if (use_numpy and b and f >= 16 * k) else "topk"
    if method == "compiled":
        if use_numpy and k > 0 and n > 0 and _kernels.available():
            return _select_compiled(pre, k, b or 1, add_bias)
        method = "two_stage_numpy" if (use_numpy and b) else "topk"
    if add_bias is not None:
        pre.add_(add_bias)
    if method != "topk" and not b:
        method = "topk"
    if method == "two_stage_numpy" and not use_numpy:
        method = "two_stage"
    if method == "topk" or n == 0:
        values, indices = torch.topk(pre, k, dim=1, sorted=False)
        return values.relu_(), indices
    nb = f // b
    block_max = _buffer(buffers, "block_max", (n, nb), pre)
    torch.amax(pre.view(n, b, nb), dim=1, out=block_max)
    if method == "two_stage_numpy":
        block = _largest_columns(block_max, k)
    else:
        block = torch.topk(block_max, k, dim=1, sorted=False).indices
    cand = (block.unsqueeze(-1) + torch.arange(0, f, nb, device=pre.device)).view(n, k * b)
    cand_values = torch.gather(pre, 1, cand)
    if method == "two_stage_numpy":
        j = _largest_columns(cand_values, k)
        values = torch.gather(cand_values, 1, j)
    else:
        values, j = torch.topk(cand_values, k, dim=1, sorted=False)
    return values.relu_(), torch.gather(cand, 1, j)


def _select_compiled(pre: Tensor, k: int, b: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    n, f = pre.shape
    values = torch.empty(n, k, dtype=pre.dtype)
    indices = torch.empty(n, k, dtype=torch.int64)
    bad = torch.empty(n, dtype=torch.bool)
    threads = _threads()
    bias_np = _np(bias) if bias is not None else np.empty(0, dtype=pre.numpy().dtype)
    _kernels.call("select_rows", pre.numpy(), bias_np, b, k, values.numpy(), indices.numpy(), bad.numpy(),
                  min(n, 8 * threads), threads=threads)
    if bool(bad.any()):  # rows holding NaN or inf: exactly what torch.topk (the plain TopK) picks
        rows = bad.nonzero().reshape(-1)
        v, i = torch.topk(pre[rows], k, dim=1, sorted=False)
        values[rows] = v.relu_()
        indices[rows] = i
    return values, indices


# ---------------------------------------------------------------------------- autograd core


class _TopKSAEFunction(torch.autograd.Function):
    """Sparse decode of a given selection with the hand-written TopK-SAE backward.

    Inputs ``x, W_E, b_E, W_D, b_D, input_bias`` (``b_D``/``input_bias`` may be None),
    ``x_in = x - input_bias`` (precomputed, no grad), ``indices``/``values`` (the selection,
    ``values`` already ReLU'd; no grad). Outputs ``(recon, values)``: both differentiable, the
    gradient of ``values`` flowing to the pre-activations of the selected entries.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_E: Tensor, b_E: Tensor, W_D: Tensor, b_D: Tensor | None,  # type: ignore[override]
                input_bias: Tensor | None, x_in: Tensor, indices: Tensor, values: Tensor):
        recon = _decode(indices, values, W_D, b_D)
        ctx.save_for_backward(x_in, W_E, W_D, indices, values)
        ctx.mark_non_differentiable(indices)
        ctx.has_b_D = b_D is not None
        ctx.has_input_bias = input_bias is not None
        out_values = values.clone()
        return recon, out_values

    @staticmethod
    def backward(ctx, grad_recon: Tensor | None, grad_values: Tensor | None):  # type: ignore[override]
        x_in, W_E, W_D, indices, values = ctx.saved_tensors
        need = ctx.needs_input_grad
        n_features = W_E.shape[1]
        g_x = g_W_E = g_b_E = g_W_D = g_b_D = g_ib = None
        need_enc = need[0] or need[1] or need[2] or need[5]
        tensors = [x_in, W_E, W_D, values] + [g for g in (grad_recon, grad_values) if g is not None]
        if _compiled(*tensors):
            gv, g_W_E, g_b_E, g_W_D = _backward_compiled(grad_recon, grad_values, x_in, W_D, indices, values,
                                                         n_features, need, need_enc)
        else:
            gv, g_W_E, g_b_E, g_W_D = _backward_torch(grad_recon, grad_values, x_in, W_D, indices, values,
                                                      n_features, need, need_enc)
        if grad_recon is not None and need[4]:
            g_b_D = grad_recon.sum(0)
        if need_enc:
            if need[5]:
                g_ib = -(W_E @ g_b_E)
            if need[0]:
                g_x = _decode(indices, gv, W_E.t().contiguous(), None)
            if not need[2]:
                g_b_E = None
        return g_x, g_W_E, g_b_E, g_W_D, g_b_D, g_ib, None, None, None


def _backward_torch(grad_recon, grad_values, x_in, W_D, indices, values, n_features, need, need_enc):
    """The backward with PyTorch sparse ops: ``(grad_values, g_W_E, g_b_E, g_W_D)``."""
    gv = g_W_E = g_b_E = g_W_D = None
    transpose = _Transpose(indices, n_features) if (need[1] or need[3]) else None
    if grad_recon is not None and need[3]:
        g_W_D = transpose.matmul(values, grad_recon)
    if need_enc:
        if grad_recon is not None:
            gv = _sampled_dot(grad_recon, W_D, indices)
            if grad_values is not None:
                gv = gv + grad_values
        elif grad_values is not None:
            gv = grad_values.clone()
        else:
            gv = torch.zeros_like(values)
        gv = gv.masked_fill_(values <= 0, 0)  # ReLU: no gradient where the activation is 0
        if need[1]:
            g_W_E = transpose.matmul(gv, x_in).t()
        if need[2] or need[5]:
            g_b_E = torch.zeros(n_features, dtype=gv.dtype, device=gv.device)
            g_b_E.index_add_(0, indices.reshape(-1), gv.reshape(-1))
    return gv, g_W_E, g_b_E, g_W_D


def _backward_compiled(grad_recon, grad_values, x_in, W_D, indices, values, n_features, need, need_enc):
    """The same with the compiled kernels: one pass per token for the sampled products, one pass
    per feature and block of tokens (a counting sort gives each its entries) for all three weight
    gradients."""
    n, k = indices.shape
    dtype = values.dtype
    threads = _threads()
    idx = _np(indices)
    vals = _np(values)
    gv = g_W_E = g_b_E = g_W_D = None
    if need_enc:
        gv = torch.empty(n, k, dtype=dtype)
        if grad_recon is not None:
            extra = _np(grad_values) if grad_values is not None else np.empty((0, k), dtype=vals.dtype)
            _kernels.call("sampled_dot", _np(grad_recon), _np(W_D), idx, vals, extra, gv.numpy(),
                          _rows_per_block(W_D, k), threads=threads)
        elif grad_values is not None:
            gv.copy_(grad_values).masked_fill_(values <= 0, 0)
        else:
            gv.zero_()
    want = np.array([grad_recon is not None and need[3], need_enc and need[1], need_enc and (need[2] or need[5])])
    if want.any():
        # token blocks whose rows of grad_recon and x_in (the gathered operands) fit in about
        # _GRAD_BLOCK_BYTES, i.e. stay in a core's L2 cache while every feature reads them
        row_bytes = (grad_recon.shape[1] if want[0] else 0) + (x_in.shape[1] if want[1] else 0)
        block = max(64, _GRAD_BLOCK_BYTES // max(1, row_bytes * values.element_size()))
        n_blocks = -(-n // block)
        crow = np.empty(n_blocks * n_features + 1, dtype=np.int64)
        order = np.empty(n * k, dtype=np.int64)
        _kernels.call("by_feature", idx, n_features, block, crow, order)
        dt = vals.dtype
        g_wd = torch.empty(n_features, W_D.shape[1] if want[0] else 0, dtype=dtype)
        g_we_t = torch.empty(n_features, x_in.shape[1] if want[1] else 0, dtype=dtype)
        g_be = torch.empty(n_features, dtype=dtype)
        _kernels.call("feature_grads", crow, order, k, vals,
                      _np(grad_recon) if want[0] else np.empty((n, 0), dtype=dt),
                      _np(gv) if gv is not None else np.zeros((n, k), dtype=dt),
                      _np(x_in) if want[1] else np.empty((n, 0), dtype=dt),
                      g_wd.numpy(), g_we_t.numpy(), g_be.numpy(), threads=threads)
        g_wd = g_wd if want[0] else None
        g_we_t = g_we_t if want[1] else None
        g_be = g_be if want[2] else None
        g_W_D = g_wd
        g_W_E = g_we_t.t() if g_we_t is not None else None
        g_b_E = g_be
    return gv, g_W_E, g_b_E, g_W_D


class _SquaredError(torch.autograd.Function):
    """Masked mean over tokens of ``||recon_t - label_t||^2`` with a one-pass backward."""

    @staticmethod
    def forward(ctx, recon: Tensor, label: Tensor, weight: Tensor | None):  # type: ignore[override]
        diff = recon - label
        per_token = torch.linalg.vecdot(diff, diff)
        if weight is None:
            loss = per_token.mean()
            scale = None
        else:
            # as lmsae.nn.axes.masked_token_mean: masked-out tokens cannot leak NaN/inf in
            keep = weight != 0
            den = weight.sum()
            loss = torch.where(keep, per_token * weight, torch.zeros_like(per_token)).sum()
            loss = torch.where(den > 0, loss / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(loss))
            scale = torch.where(keep, weight, torch.zeros_like(weight)) / torch.where(den > 0, den, torch.ones_like(den))
        ctx.save_for_backward(diff, scale)
        ctx.n = per_token.shape[0]
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        diff, scale = ctx.saved_tensors
        if scale is None:
            g = diff.mul_(grad * (2.0 / max(ctx.n, 1)))  # the saved difference is not needed again
        else:
            g = diff.mul_((2.0 * grad) * scale.unsqueeze(1))
            g = torch.where(scale.unsqueeze(1) != 0, g, torch.zeros_like(g))  # 0 * inf = NaN stays out
        need_recon, need_label, _ = ctx.needs_input_grad
        return (g if need_recon else None), (-g if need_label else None), None


def squared_error_loss(recon: Tensor, label: Tensor, mask: Tensor | None = None) -> Tensor:
    """:func:`lmsae.nn.losses.reconstruction_loss` for ``(*tokens, d)`` tensors with a ``tokens``
    mask: the masked mean over tokens of the squared error summed over ``d``, with a backward that
    is one pass over the saved difference (autograd's takes three or four)."""
    if recon.shape != label.shape:
        raise ShapeError(f"reconstruction has shape {tuple(recon.shape)} but label has shape {tuple(label.shape)}")
    d = recon.shape[-1]
    if mask is not None and tuple(mask.shape) != tuple(recon.shape[:-1]):
        raise ShapeError(f"mask has shape {tuple(mask.shape)}, expected the token shape {tuple(recon.shape[:-1])}")
    weight = mask.reshape(-1).to(recon.dtype) if mask is not None else None
    return _SquaredError.apply(recon.reshape(-1, d), label.reshape(-1, d), weight)


def _flatten(x: Tensor, width: int, name: str) -> tuple[Tensor, tuple[int, ...]]:
    if x.ndim < 1 or x.shape[-1] != width:
        raise ShapeError(f"{name}: expected (..., {width}), got shape {tuple(x.shape)}")
    return x.reshape(-1, width), tuple(x.shape[:-1])


def _check_params(x: Tensor, W_E: Tensor, b_E: Tensor, W_D: Tensor, b_D: Tensor | None,
                  input_bias: Tensor | None) -> None:
    d, f = W_E.shape
    if tuple(b_E.shape) != (f,) or W_D.ndim != 2 or W_D.shape[0] != f:
        raise ShapeError(f"W_E {tuple(W_E.shape)}, b_E {tuple(b_E.shape)} and W_D {tuple(W_D.shape)} must be "
                         "(d_in, d_sae), (d_sae,) and (d_sae, d_out)")
    if b_D is not None and tuple(b_D.shape) != (W_D.shape[1],):
        raise ShapeError(f"b_D has shape {tuple(b_D.shape)}, expected ({W_D.shape[1]},)")
    if input_bias is not None and tuple(input_bias.shape) != (d,):
        raise ShapeError(f"input_bias has shape {tuple(input_bias.shape)}, expected ({d},)")
    dtypes = {t.dtype for t in (x, W_E, b_E, W_D, b_D, input_bias) if t is not None}
    if len(dtypes) != 1:
        raise TypeError(f"topk_sae_forward needs one dtype for x and every parameter, got {sorted(map(str, dtypes))}")


# --------------------------------------------------------------------------------- public API


def topk_sae_forward(x: Tensor, W_E: Tensor, b_E: Tensor, W_D: Tensor, b_D: Tensor | None, k: int, *,
                     input_bias: Tensor | None = None, buffers: Buffers | None = None,
                     select_method: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """TopK SAE forward with the sparse backward: ``(recon, indices, values)``.

    Args:
        x: inputs ``(..., d_in)`` (any leading token dims).
        W_E, b_E, W_D, b_D: encoder ``(d_in, d_sae)``, ``(d_sae,)``; decoder ``(d_sae, d_out)``,
            ``(d_out,)`` or None.
        k: features kept per token (``min(k, d_sae)`` are kept).
        input_bias: subtracted from ``x`` before encoding (pass ``b_D`` for
            ``apply_decoder_bias_to_input``; its gradient from both uses is then summed).
        buffers: a dict the caller keeps between steps; ``buffers["pre"]`` is the reused
            ``(tokens, d_sae)`` pre-activation buffer (valid until the next call).
        select_method: how the top-k is found (same result): see :func:`topk_select`.

    Returns:
        ``recon`` ``(..., d_out)`` = ``decode(TopK(encode_pre(x)))``; ``indices`` ``(..., k)``
        int64 (no gradient); ``values`` ``(..., k)`` the activations (>= 0), differentiable
        like the dense activations they stand for. Gradients flow to every tensor argument that
        requires it (``x`` included, at extra cost).
    """
    _check_params(x, W_E, b_E, W_D, b_D, input_bias)
    x2, lead = _flatten(x, W_E.shape[0], "x")
    f = W_E.shape[1]
    with torch.no_grad():
        x_in = x2 if input_bias is None else x2 - input_bias
        pre = _buffer(buffers, "pre", (x2.shape[0], f), W_E)
        if select_method in ("auto", "compiled"):
            # x W_E alone (addmm would first write the bias into every row: a whole extra pass);
            # the selection adds b_E while it reads the rows
            torch.mm(x_in, W_E, out=pre)
            values, indices = topk_select(pre, k, buffers=buffers, method=select_method, add_bias=b_E.detach())
        else:
            torch.addmm(b_E, x_in, W_E, out=pre)
            values, indices = topk_select(pre, k, buffers=buffers, method=select_method)
    recon, values = _TopKSAEFunction.apply(x2, W_E, b_E, W_D, b_D, input_bias, x_in.detach(), indices, values)
    kk = indices.shape[1]
    return recon.reshape(*lead, W_D.shape[1]), indices.reshape(*lead, kk), values.reshape(*lead, kk)


def auxk_sae_forward(x: Tensor, W_E: Tensor, b_E: Tensor, W_D: Tensor, pre: Tensor, dead_mask: Tensor,
                     k_aux: int, *, input_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """AuxK reconstruction from the dead features: ``(aux_recon, indices, values)`` or None.

    Equal to ``decode_linear(auxk_select(hidden_pre, dead_mask, k_aux))`` (no decoder bias) with
    the same gradients, where ``pre`` holds ``hidden_pre`` without gradient, e.g.
    ``buffers["pre"]`` right after :func:`topk_sae_forward` on the same ``x`` and parameters.
    ``dead_mask`` is a bool ``(d_sae,)``. Returns None when no feature is dead or ``k_aux == 0``
    (the plain path's aux term is then zero). Allocates ``(tokens, n_dead)``.
    """
    _check_params(x, W_E, b_E, W_D, None, input_bias)
    x2, lead = _flatten(x, W_E.shape[0], "x")
    f = W_E.shape[1]
    if dead_mask.dtype != torch.bool or tuple(dead_mask.shape) != (f,):
        raise ShapeError(f"dead_mask must be a bool tensor of shape ({f},), got {dead_mask.dtype} "
                         f"{tuple(dead_mask.shape)}")
    if tuple(pre.shape) != (x2.shape[0], f):
        raise ShapeError(f"pre has shape {tuple(pre.shape)}, expected ({x2.shape[0]}, {f})")
    with torch.no_grad():
        dead = dead_mask.to(pre.device).nonzero().reshape(-1)
        kk = min(int(k_aux), int(dead.numel()))
        if kk <= 0:
            return None
        sub = pre.index_select(1, dead) if dead.numel() < f else pre
        values, j = torch.topk(sub, kk, dim=1, sorted=False)
        values.relu_()
        indices = dead[j] if dead.numel() < f else j
        x_in = x2 if input_bias is None else x2 - input_bias
    recon, values = _TopKSAEFunction.apply(x2, W_E, b_E, W_D, None, input_bias, x_in.detach(), indices, values)
    return recon.reshape(*lead, W_D.shape[1]), indices.reshape(*lead, kk), values.reshape(*lead, kk)


def _compiled_statistics(vals: Tensor, rec: Tensor, lab: Tensor, flat_mask: Tensor | None) -> dict[str, Tensor]:
    """The statistics of :func:`lmsae.training.metrics.batch_statistics` (but ``feature_count``)
    from one compiled pass over the reconstruction, the label and the ``(tokens, k)`` activation
    values, accumulating in float64; the label variance is ``sum ||y_t||^2 - n ||mean y||^2``
    (float64 sums: no cancellation worth speaking of at float32 inputs)."""
    n_rows = rec.shape[0]
    keep = (flat_mask != 0) if flat_mask is not None else torch.ones(n_rows, dtype=torch.bool)
    threads = _threads()
    chunks = max(1, min(n_rows, 4 * threads))
    per_token = torch.empty(n_rows, 8, dtype=torch.float64)
    colsum = torch.zeros(chunks, rec.shape[1], dtype=torch.float64)
    _kernels.call("recon_stats", rec.numpy(), lab.numpy(), _np(vals), keep.numpy(), per_token.numpy(),
                  colsum.numpy(), threads=threads)
    n = int(keep.sum())
    sq_err, y_sq, l2_error, label_norm, l2_ratio, l0, act_sum, l2_ratio_tokens = per_token.sum(0).unbind()
    var = y_sq - colsum.sum(0).square().sum() / max(n, 1)
    zero = torch.zeros((), dtype=torch.float64)
    return {
        "n_tokens": torch.tensor(float(n), dtype=torch.float64),
        "sq_err": sq_err,
        "explained_variance": (1 - sq_err / var.clamp_min(1e-30)) if n > 1 else zero,
        "l0": l0,
        "l2_error": l2_error,
        "label_norm": label_norm,
        "l2_ratio": l2_ratio,
        "l2_ratio_tokens": l2_ratio_tokens,
        "act_sum": act_sum,
        "act_count": l0.clone(),
    }


@torch.no_grad()
def sparse_batch_statistics(indices: Tensor, values: Tensor, recon: Tensor, label: Tensor, mask: Tensor | None,
                            n_features: int) -> dict[str, Tensor]:
    """:func:`lmsae.training.metrics.batch_statistics` from sparse activations.

    ``indices``/``values`` ``(*tokens, k)`` (as returned by :func:`topk_sae_forward`; each
    index at most once per token), ``recon``/``label`` ``(*tokens, d_out)``, ``mask`` of shape
    ``tokens`` or None. Same keys and values as the dense version on the scattered activations
    (feature axes ``(*token axes, "sae")``); ``feature_count`` (``(n_features,)``, float64) is a
    bincount, no ``(tokens, d_sae)`` tensor is built.
    """
    from lmsae.training.metrics import batch_statistics

    if indices.shape != values.shape:
        raise ShapeError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} differ in shape")
    k = indices.shape[-1]
    vals = values.detach().reshape(-1, k)
    idx = indices.reshape(-1, k)
    rec = recon.detach().reshape(-1, recon.shape[-1])
    lab = label.detach().reshape(-1, label.shape[-1])
    flat_mask = mask.reshape(-1) if mask is not None else None
    if _compiled(rec, lab) and rec.is_contiguous() and lab.is_contiguous():
        stats = _compiled_statistics(vals, rec, lab, flat_mask)
        keep = (flat_mask != 0) if flat_mask is not None else torch.ones(rec.shape[0], dtype=torch.bool)
        counts = torch.zeros(n_features, dtype=torch.float64)
        _kernels.call("count_fired", _np(idx), _np(vals), keep.numpy(), counts.numpy())
        stats["feature_count"] = counts
        return stats
    # the reconstruction terms and l0/act_sum/act_count depend on the values only, not on where
    # they sit: reuse the dense definition on the (tokens, k) values
    stats = batch_statistics(vals, ("batch", "sae"), rec, lab, ("batch", "d_model"), flat_mask)
    fired = vals > 0
    if flat_mask is not None:
        fired = fired & (flat_mask != 0).unsqueeze(-1)
    # one weighted pass (no boolean-indexed copy): each (token, slot) counts 1 where it fired
    counts = torch.bincount(idx.reshape(-1), weights=fired.reshape(-1).to(torch.float64), minlength=n_features)
    stats["feature_count"] = counts.to(device=stats["n_tokens"].device)
    return stats
