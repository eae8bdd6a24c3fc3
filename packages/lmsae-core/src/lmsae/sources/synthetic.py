"""Seeded synthetic activations with a known sparse ground truth.

:class:`SyntheticActivations` stands in for a language model: every token is a sparse,
non-negative combination of fixed random unit directions, plus an optional fixed offset and
Gaussian noise. Because the true dictionary is known, a trained SAE (or transcoder) can be
scored with :func:`max_cosine_similarity`, :func:`mean_max_cosine` and
:func:`recovery_fraction` without any model or dataset.

Generative model, per token::

    active_i  ~ Bernoulli(p_i)                      (independently for each feature i)
    a_i       =  m_i if active_i else 0,  m_i > 0    (heavy-tailed magnitude)
    x         =  sum_i a_i * features_in[i]  + bias     + N(0, noise_std^2 I)
    y         =  sum_i a_i * features_out[i] + bias_out (transcoder mode only)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from numbers import Integral, Real
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from lmsae.errors import ShapeError

__all__ = [
    "SyntheticActivations",
    "max_cosine_similarity",
    "mean_max_cosine",
    "recovery_fraction",
]

_MAGNITUDES = ("lognormal", "exponential", "constant")
_FIRING = ("zipf", "uniform")
_RESERVED_KEYS = ("mask", "tokens")

# Upper bound on the (tokens x frequent features) uniform draws held at once while sampling
# the frequent features; keeps memory flat when many features are frequent.
_FIRING_CHUNK_ELEMENTS = 1 << 22

# Features firing more often than this are sampled with one uniform per (token, feature);
# rarer ones by binomial counts plus random token positions (see _sample_code).
_DENSE_PROBABILITY = 1 / 32

# Stream identifiers for the seed tree: ground-truth components and batches never share a
# random stream, so e.g. turning on ``bias_scale`` does not change ``features_in``.
_STREAM_TRUTH = 0
_STREAM_BATCH = 1
_TRUTH_PERMUTATION, _TRUTH_FEATURES_IN, _TRUTH_BIAS, _TRUTH_FEATURES_OUT, _TRUTH_BIAS_OUT = range(5)


def _generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator for the stream ``(seed, *key)``.

    SeedSequence hashes the whole key, so neighbouring batch indices or seeds give
    statistically independent streams (unlike ``manual_seed(seed + i)``).
    """
    state = np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(1, np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def _check_int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        kind = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value}")
    return int(value)


def _check_real(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def _unit_rows(generator: torch.Generator, n: int, d: int) -> Tensor:
    """``(n, d)`` float64 rows drawn uniformly on the unit sphere."""
    rows = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def _offset(generator: torch.Generator, d: int, norm: float) -> Tensor:
    """A ``(d,)`` float64 vector of the given norm in a random direction (zeros if norm is 0)."""
    if norm == 0:
        return torch.zeros(d, dtype=torch.float64)
    return _unit_rows(generator, 1, d)[0] * norm


def _calibrated_probabilities(weights: Tensor, mean_active: float) -> Tensor:
    """Scale descending ``weights`` (n,) to probabilities clipped at 1 summing to ``mean_active``.

    Finds the smallest k such that clipping the k largest to 1 and scaling the rest by
    c = (mean_active - k) / sum(weights[k:]) keeps every unclipped p <= 1 (water-filling).
    Requires 0 < mean_active <= n and strictly positive, non-increasing weights.
    """
    n = weights.numel()
    suffix = weights.flip(0).cumsum(0).flip(0)  # suffix[k] = sum(weights[k:])
    ks = torch.arange(n, dtype=torch.float64)
    scale = (mean_active - ks) / suffix
    # Relative slack so that mean_active == n (everything always fires) is accepted.
    feasible = (scale * weights <= 1 + 1e-9) & (scale > 0)
    k = int(feasible.nonzero()[0, 0])
    probabilities = (scale[k] * weights).clamp(max=1.0)
    probabilities[:k] = 1.0
    return probabilities


class SyntheticActivations:
    """An iterable of activation batches generated from a known sparse dictionary.

    Args:
        d_model: width of the input activations ``x``.
        n_features: number of ground-truth features.
        mean_active: expected number of active features per token (0 < mean_active <= n_features).
        batch_size: tokens per batch, or sequences per batch when ``context_size`` is set.
        seed: non-negative int; fixes the ground truth and every batch.
        hook_point: batch key of the inputs ``x``.
        hook_point_out: batch key of the transcoder labels ``y``; ``None`` for SAE mode.
        d_out: width of ``y`` (defaults to ``d_model``); only valid with ``hook_point_out``.
        magnitude: distribution of active magnitudes, all positive with mean ``magnitude_scale``:
            ``"lognormal"`` (sigma 1, heavy tail), ``"exponential"`` or ``"constant"``.
        magnitude_scale: mean magnitude of an active feature.
        firing_distribution: ``"zipf"`` (p_i proportional to 1/(rank+1)^zipf_exponent, ranks
            shuffled over features by the seed) or ``"uniform"`` (all p_i equal).
        zipf_exponent: tail exponent for ``"zipf"``; 0 is uniform, larger is more skewed.
        noise_std: standard deviation of isotropic Gaussian noise added to ``x`` (not ``y``).
        bias_scale: norm of the fixed random offsets ``bias`` (and ``bias_out``); 0 for none.
        n_batches: number of batches an iterator yields; ``None`` for an endless stream.
        context_size: if set, batches are ``(batch_size, context_size, d)`` sequences.
        dtype: floating dtype of the activation tensors and returned codes.

    Batches (from iteration or :meth:`batch`) are dicts::

        {hook_point: (B, d_model), [hook_point_out: (B, d_out)],
         "mask": (B,) bool, all True, "tokens": (B,) int64}

    with ``B`` replaced by ``(batch_size, context_size)`` in sequence mode. ``tokens`` is a fake
    token id: the index of the strongest active feature (lowest index on ties), or -1 when no
    feature fires.

    Batch ``i`` depends only on ``(seed, i)``, so :meth:`iter_from` resumes a stream in O(1).

    Ground-truth attributes (float32, or float64 when ``dtype`` is float64):
        ``features_in`` (n_features, d_model) unit rows; ``bias`` (d_model,);
        ``features_out`` (n_features, d_out) unit rows and ``bias_out`` (d_out,) in transcoder
        mode, else ``None``; ``firing_probabilities`` (n_features,) float64, summing to
        ``mean_active``.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_features: int,
        mean_active: float,
        batch_size: int,
        seed: int = 0,
        hook_point: str = "synthetic.hook_in",
        hook_point_out: str | None = None,
        d_out: int | None = None,
        magnitude: str = "lognormal",
        magnitude_scale: float = 1.0,
        firing_distribution: str = "zipf",
        zipf_exponent: float = 1.0,
        noise_std: float = 0.0,
        bias_scale: float = 0.0,
        n_batches: int | None = None,
        context_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.d_model = _check_int("d_model", d_model)
        self.n_features = _check_int("n_features", n_features)
        self.batch_size = _check_int("batch_size", batch_size)
        self.seed = _check_int("seed", seed, minimum=0)
        self.mean_active = _check_real("mean_active", mean_active, positive=True)
        if self.mean_active > self.n_features:
            raise ValueError(
                f"mean_active={self.mean_active} is infeasible: it cannot exceed "
                f"n_features={self.n_features} (each feature fires at most once per token)"
            )
        if not isinstance(hook_point, str) or not hook_point:
            raise ValueError(f"hook_point must be a non-empty string, got {hook_point!r}")
        if hook_point in _RESERVED_KEYS:
            raise ValueError(f"hook_point must not be one of the reserved batch keys {_RESERVED_KEYS}")
        if hook_point_out is not None:
            if not isinstance(hook_point_out, str) or not hook_point_out:
                raise ValueError(f"hook_point_out must be a non-empty string or None, got {hook_point_out!r}")
            if hook_point_out in _RESERVED_KEYS:
                raise ValueError(
                    f"hook_point_out must not be one of the reserved batch keys {_RESERVED_KEYS}"
                )
            if hook_point_out == hook_point:
                raise ValueError(f"hook_point_out must differ from hook_point (both {hook_point!r})")
        if d_out is not None and hook_point_out is None:
            raise ValueError("d_out is only valid in transcoder mode: also set hook_point_out")
        self.hook_point = hook_point
        self.hook_point_out = hook_point_out
        self.d_out: int | None = None
        if hook_point_out is not None:
            self.d_out = self.d_model if d_out is None else _check_int("d_out", d_out)
        if magnitude not in _MAGNITUDES:
            raise ValueError(f"magnitude must be one of {_MAGNITUDES}, got {magnitude!r}")
        if firing_distribution not in _FIRING:
            raise ValueError(f"firing_distribution must be one of {_FIRING}, got {firing_distribution!r}")
        self.magnitude = magnitude
        self.firing_distribution = firing_distribution
        self.magnitude_scale = _check_real("magnitude_scale", magnitude_scale, positive=True)
        self.zipf_exponent = _check_real("zipf_exponent", zipf_exponent)
        self.noise_std = _check_real("noise_std", noise_std)
        self.bias_scale = _check_real("bias_scale", bias_scale)
        self.n_batches = None if n_batches is None else _check_int("n_batches", n_batches)
        self.context_size = None if context_size is None else _check_int("context_size", context_size)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.dtype = dtype
        # Sums are accumulated in at least float32 so low-precision outputs are rounded once.
        self._compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32

        self.position = 0
        self._build_ground_truth()

    # ------------------------------------------------------------------ ground truth

    def _build_ground_truth(self) -> None:
        n, seed = self.n_features, self.seed
        if self.firing_distribution == "zipf":
            ranks = torch.arange(1, n + 1, dtype=torch.float64)
            by_rank = _calibrated_probabilities(ranks.pow(-self.zipf_exponent), self.mean_active)
        else:
            by_rank = torch.full((n,), self.mean_active / n, dtype=torch.float64)
        # Shuffle so feature index carries no information about frequency (a learned
        # dictionary's row order must not matter for scoring either).
        permutation = torch.randperm(n, generator=_generator(seed, _STREAM_TRUTH, _TRUTH_PERMUTATION))
        probabilities = torch.empty_like(by_rank)
        probabilities[permutation] = by_rank
        self.firing_probabilities: Tensor = probabilities
        # Comparing float32 uniforms against float32 probabilities; cached once.
        self._firing_threshold = probabilities.to(torch.float32)
        frequent = probabilities > _DENSE_PROBABILITY
        self._dense_features = frequent.nonzero()[:, 0]
        self._sparse_features = (~frequent).nonzero()[:, 0]

        cd = self._compute_dtype
        truth = (seed, _STREAM_TRUTH)
        self.features_in: Tensor = _unit_rows(_generator(*truth, _TRUTH_FEATURES_IN), n, self.d_model).to(cd)
        self.bias: Tensor = _offset(_generator(*truth, _TRUTH_BIAS), self.d_model, self.bias_scale).to(cd)
        self.features_out: Tensor | None = None
        self.bias_out: Tensor | None = None
        if self.d_out is not None:
            self.features_out = _unit_rows(_generator(*truth, _TRUTH_FEATURES_OUT), n, self.d_out).to(cd)
            self.bias_out = _offset(_generator(*truth, _TRUTH_BIAS_OUT), self.d_out, self.bias_scale).to(cd)

    # ------------------------------------------------------------------ batches

    @property
    def tokens_per_batch(self) -> int:
        """Number of token positions in one batch (``batch_size * context_size`` in sequence mode)."""
        return self.batch_size * (self.context_size or 1)

    def _sample_code(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Sparse code of one batch: ``(rows, cols, values)`` sorted row-major, values > 0 (float32).

        Every (token, feature) pair fires independently with probability p_feature. Frequent
        features are drawn densely (one uniform per pair); rare ones, usually the vast
        majority, are drawn as k ~ Binomial(tokens, p) followed by a uniform k-subset of
        tokens, so the cost scales with the number of firings rather than tokens x n_features.
        Both give the same distribution.
        """
        n_tokens, n = self.tokens_per_batch, self.n_features
        rows, cols = [], []

        dense = self._dense_features
        if dense.numel():
            threshold = self._firing_threshold[dense]
            chunk = max(1, _FIRING_CHUNK_ELEMENTS // dense.numel())
            for start in range(0, n_tokens, chunk):
                stop = min(n_tokens, start + chunk)
                uniforms = torch.rand(stop - start, dense.numel(), generator=generator)
                r, c = (uniforms < threshold).nonzero(as_tuple=True)
                rows.append(r + start)
                cols.append(dense[c])

        sparse = self._sparse_features
        if sparse.numel():
            trials = torch.full((sparse.numel(),), float(n_tokens), dtype=torch.float64)
            counts = torch.binomial(trials, self.firing_probabilities[sparse], generator=generator)
            feature = sparse.repeat_interleave(counts.long())
            # Draw tokens with replacement and redraw the repeats until each feature's tokens
            # are distinct; the procedure is symmetric in tokens, so the resulting set is a
            # uniform k-subset. Repeats are rare (p <= _DENSE_PROBABILITY), so it ends fast.
            token = torch.randint(n_tokens, feature.shape, generator=generator)
            keys = feature * n_tokens + token
            while True:
                keys = keys.sort().values
                repeat = torch.zeros_like(keys, dtype=torch.bool)
                repeat[1:] = keys[1:] == keys[:-1]
                if not repeat.any():
                    break
                again = keys[repeat] // n_tokens
                token = torch.randint(n_tokens, again.shape, generator=generator)
                keys = torch.cat([keys[~repeat], again * n_tokens + token])
            rows.append(keys % n_tokens)
            cols.append(keys // n_tokens)

        # Canonical row-major order, so magnitudes below are assigned reproducibly and the
        # COO code is coalesced.
        flat = (torch.cat(rows) * n + torch.cat(cols)).sort().values
        row, col = flat // n, flat % n
        nnz = row.numel()
        scale = self.magnitude_scale
        if self.magnitude == "constant":
            values = torch.full((nnz,), scale)
        elif self.magnitude == "exponential":
            values = torch.empty(nnz).exponential_(1.0, generator=generator) * scale
        else:
            # Lognormal with sigma 1 and mu = -1/2, so the mean magnitude is magnitude_scale.
            values = torch.empty(nnz).log_normal_(-0.5, 1.0, generator=generator) * scale
        # An exact 0 would make an "active" feature indistinguishable from an inactive one.
        values.clamp_min_(torch.finfo(torch.float32).tiny)
        return row, col, values

    def _strongest(self, row: Tensor, col: Tensor, values: Tensor) -> Tensor:
        """``(tokens,)`` int64 index of each token's largest code entry (lowest on ties), or -1."""
        n_tokens = self.tokens_per_batch
        peak = torch.full((n_tokens,), -math.inf).scatter_reduce(0, row, values, reduce="amax")
        is_peak = values == peak[row]
        tokens = torch.full((n_tokens,), self.n_features, dtype=torch.int64)
        tokens.scatter_reduce_(0, row[is_peak], col[is_peak], reduce="amin")
        tokens[tokens == self.n_features] = -1
        return tokens

    def _decode(self, code: Tensor, features: Tensor, bias: Tensor) -> Tensor:
        # Sparse matmul: cost scales with the number of active features, not n_features.
        return torch.sparse.mm(code, features) + bias

    @overload
    def batch(self, i: int, return_codes: Literal[False] = False) -> dict[str, Tensor]: ...

    @overload
    def batch(self, i: int, return_codes: Literal[True]) -> tuple[dict[str, Tensor], Tensor]: ...

    def batch(self, i: int, return_codes: bool = False) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
        """Batch number ``i`` of the stream (does not touch :attr:`position`).

        Returns the batch dict; with ``return_codes=True`` returns ``(batch, codes)`` where
        ``codes`` is the dense sparse code, ``(batch_size, n_features)`` (or
        ``(batch_size, context_size, n_features)``) in ``dtype``, so that
        ``batch[hook_point] == codes @ features_in + bias`` when ``noise_std`` is 0.
        """
        i = _check_int("i", i, minimum=0)
        if self.n_batches is not None and i >= self.n_batches:
            raise IndexError(f"batch index {i} out of range for n_batches={self.n_batches}")
        generator = _generator(self.seed, _STREAM_BATCH, i)
        row, col, values = self._sample_code(generator)
        n_tokens, cd = self.tokens_per_batch, self._compute_dtype
        code = torch.sparse_coo_tensor(
            torch.stack([row, col]), values.to(cd), (n_tokens, self.n_features), is_coalesced=True, check_invariants=False
        )

        x = self._decode(code, self.features_in, self.bias)
        if self.noise_std > 0:
            x = x + torch.randn(x.shape, generator=generator, dtype=cd) * self.noise_std
        lead = (self.batch_size,) if self.context_size is None else (self.batch_size, self.context_size)
        out: dict[str, Tensor] = {self.hook_point: x.to(self.dtype).reshape(*lead, self.d_model)}
        features_out, bias_out = self.features_out, self.bias_out
        if self.hook_point_out is not None and features_out is not None and bias_out is not None:
            y = self._decode(code, features_out, bias_out)
            out[self.hook_point_out] = y.to(self.dtype).reshape(*lead, features_out.shape[1])
        out["mask"] = torch.ones(lead, dtype=torch.bool)
        out["tokens"] = self._strongest(row, col, values).reshape(lead)
        if not return_codes:
            return out
        return out, code.to_dense().to(self.dtype).reshape(*lead, self.n_features)

    def iter_from(self, position: int) -> Iterator[dict[str, Tensor]]:
        """Iterate from batch ``position`` on, as if ``position`` batches had been consumed.

        Costs nothing for the skipped batches. Sets :attr:`position` to ``position`` now and
        increments it for each batch yielded, so saving :attr:`position` and later calling
        ``iter_from(saved)`` resumes the stream exactly.
        """
        position = _check_int("position", position, minimum=0)
        if self.n_batches is not None and position > self.n_batches:
            raise ValueError(f"position={position} is past the end of the stream (n_batches={self.n_batches})")
        self.position = position
        return self._iterate(position)

    def _iterate(self, start: int) -> Iterator[dict[str, Tensor]]:
        i = start
        while self.n_batches is None or i < self.n_batches:
            batch = self.batch(i)
            i += 1
            self.position = i
            yield batch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        """Iterate from the first batch (equivalent to ``iter_from(0)``)."""
        return self.iter_from(0)

    def __repr__(self) -> str:
        mode = f", hook_point_out={self.hook_point_out!r}, d_out={self.d_out}" if self.hook_point_out else ""
        return (
            f"{type(self).__name__}(d_model={self.d_model}, n_features={self.n_features}, "
            f"mean_active={self.mean_active}, batch_size={self.batch_size}, seed={self.seed}{mode})"
        )


# ---------------------------------------------------------------------- scoring

# Bound on the (n_truth chunk x n_learned) similarity block held at once.
_SIMILARITY_CHUNK_ELEMENTS = 1 << 24


def _as_directions(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ShapeError(f"{name} must be 2-D (n, d), got shape {tuple(t.shape)}")
    return t


def _normalize_rows(t: Tensor) -> Tensor:
    # Zero rows stay zero (cosine 0 with everything) instead of becoming NaN.
    norms = t.norm(dim=1, keepdim=True)
    return t / torch.where(norms > 0, norms, torch.ones_like(norms))


def max_cosine_similarity(learned: Tensor, truth: Tensor) -> Tensor:
    """For each ground-truth direction, its best signed cosine over the learned directions.

    Args:
        learned: ``(n_learned, d)`` learned directions (e.g. decoder rows); ``n_learned >= 1``.
        truth: ``(n_truth, d)`` ground-truth directions (e.g. ``source.features_in``).

    Returns:
        ``(n_truth,)`` float32 (float64 if either input is float64) on ``learned.device``.
        Signed, so an anti-parallel learned row does not count as a recovery; zero rows
        (learned or true) have cosine 0 with everything.
    """
    learned = _as_directions("learned", learned)
    truth = _as_directions("truth", truth)
    if learned.shape[1] != truth.shape[1]:
        raise ShapeError(
            f"learned and truth must have the same width, got {tuple(learned.shape)} and {tuple(truth.shape)}"
        )
    if learned.shape[0] == 0:
        raise ShapeError("learned must have at least one row")
    dtype = torch.float64 if torch.float64 in (learned.dtype, truth.dtype) else torch.float32
    a = _normalize_rows(learned.detach().to(dtype))
    b = _normalize_rows(truth.detach().to(device=a.device, dtype=dtype))
    chunk = max(1, _SIMILARITY_CHUNK_ELEMENTS // a.shape[0])
    best = [(b[s : s + chunk] @ a.T).amax(dim=1) for s in range(0, b.shape[0], chunk)]
    return torch.cat(best) if best else torch.empty(0, dtype=dtype, device=a.device)


def _select(
    scores: Tensor, min_probability: float | None, probabilities: Tensor | None
) -> Tensor:
    """Keep the scores of features with ``probabilities >= min_probability`` (all if None)."""
    if min_probability is None:
        if probabilities is not None:
            raise ValueError("probabilities is only used with min_probability; set both or neither")
        selected = scores
    else:
        if probabilities is None:
            raise ValueError("min_probability needs probabilities (e.g. source.firing_probabilities)")
        probabilities = torch.as_tensor(probabilities)
        if probabilities.shape != scores.shape:
            raise ShapeError(
                f"probabilities must have shape {tuple(scores.shape)} (one per truth row), "
                f"got {tuple(probabilities.shape)}"
            )
        selected = scores[probabilities.to(scores.device) >= min_probability]
    if selected.numel() == 0:
        raise ValueError("no ground-truth features to score (truth is empty or min_probability excludes all)")
    return selected


def recovery_fraction(
    learned: Tensor,
    truth: Tensor,
    threshold: float = 0.9,
    *,
    min_probability: float | None = None,
    probabilities: Tensor | None = None,
) -> float:
    """Fraction of ground-truth features whose max cosine (see :func:`max_cosine_similarity`) is >= threshold.

    Args:
        learned: ``(n_learned, d)`` learned directions.
        truth: ``(n_truth, d)`` ground-truth directions.
        threshold: cosine at which a feature counts as recovered, in [-1, 1].
        min_probability: if set, only features with ``probabilities >= min_probability``
            are scored (rare features may be unlearnable from a finite budget).
        probabilities: ``(n_truth,)`` firing probabilities, required with ``min_probability``.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not -1 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [-1, 1], got {threshold!r}")
    scores = _select(max_cosine_similarity(learned, truth), min_probability, probabilities)
    return float((scores >= threshold).double().mean())


def mean_max_cosine(
    learned: Tensor,
    truth: Tensor,
    *,
    min_probability: float | None = None,
    probabilities: Tensor | None = None,
) -> float:
    """Mean over ground-truth features of their max cosine (MMCS); filtering as in :func:`recovery_fraction`."""
    scores = _select(max_cosine_similarity(learned, truth), min_probability, probabilities)
    return float(scores.double().mean())
