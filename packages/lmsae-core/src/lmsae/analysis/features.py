"""Per-feature statistics and example contexts from a stream of sequences.

:class:`FeatureAnalyzer` consumes feature activations of whole sequences, ``(B, T, F)``, and
keeps, for every feature at once (vectorised over features, no Python loop per feature):

- ``act_count`` (tokens where the feature is > 0), ``n_tokens`` (unmasked tokens seen) and
  ``max_activation``;
- a histogram of the non-zero activation magnitudes on fixed log-spaced bins shared by every
  feature (values outside the range are counted in the end bins);
- ``top_activations``: the ``n_top`` sequences with the highest peak (largest activation over the
  sequence's unmasked tokens); equal peaks are ordered by position in the stream (earlier first);
- stratified samples ``quantile_<lo>-<hi>``: up to ``n_per_quantile`` sequences whose peak lies
  in ``(lo * M, hi * M]`` where ``M`` is the feature's **final** maximum;
- optional per-sample extras: when ``update`` gets a ``sample_extras`` callback (an
  architecture's :meth:`~lmsae.dictionary.SparseDictionary.sample_extras`, e.g. Lorsa's
  z-patterns), it is called for the samples entering a kept slot in that batch only, and its
  rows are stored with the slot (``Sample.extras``): computed in the same pass, never by
  re-reading the stream.

The reference system's "non_activating" sample compared peaks with a *running* maximum, so what
it kept depended on the order of the stream. Here every candidate keeps its own peak; when the
running maximum grows, candidates are re-assigned to bands from their stored peaks, so after the
last batch every kept sample lies in its band of the final maximum (exactly).

Sampling within a band is bottom-k sampling with thresholds: each (sequence, feature) pair gets
a pseudo-random key in [0, 1) hashed from ``(seed, position of the sequence in the stream,
feature)``; a band keeps the ``n_per_quantile`` members of its population with the smallest keys,
and once it has overflowed, its threshold is the largest key it keeps (later arrivals above it are
not admitted). When the running maximum grows, candidates are re-binned from their stored peaks
and a band's new threshold is the smallest threshold of the old bands overlapping it; candidates
above it are dropped. So a sequence is never favoured for having survived the selection of
another band (nor penalised for having been discarded there): a band's sample is a random
sample of its final population, uniform up to a factor of about N / (N + 1) between members that
arrived in different bands (N the size of the band they competed in). The price: a band may end
with fewer than ``n_per_quantile`` samples although its population is larger (only after the
maximum grew past candidates). Bands may overlap with ``top_activations`` (the top band usually
does). The keys do not depend on how the stream is cut into batches; the result is deterministic
for a seed and a stream (and of the batch size too when every maximum is reached in the first
batch).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmsae.errors import DataError, PluginError, ShapeError
from lmsae.stores.base import FeatureAnalysis, Sample, Sampling

__all__ = [
    "FeatureAnalyzer",
    "analyze_stream",
    "attach_extras",
    "histogram_edges",
    "quantile_sampling_name",
    "sample_keys",
]

TOP_SAMPLING = "top_activations"

# sampling keys are 53-bit integers (key / 2**53 is the uniform [0, 1) value); a threshold of
# 2**53 is above every key: "no threshold yet"
_KEY_BITS = 53
_NO_THRESHOLD = 1 << _KEY_BITS
# composite sort keys pack (band, key) and (peak, sequence id) into one int64
_MAX_BANDS = 512
_MAX_SEQUENCES = 1 << 32


def histogram_edges(bins: int, low: float = 1e-4, high: float = 1e4) -> np.ndarray:
    """``bins + 1`` log-spaced edges from ``low`` to ``high`` (float64), shared by every feature."""
    if bins < 1:
        raise ValueError(f"histogram_bins must be >= 1, got {bins}")
    if not (0 < low < high) or not math.isfinite(high):
        raise ValueError(f"histogram range must satisfy 0 < low < high < inf, got ({low}, {high})")
    return np.logspace(math.log10(low), math.log10(high), bins + 1, dtype=np.float64)


def quantile_sampling_name(low: float, high: float) -> str:
    """``quantile_0.25-0.50``: the sampling of peaks in ``(low, high]`` times the final maximum."""
    return f"quantile_{low:.2f}-{high:.2f}"


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # the finaliser of SplitMix64: a bijective mix of 64-bit counters (uint64 arithmetic wraps)
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _integer_keys(seed: int, sequence_ids: np.ndarray, feature_ids: np.ndarray) -> np.ndarray:
    """:func:`sample_keys` as int64 in ``[0, 2**53)``."""
    seq = np.asarray(sequence_ids, dtype=np.uint64)[:, None]
    feat = np.asarray(feature_ids, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        salt = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        x = _splitmix64(_splitmix64(seq ^ salt) ^ feat)
    return (x >> np.uint64(64 - _KEY_BITS)).astype(np.int64)


def sample_keys(seed: int, sequence_ids: np.ndarray, feature_ids: np.ndarray) -> np.ndarray:
    """Pseudo-random keys in [0, 1), float64, shape ``(len(sequence_ids), len(feature_ids))``.

    A pure function of ``(seed, sequence id, feature id)``: the keys, hence the samples, do not
    depend on how the stream is cut into batches.
    """
    return _integer_keys(seed, sequence_ids, feature_ids).astype(np.float64) * (1.0 / 2**_KEY_BITS)


class FeatureAnalyzer:
    """Streaming per-feature statistics and example contexts (see the module docstring).

    Args:
        n_features: F, the number of features (last axis of the activations).
        n_top: sequences kept in ``top_activations`` per feature (>= 1).
        n_per_quantile: sequences kept per quantile band per feature (0: no quantile samplings).
        quantile_edges: increasing fractions of the final maximum in [0, 1], the last one 1.0;
            band i holds peaks in ``(edges[i] * M, edges[i + 1] * M]``.
        histogram_bins: number of log-spaced bins of the activation magnitude.
        histogram_range: ``(low, high)`` of the bins (values outside go to the end bins).
        context_size: T, tokens per sequence (default: from the first batch; every batch must
            have the same T).
        seed: seed of the quantile sampling keys.
        device: where the state lives (default: the device of the first batch).

    Memory: the activation rows of kept samples are stored densely, ``F * (n_top + n_bands *
    n_per_quantile) * T`` float32 values (4,608 features x (16 + 4 * 8) x 128 tokens: 113 MB), plus
    the tokens and meta of the sequences still referenced by some feature (pruned as samples are
    replaced) and ``F * histogram_bins`` int64 counts.
    """

    def __init__(self, n_features: int, *, n_top: int = 16, n_per_quantile: int = 8,
                 quantile_edges: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), histogram_bins: int = 64,
                 histogram_range: tuple[float, float] = (1e-4, 1e4), context_size: int | None = None,
                 seed: int = 0, device: str | torch.device | None = None):
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        if n_top < 1:
            raise ValueError(f"n_top must be >= 1, got {n_top}")
        if n_per_quantile < 0:
            raise ValueError(f"n_per_quantile must be >= 0, got {n_per_quantile}")
        edges = [float(e) for e in quantile_edges]
        if (len(edges) < 2 or any(not 0.0 <= e <= 1.0 for e in edges) or edges[-1] != 1.0
                or any(b <= a for a, b in itertools.pairwise(edges))):
            raise ValueError(f"quantile_edges must be increasing fractions in [0, 1] ending with 1.0, got {edges}")
        if len(edges) - 1 > _MAX_BANDS:
            raise ValueError(f"at most {_MAX_BANDS} quantile bands are supported, got {len(edges) - 1}")
        if context_size is not None and context_size < 1:
            raise ValueError(f"context_size must be >= 1, got {context_size}")
        self.n_features = int(n_features)
        self.n_top = int(n_top)
        self.n_per_quantile = int(n_per_quantile)
        self.quantile_edges = tuple(edges)
        self.n_bands = len(edges) - 1
        self.histogram_edges = histogram_edges(histogram_bins, *histogram_range)
        self.context_size = context_size
        self.seed = int(seed)
        self.device = None if device is None else torch.device(device)
        #: sequences seen so far (the next sequence's id)
        self.n_sequences = 0
        #: unmasked tokens seen so far
        self.n_tokens = 0
        self._ready = False
        # tokens / meta of sequences referenced by a kept sample: id -> value
        self._tokens: dict[int, np.ndarray] = {}
        self._meta: dict[int, dict[str, Any]] = {}
        self._prune_at = 1024
        # per-sample extras: slot kind ("top" / "quantile") -> name -> (F, slots, ...) array
        self._extras: dict[str, dict[str, Tensor]] = {"top": {}, "quantile": {}}

    # --- state ---------------------------------------------------------------------------

    def _allocate(self, context: int, device: torch.device) -> None:
        F, T, dev = self.n_features, context, device
        self.context_size = context
        self.device = dev
        self.act_count = torch.zeros(F, dtype=torch.int64, device=dev)
        self.max_activation = torch.zeros(F, dtype=torch.float32, device=dev)
        self.histogram = torch.zeros(F * (len(self.histogram_edges) - 1), dtype=torch.int64, device=dev)
        self._edges = torch.as_tensor(self.histogram_edges, dtype=torch.float64, device=dev)
        self._band_low = torch.tensor(self.quantile_edges[:-1], dtype=torch.float32, device=dev)
        self._band_high = torch.tensor(self.quantile_edges[1:], dtype=torch.float32, device=dev)
        # top activations: unordered slots (sorted in finish)
        n = self.n_top
        self.top_peak = torch.full((F, n), -math.inf, dtype=torch.float32, device=dev)
        self.top_id = torch.full((F, n), -1, dtype=torch.int64, device=dev)
        self.top_rows = torch.zeros((F, n, T), dtype=torch.float32, device=dev)
        # quantile candidates: n_bands * n_per_quantile unordered slots per feature; the band of a
        # slot is recomputed from its peak whenever the maximum changes
        s = self.n_bands * self.n_per_quantile
        self.q_peak = torch.zeros((F, s), dtype=torch.float32, device=dev)
        self.q_key = torch.full((F, s), _NO_THRESHOLD, dtype=torch.int64, device=dev)
        self.q_id = torch.full((F, s), -1, dtype=torch.int64, device=dev)
        self.q_rows = torch.zeros((F, s, T), dtype=torch.float32, device=dev)
        self.q_threshold = torch.full((F, self.n_bands), _NO_THRESHOLD, dtype=torch.int64, device=dev)
        self._features = np.arange(F, dtype=np.uint64)
        self._ready = True

    def _bands(self, peaks: Tensor, maximum: Tensor) -> Tensor:
        """Band of each peak under the per-feature maximum: ``peaks`` (F, n), ``maximum`` (F,) ->
        int64 (F, n); -1 for peaks in no band (not > 0, or not above the first edge)."""
        low = self._band_low * maximum[:, None]  # (F, bands)
        return (peaks[:, :, None] > low[:, None, :]).sum(-1) - 1

    # --- streaming ---------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, acts: Tensor, tokens: Tensor, mask: Tensor | None = None,
               meta: Sequence[Mapping[str, Any]] | None = None,
               sample_extras: Callable[[Tensor, Tensor, Tensor], Mapping[str, Any] | None] | None = None) -> None:
        """Add a batch of sequences.

        Args:
            acts: feature activations ``(B, T, F)`` (any float dtype).
            tokens: token ids ``(B, T)``.
            mask: ``(B, T)`` bool, True on tokens to analyse (None: all); masked tokens count
                nowhere and are 0 in the stored activation rows.
            meta: one dict per sequence (where it came from), stored with its samples.
            sample_extras: ``fn(sequence_indices, feature_indices, positions)`` for K samples of
                this batch entering a kept slot (sequence index within the batch, feature, peak
                token) returning ``{name: array (K, ...)}`` or None; every call must return the
                same names with the same trailing shapes. Called at most once per
                ``extras_chunk`` samples.
        """
        if acts.ndim != 3 or acts.shape[-1] != self.n_features:
            raise ShapeError(f"activations must be (batch, context, {self.n_features}), got {tuple(acts.shape)}")
        B, T, _ = acts.shape
        if tuple(tokens.shape) != (B, T):
            raise ShapeError(f"tokens must be {(B, T)} like the activations, got {tuple(tokens.shape)}")
        if mask is not None and tuple(mask.shape) != (B, T):
            raise ShapeError(f"mask must be {(B, T)} like the activations, got {tuple(mask.shape)}")
        if meta is not None and len(meta) != B:
            raise ShapeError(f"meta must hold one dict per sequence ({B}), got {len(meta)}")
        if not self._ready:
            if self.context_size is not None and T != self.context_size:
                raise DataError(f"sequences have {T} tokens, expected context_size={self.context_size}")
            self._allocate(T, self.device if self.device is not None else acts.device)
        elif T != self.context_size:
            raise DataError(f"every batch must hold sequences of {self.context_size} tokens, got {T}")
        if B == 0:
            return
        if self.n_sequences + B > _MAX_SEQUENCES:
            raise DataError(f"feature analysis supports at most {_MAX_SEQUENCES:,} sequences")
        dev = self.device
        acts = acts.detach().to(device=dev, dtype=torch.float32)
        mask = (torch.ones((B, T), dtype=torch.bool, device=dev) if mask is None
                else mask.to(device=dev, dtype=torch.bool))
        base = self.n_sequences

        # Everything but the stored rows is computed from the list of non-zero unmasked entries:
        # activations are sparse, and full passes over (B, T, F) dominate the cost otherwise.
        flat = acts.reshape(B * T, self.n_features)
        where = flat.nonzero()  # (K, 2): token, feature
        where = where[mask.reshape(-1)[where[:, 0]]]
        token, feature = where[:, 0], where[:, 1]
        values = flat[token, feature]
        sequence, position = token // T, token % T
        self.n_tokens += int(mask.sum())
        self.act_count += torch.bincount(feature[values > 0], minlength=self.n_features)
        self._update_histogram(values, feature)
        # the peak of each (feature, sequence), >= 0 (a sequence where the feature is off peaks at 0)
        peaks = torch.zeros(self.n_features * B, dtype=torch.float32, device=dev).scatter_reduce_(
            0, feature * B + sequence, values, reduce="amax").view(self.n_features, B)
        old_max = self.max_activation
        new_max = torch.maximum(old_max, peaks.amax(dim=1))
        self.max_activation = new_max
        ids = torch.arange(base, base + B, dtype=torch.int64, device=dev)

        def rows(b_idx: Tensor, f_idx: Tensor) -> Tensor:
            """Activation rows (K, T) of sequences ``b_idx`` for features ``f_idx``, 0 where masked.

            Built from the non-zero entries: gathering rows of (B, T, F) with stride F costs far more."""
            row_of = torch.full((self.n_features, B), -1, dtype=torch.int64, device=dev)
            row_of[f_idx, b_idx] = torch.arange(len(f_idx), device=dev)
            row = row_of[feature, sequence]
            hit = row >= 0
            out = torch.zeros((len(f_idx), T), dtype=torch.float32, device=dev)
            out[row[hit], position[hit]] = values[hit]
            return out

        self._update_top(peaks, rows, ids, sample_extras)
        if self.n_per_quantile:
            self._update_quantiles(peaks, rows, ids, old_max, new_max, sample_extras)
        self.n_sequences += B
        self._remember(tokens, meta, base, B)

    def _update_histogram(self, values: Tensor, feature: Tensor) -> None:
        """Count non-zero ``values`` (K,) of features ``feature`` (K,) in the log-spaced bins."""
        if values.numel() == 0:
            return
        n_bins = len(self.histogram_edges) - 1
        # right=True: edges[i] <= v < edges[i+1] is bin i; outliers are clamped into the end bins
        bins = (torch.bucketize(values.abs().double(), self._edges, right=True) - 1).clamp_(0, n_bins - 1)
        self.histogram += torch.bincount(feature * n_bins + bins, minlength=self.histogram.numel())

    @staticmethod
    def _fill_slots(kept_old: Tensor, kept_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Where the newly kept candidates go: the slots no longer kept, in order.

        ``kept_old`` (F, S), ``kept_new`` (F, B) bool with ``kept_new.sum(1) <= (~kept_old).sum(1)``.
        Returns ``(feature, batch index, slot)`` index vectors of the new entries.
        """
        F, S = kept_old.shape
        free = ~kept_old
        # free_slot[f, r] = the r-th free slot of feature f (kept slots all land in the spare column S)
        free_rank = torch.where(free, torch.cumsum(free.to(torch.int64), dim=1) - 1, S)
        free_slot = torch.zeros((F, S + 1), dtype=torch.int64, device=kept_old.device).scatter_(
            1, free_rank, torch.arange(S, device=kept_old.device).expand(F, S))
        rank = torch.cumsum(kept_new.to(torch.int64), dim=1) - 1
        f_idx, b_idx = kept_new.nonzero(as_tuple=True)
        slots = free_slot[f_idx, rank[f_idx, b_idx]]
        return f_idx, b_idx, slots

    #: most samples passed to one ``sample_extras`` call
    extras_chunk = 4096

    def _store_extras(self, kind: str, fn: Any, f_idx: Tensor, b_idx: Tensor, slots: Tensor,
                      new_rows: Tensor) -> None:
        """Compute ``fn``'s extras for newly kept samples and store them in their slots."""
        if fn is None or f_idx.numel() == 0:
            return
        positions = new_rows.argmax(dim=1)  # the peak token (first one on ties)
        n_slots = self.top_peak.shape[1] if kind == "top" else self.q_peak.shape[1]
        store = self._extras[kind]
        for start in range(0, f_idx.numel(), self.extras_chunk):
            part = slice(start, start + self.extras_chunk)
            result = fn(b_idx[part], f_idx[part], positions[part])
            if result is None:
                continue
            if not isinstance(result, Mapping):
                raise PluginError(f"sample_extras must return a dict of arrays or None, got {type(result).__name__}")
            K = f_idx[part].numel()
            if store and set(result) != set(store):
                raise PluginError(f"sample_extras returned entries {sorted(result)}, earlier calls {sorted(store)}")
            for name, value in result.items():
                value = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value))
                if value.ndim < 1 or value.shape[0] != K:
                    raise PluginError(f"sample_extras entry {name!r} has shape {tuple(value.shape)}; expected "
                                      f"({K}, ...) (one row per sample)")
                value = value.to(self.device)
                if name not in store:
                    store[name] = torch.zeros((self.n_features, n_slots, *value.shape[1:]), dtype=value.dtype,
                                              device=self.device)
                target = store[name]
                if tuple(target.shape[2:]) != tuple(value.shape[1:]) or target.dtype != value.dtype:
                    raise PluginError(f"sample_extras entry {name!r} changed from {tuple(target.shape[2:])} "
                                      f"{target.dtype} to {tuple(value.shape[1:])} {value.dtype} per sample")
                target[f_idx[part], slots[part]] = value

    def _update_top(self, peaks: Tensor, rows: Any, ids: Tensor, extras_fn: Any = None) -> None:
        F, n = self.top_peak.shape
        B = peaks.shape[1]
        fresh = peaks.masked_fill(peaks <= 0, -math.inf)  # (F, B); a feature that did not fire is no candidate
        # quick exit when no sequence beats the weakest kept one of any feature
        if not bool((fresh > self.top_peak.amin(dim=1, keepdim=True)).any()):
            return
        values = torch.cat([self.top_peak, fresh], dim=1)  # (F, n + B)
        seq = torch.cat([self.top_id, ids.expand(F, B)], dim=1)
        # rank by (peak descending, stream position ascending) with one int64 key: the bits of a
        # positive float32 order like the float, then the complement of the sequence id
        bits = values.clamp_min(0).view(torch.int32).to(torch.int64)
        rank_key = torch.where(torch.isfinite(values), (bits << 32) + (_MAX_SEQUENCES - 1 - seq), -1)
        order = torch.topk(rank_key, n, dim=1).indices
        kept = torch.zeros_like(values, dtype=torch.bool).scatter_(1, order, True) & torch.isfinite(values)
        kept_old, kept_new = kept[:, :n], kept[:, n:]
        self.top_peak.masked_fill_(~kept_old, -math.inf)
        self.top_id.masked_fill_(~kept_old, -1)
        f_idx, b_idx, slots = self._fill_slots(kept_old, kept_new)
        self.top_peak[f_idx, slots] = fresh[f_idx, b_idx]
        self.top_id[f_idx, slots] = ids[b_idx]
        new_rows = rows(b_idx, f_idx)
        self.top_rows[f_idx, slots] = new_rows
        self._store_extras("top", extras_fn, f_idx, b_idx, slots, new_rows)

    def _update_quantiles(self, peaks: Tensor, rows: Any, ids: Tensor, old_max: Tensor,
                          new_max: Tensor, extras_fn: Any = None) -> None:
        F, S = self.q_peak.shape
        B, n, nb = peaks.shape[1], self.n_per_quantile, self.n_bands
        dev = self.device
        # new threshold of band j: the smallest threshold of the old bands overlapping it, so that
        # candidates moved down from a band with a lower threshold are not over-represented.
        # Bands are half-open (lo, hi]: two intersect iff each starts below the other's end.
        lo_old, hi_old = self._band_low * old_max[:, None], self._band_high * old_max[:, None]
        lo_new, hi_new = self._band_low * new_max[:, None], self._band_high * new_max[:, None]
        overlap = (lo_old[:, :, None] < hi_new[:, None, :]) & (lo_new[:, None, :] < hi_old[:, :, None])  # (F, i, j)
        # (a new band no old band overlaps has no earlier population: no threshold)
        threshold = torch.where(overlap, self.q_threshold[:, :, None], _NO_THRESHOLD).amin(dim=1)  # (F, bands)

        keys = torch.from_numpy(_integer_keys(self.seed, ids.cpu().numpy(), self._features)).T.to(dev)  # (F, B)
        band_old = self._bands(self.q_peak, new_max).masked_fill_(self.q_id < 0, -1)
        band_new = self._bands(peaks, new_max)
        band = torch.cat([band_old, band_new], dim=1)  # (F, S + B)
        key = torch.cat([self.q_key, keys], dim=1)
        limit = threshold.gather(1, band.clamp(min=0))
        eligible = (band >= 0) & (key <= limit)
        band = band.masked_fill(~eligible, nb)  # sorted last, never kept
        # order by (band, key), packed in one int64; the first n of each band are kept
        order = torch.argsort((band << _KEY_BITS) + key, dim=1)
        sorted_band = band.gather(1, order)
        counts = torch.zeros((F, nb + 1), dtype=torch.int64, device=dev).scatter_add_(
            1, sorted_band, torch.ones_like(sorted_band))
        start = torch.cumsum(counts, dim=1) - counts
        rank = torch.arange(S + B, device=dev)[None, :] - start.gather(1, sorted_band)
        kept_sorted = (sorted_band < nb) & (rank < n)
        # a band that overflows lowers its threshold to the largest key it keeps. (Not the smallest
        # key it discards: a sequence from another band tested against that would be kept with
        # probability (n + 1) / (N + 1) instead of the n / N of the band's own members.)
        overflow = (sorted_band < nb) & (rank == n - 1) & (counts.gather(1, sorted_band) > n)
        f_over, p_over = overflow.nonzero(as_tuple=True)
        threshold[f_over, sorted_band[f_over, p_over]] = key.gather(1, order)[f_over, p_over]
        self.q_threshold = threshold

        kept = torch.zeros_like(kept_sorted).scatter_(1, order, kept_sorted)
        kept_old, kept_new = kept[:, :S], kept[:, S:]
        self.q_id.masked_fill_(~kept_old, -1)
        self.q_peak.masked_fill_(~kept_old, 0.0)
        self.q_key.masked_fill_(~kept_old, _NO_THRESHOLD)
        f_idx, b_idx, slots = self._fill_slots(kept_old, kept_new)
        self.q_peak[f_idx, slots] = peaks[f_idx, b_idx]
        self.q_key[f_idx, slots] = keys[f_idx, b_idx]
        self.q_id[f_idx, slots] = ids[b_idx]
        new_rows = rows(b_idx, f_idx)
        self.q_rows[f_idx, slots] = new_rows
        self._store_extras("quantile", extras_fn, f_idx, b_idx, slots, new_rows)

    def _slot_ids(self) -> Tensor:
        ids = [self.top_id.reshape(-1)]
        if self.n_per_quantile:
            ids.append(self.q_id.reshape(-1))
        return torch.cat(ids)

    def _remember(self, tokens: Tensor, meta: Sequence[Mapping[str, Any]] | None, base: int, B: int) -> None:
        """Keep tokens and meta of this batch's sequences that some feature kept; drop the rest."""
        ids = self._slot_ids()
        recent = ids[ids >= base] - base
        new = torch.bincount(recent, minlength=B).nonzero().flatten().cpu().numpy() + base
        if new.size:
            rows = tokens.detach().to("cpu", torch.int64).numpy()
            for i in new.tolist():
                row = rows[i - base].copy()
                row.flags.writeable = False  # shared by every sample of this sequence
                self._tokens[i] = row
                self._meta[i] = dict(meta[i - base]) if meta is not None else {}
        # pruning needs every referenced id (a sort of all slots): only when the pool has doubled
        if len(self._tokens) > self._prune_at:
            keep = set(torch.unique(ids).cpu().tolist())
            self._tokens = {i: v for i, v in self._tokens.items() if i in keep}
            self._meta = {i: v for i, v in self._meta.items() if i in keep}
            self._prune_at = max(1024, 2 * len(self._tokens))

    # --- results -------------------------------------------------------------------------------

    def finish(self) -> list[FeatureAnalysis]:
        """One :class:`FeatureAnalysis` per feature (index order); the analyzer can keep going after."""
        F, edges = self.n_features, self.histogram_edges
        n_bins = len(edges) - 1
        if not self._ready:  # no batch at all: every feature is dead
            return [FeatureAnalysis(index=f, act_count=0, n_tokens=0, max_activation=0.0,
                                    histogram_counts=np.zeros(n_bins, dtype=np.int64), histogram_edges=edges)
                    for f in range(F)]
        act_count = self.act_count.cpu().numpy()
        max_act = self.max_activation.cpu().numpy()
        hist = self.histogram.reshape(F, n_bins).cpu().numpy()
        top_peak, top_id, top_rows = (t.cpu().numpy() for t in (self.top_peak, self.top_id, self.top_rows))
        top_extras = {k: v.cpu().numpy() for k, v in self._extras["top"].items()}
        q_extras = {k: v.cpu().numpy() for k, v in self._extras["quantile"].items()}
        names = [quantile_sampling_name(lo, hi) for lo, hi in itertools.pairwise(self.quantile_edges)]
        if self.n_per_quantile:
            q_band = self._bands(self.q_peak, self.max_activation).masked_fill_(self.q_id < 0, -1).cpu().numpy()
            q_peak, q_id, q_rows = (t.cpu().numpy() for t in (self.q_peak, self.q_id, self.q_rows))

        out: list[FeatureAnalysis] = []
        for f in range(F):
            samplings: list[Sampling] = []
            if act_count[f] > 0:
                samplings.append(Sampling(TOP_SAMPLING, self._samples(top_peak[f], top_id[f], top_rows[f],
                                                                      top_id[f] >= 0, top_extras, f)))
                if self.n_per_quantile:
                    for j, name in enumerate(names):
                        samplings.append(Sampling(name, self._samples(q_peak[f], q_id[f], q_rows[f],
                                                                      q_band[f] == j, q_extras, f)))
            out.append(FeatureAnalysis(
                index=f, act_count=int(act_count[f]), n_tokens=int(self.n_tokens),
                max_activation=float(max_act[f]), histogram_counts=hist[f].copy(), histogram_edges=edges,
                samplings=samplings))
        return out

    def _samples(self, peak: np.ndarray, ids: np.ndarray, rows: np.ndarray, select: np.ndarray,
                 extras: Mapping[str, np.ndarray], feature: int) -> list[Sample]:
        slots = np.flatnonzero(select)
        # highest peak first, then earliest in the stream
        slots = slots[np.lexsort((ids[slots], -peak[slots]))]
        return [Sample(tokens=self._tokens[int(ids[s])], activations=rows[s].copy(),
                       meta=dict(self._meta[int(ids[s])]),
                       extras={k: v[feature, s].copy() for k, v in extras.items()}) for s in slots]


def attach_extras(analyses: Sequence[FeatureAnalysis], extras_fn: Any, model: Any) -> list[FeatureAnalysis]:
    """``analyses`` with the architecture's per-feature extras added.

    ``extras_fn(model, feature_indices)`` (an :class:`~lmsae.records.ArchitectureSpec`'s
    ``analysis_extras``) returns ``{name: array of shape (len(feature_indices), ...)}``; feature
    i gets ``array[i]`` (a Python number when that is a scalar). None leaves the analyses unchanged.
    """
    import attrs

    if extras_fn is None or not analyses:
        return list(analyses)
    indices = np.array([a.index for a in analyses], dtype=np.int64)
    result = extras_fn(model, indices)
    if not isinstance(result, Mapping):
        raise PluginError(f"analysis_extras must return a dict of arrays, got {type(result).__name__}")
    columns: dict[str, np.ndarray] = {}
    for name, value in result.items():
        if isinstance(value, Tensor):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.ndim < 1 or array.shape[0] != len(indices):
            raise PluginError(f"analysis_extras entry {name!r} has shape {array.shape}; expected "
                              f"({len(indices)}, ...) (one row per feature)")
        columns[str(name)] = array

    def cell(column: np.ndarray, i: int) -> Any:
        value = column[i]
        # a 1-D column gives a numpy scalar per feature: store it as a plain JSON number
        return value.item() if np.ndim(value) == 0 else np.array(value)

    return [attrs.evolve(a, extras={**a.extras, **{k: cell(v, i) for k, v in columns.items()}})
            for i, a in enumerate(analyses)]


@torch.no_grad()
def analyze_stream(model: Any, stream: Iterable[Mapping[str, Any]], *, n_tokens: int,
                   analyzer_kwargs: Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
                   progress: bool = False) -> list[FeatureAnalysis]:
    """Encode batches of whole sequences with ``model`` and analyse its features.

    Each batch (the ``"sequences"`` layout: hook points ``(B, T, d)``, ``tokens``, ``mask``,
    ``meta``) is encoded as ``model.encode(*model.prepare_input(model.normalize(batch)))`` and
    reduced with ``model.analysis_activations``: the activations the dictionary itself computes
    inside ``forward_raw`` (input normalisation applied when the model has not folded it; a
    folded model has ``normalization = "none"`` and encodes raw activations).

    Stops once ``n_tokens`` token positions (masked ones included) have been read, cutting the last
    batch to whole sequences. Returns one :class:`FeatureAnalysis` per feature.
    Architectures that override :meth:`~lmsae.dictionary.SparseDictionary.sample_extras` (Lorsa's
    z-patterns) get it called for the samples each batch adds to the kept contexts; the rows are
    stored in ``Sample.extras``.
    """
    device = torch.device(device)
    model.eval()
    kwargs = dict(analyzer_kwargs or {})
    kwargs.setdefault("device", device)
    analyzer = FeatureAnalyzer(model.n_features, **kwargs)
    # only architectures that override the contract's default compute per-sample extras
    from lmsae.dictionary.base import SparseDictionary

    own = getattr(type(model), "sample_extras", None)
    wants_extras = own is not None and own is not SparseDictionary.sample_extras
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, dynamic_ncols=True, desc="analysing")
    seen = 0
    try:
        for batch in stream:
            if seen >= n_tokens:
                break
            if "tokens" not in batch:
                raise DataError("feature analysis needs the token ids of every sequence; the activation stream "
                                "has no 'tokens' (use a text source or a cache written with tokens)")
            tokens = batch["tokens"]
            if tokens.ndim != 2:
                raise DataError(f"feature analysis needs whole sequences (layout = \"sequences\"); got tokens of "
                                f"shape {tuple(tokens.shape)}")
            B, T = tokens.shape
            take = min(B, -(-(n_tokens - seen) // T))
            meta = batch.get("meta")
            batch = {k: (v[:take].to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()
                     if k != "meta"}
            if seen == 0:
                model.check_batch(batch)  # names the hook point whose width does not match
            mask = batch.get("mask")
            x, extras = model.prepare_input(model.normalize(batch))
            acts = model.analysis_activations(model.encode(x, mask=mask, **extras), x)
            callback = None
            if wants_extras:
                def callback(seq: Tensor, feat: Tensor, pos: Tensor, x: Tensor = x, acts: Tensor = acts) -> Any:
                    return model.sample_extras(x, acts, seq, feat, pos)
            analyzer.update(acts, batch["tokens"], mask, None if meta is None else list(meta)[:take],
                            sample_extras=callback)
            seen += take * T
            if bar is not None:
                bar.update(take * T)
    finally:
        if bar is not None:
            bar.close()
    return analyzer.finish()
