"""Low-rank sparse attention (Lorsa): the maths.

Shapes: B sequences of T tokens, width d, H = ``n_qk_heads`` QK heads of width e =
``d_qk_head``, F = ``d_sae`` features in H contiguous groups of G = F / H; h(i) = i // G is the
QK head of feature i. With x the (normalised) input ``(B, T, d)``::

    q_h = x W_Q[h] + b_Q[h],  k_h = x W_K[h] + b_K[h]          (B, T, e) per QK head
    q_h, k_h <- RMSNorm (qk_norm = "rms"), then RoPE on the first rotary_dim dims
    A_h[t, s] = softmax_s( q_h[t].k_h[s] / attn_scale ),  s <= t   (causal)
    v_i[s]    = x[s].W_V[i] + b_V[i]                            one scalar per token and feature
    h_i[t]    = sum_{s <= t} A_{h(i)}[t, s] v_i[s]              pre-activation (B, T, F)
    f         = act(h)                                          (decoder-norm gated when configured)
    y[t]      = sum_i f_i[t] W_O[i] + b_D                       (B, T, d)

Masks. The token mask of a batch (False at BOS and padding) is used for the losses and by
BatchTopK, never inside the attention: BOS stays a key (models put much of their attention on
it), and right padding — the only padding lmsae's text sources produce — comes after every real
token, so causal attention never lets a real query see it. A batch may also carry
``"attention_mask"`` ``(B, T)`` (0 at padding, on either side): those keys are then excluded,
and a query with no key left gets a zero pre-activation.

Nothing of size ``n_ctx`` is stored: the causal mask and the rotary tables are built for each
batch's length (the reference system saved an ``n_ctx²`` mask and rotary tables in every
checkpoint).

Folding (:meth:`LowRankSparseAttention.fold_scales`) with input scale s and output scale t:
``W_Q, W_K, W_V <- s * W``; biases unchanged, so q, k and v — hence the patterns and the
pre-activations — are exactly those of the normalised model (feature activations keep the
training scale); ``W_O, b_D <- W / t``; a JumpReLU threshold is unchanged, or divided by t with
decoder-norm gating (its gate compares ``h * ||W_O[i]||``).
Feature parallelism (``[distributed] model = m``): shard r holds QK heads ``[r H/m, (r+1) H/m)``
and exactly the features they drive, ``[r F/m, (r+1) F/m)`` (features are grouped contiguously
under their head), so a shard is itself a Lorsa of ``H/m`` heads and ``F/m`` features
(:func:`lmsae_lorsa.spec.lorsa_shard_config`): attention, values, pre-activations and decoder
norms are local; TopK/BatchTopK select globally (core activations); the partial predictions
``f W_O`` are summed across shards with ``b_D`` added by the first one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from lmsae.dictionary.base import SparseDictionary
from lmsae.errors import LmsaeError, ShapeError
from lmsae.nn.activations import JumpReLU, apply_with_decoder_norm_gating, build_activation
from torch import Tensor, nn

from lmsae_lorsa.config import LorsaConfig
from lmsae_lorsa.rotary import apply_rotary, inverse_frequencies, rotary_tables

__all__ = ["Z_PATTERN_FRACTION", "Z_PATTERN_MAX_SOURCES", "LowRankSparseAttention"]

#: z-pattern entries smaller than this fraction of |pre-activation| are not stored
Z_PATTERN_FRACTION = 0.01
#: at most this many source positions are stored per sample
Z_PATTERN_MAX_SOURCES = 16


class LowRankSparseAttention(SparseDictionary):
    """Lorsa. Parameters (H QK heads of width e, F features, width d):

    - ``W_Q``, ``W_K`` (H, d, e); ``b_Q``, ``b_K`` (H, e);
    - ``q_norm_weight``, ``k_norm_weight`` (H, e) with ``qk_norm = "rms"``;
    - ``W_V`` (F, d), ``b_V`` (F,): one value direction per feature;
    - ``W_O`` (F, d): one output direction per feature (the decoder); ``b_D`` (d,);
    - ``activation.log_threshold`` (F,) with ``act_fn = "jumprelu"``.

    Without RoPE and QK-norm, ``b_K`` only adds ``q[t].b_K`` to every score of row t, which the
    softmax ignores: it is kept for a uniform layout and never receives gradient there.
    """

    config: LorsaConfig
    needs_sequences = True

    def __init__(self, config: LorsaConfig):
        super().__init__(config)
        H, e, d, F = config.n_qk_heads, config.d_qk_head, config.d_model, config.d_sae
        self.W_Q = nn.Parameter(torch.empty(H, d, e))
        self.W_K = nn.Parameter(torch.empty(H, d, e))
        self.b_Q = nn.Parameter(torch.empty(H, e))
        self.b_K = nn.Parameter(torch.empty(H, e))
        if config.qk_norm == "rms":
            self.q_norm_weight = nn.Parameter(torch.empty(H, e))
            self.k_norm_weight = nn.Parameter(torch.empty(H, e))
        else:
            self.q_norm_weight = None
            self.k_norm_weight = None
        self.W_V = nn.Parameter(torch.empty(F, d))
        self.b_V = nn.Parameter(torch.empty(F))
        self.W_O = nn.Parameter(torch.empty(F, d))
        self.b_D = nn.Parameter(torch.empty(d))
        self.activation = build_activation(config.act_fn, k=config.top_k, shape=F,
                                           init_threshold=config.jumprelu_init_threshold,
                                           bandwidth=config.jumprelu_bandwidth)
        self._inv_freq: Tensor | None = None
        self._tables: tuple[tuple, tuple[Tensor, Tensor]] | None = None
        if config.positional_embedding == "rotary":
            # a plain attribute (not a buffer): it is never saved and is rebuilt from the config
            self._inv_freq = inverse_frequencies(
                config.resolved_rotary_dim, config.rotary_base, ntk_by_parts=config.ntk_by_parts,
                factor=config.ntk_factor, low_freq_factor=config.ntk_low_freq_factor,
                high_freq_factor=config.ntk_high_freq_factor, original_context=config.ntk_original_context)
        self.reset_parameters()

    # --- what the dictionary reads --------------------------------------------------------------

    def prepare_input(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """``(x, extras)``: the input hook ``(B, T, d)``; ``extras`` carries the batch's
        ``attention_mask`` when it has one (keys at its zeros are excluded)."""
        x, extras = super().prepare_input(batch)
        if batch.get("attention_mask") is not None:
            extras["attention_mask"] = batch["attention_mask"]
        return x, extras

    def hook_dims(self) -> dict[str, int]:
        return {self.config.hook_point_in: self.config.d_model, self.config.hook_point_out: self.config.d_model}

    # --- attention --------------------------------------------------------------------------------

    def _check_input(self, x: Tensor, attention_mask: Tensor | None) -> None:
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ShapeError(f"Lorsa input must be sequences (batch, context, {self.config.d_model}), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] > self.config.n_ctx:
            raise ShapeError(f"sequences of {x.shape[1]} tokens exceed the Lorsa's n_ctx={self.config.n_ctx}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(x.shape[:2]):
            raise ShapeError(f"attention_mask has shape {tuple(attention_mask.shape)}, the input has "
                             f"(batch, context) = {tuple(x.shape[:2])}")

    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        scale = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.config.qk_norm_eps)
        return x * scale * weight[:, None, :]

    def queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys ``(B, H, T, e)`` after QK-norm and RoPE."""
        q = torch.einsum("btd,hde->bhte", x, self.W_Q) + self.b_Q[:, None, :]
        k = torch.einsum("btd,hde->bhte", x, self.W_K) + self.b_K[:, None, :]
        if self.q_norm_weight is not None:
            q = self._rms(q, self.q_norm_weight)
            k = self._rms(k, self.k_norm_weight)
        if self._inv_freq is not None:
            cos, sin = self._rotary_tables(x.shape[1], q.dtype, q.device)
            q = apply_rotary(q, cos, sin, self.config.rotary_style)
            k = apply_rotary(k, cos, sin, self.config.rotary_style)
        return q, k

    def _rotary_tables(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        # cached per (length, dtype, device): batches of one run share a length
        key = (n, dtype, str(device))
        if self._tables is None or self._tables[0] != key:
            self._tables = (key, rotary_tables(n, self._inv_freq, self.config.rotary_style, dtype=dtype,
                                               device=device))
        return self._tables[1]

    def attention_pattern(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Causal attention patterns ``(B, H, T, T)`` (``[b, h, t, s]``: weight of key s for query
        t), rows summing to 1 (0 for a query without any allowed key)."""
        self._check_input(x, attention_mask)
        q, k = self.queries_keys(x)
        T = x.shape[1]
        scores = (q @ k.transpose(-1, -2)) / self.config.resolved_attn_scale
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            allowed = allowed & (attention_mask != 0).to(x.device)[:, None, None, :]
        has_key = allowed.any(dim=-1, keepdim=True)
        # -inf on disallowed keys; rows without any key are zeroed after a harmless softmax of zeros
        scores = scores.masked_fill(~allowed, -math.inf).masked_fill(~has_key, 0.0)
        return torch.softmax(scores, dim=-1) * has_key

    def values(self, x: Tensor) -> Tensor:
        """One value per token and feature, ``(B, T, F)``."""
        return x @ self.W_V.T + self.b_V

    # --- maths ------------------------------------------------------------------------------------

    def encode_pre(self, x: Tensor, attention_mask: Tensor | None = None, **extras: Any) -> Tensor:
        """Pre-activations ``(B, T, F)``: ``h_i[t] = sum_s A_{h(i)}[t, s] v_i[s]``."""
        A = self.attention_pattern(x, attention_mask)  # (B, H, T, T)
        B, T = x.shape[:2]
        H, G = self.config.n_qk_heads, self.config.ov_group_size
        v = self.values(x).view(B, T, H, G).transpose(1, 2)  # (B, H, T, G)
        return (A @ v).transpose(1, 2).reshape(B, T, H * G)

    def activate(self, hidden_pre: Tensor, mask: Tensor | None = None) -> Tensor:
        """Feature activations ``(B, T, F)``; gated by the live decoder norm when configured."""
        if self.config.decoder_norm_gating:
            return apply_with_decoder_norm_gating(self.activation, hidden_pre, self.decoder_norm(), mask)
        return self.activation(hidden_pre, mask=mask)

    def decode(self, feature_acts: Tensor, **extras: Any) -> Tensor:
        """Prediction ``(..., d)``: ``f W_O + b_D``."""
        return feature_acts @ self.W_O + self.b_D

    def decode_linear(self, feature_acts: Tensor, **extras: Any) -> Tensor:
        """``f W_O`` (no output bias)."""
        return feature_acts @ self.W_O

    def decoder_norm(self) -> Tensor:
        """``||W_O[i]||``, ``(F,)``."""
        return self.W_O.norm(dim=1)

    def encoder_norm(self) -> Tensor:
        """``||W_V[i]||``, ``(F,)``."""
        return self.W_V.norm(dim=1)

    def decoder_directions(self) -> dict[str, Tensor]:
        """``{hook_point_out: (F, d)}``: the rows of ``W_O`` in raw output space."""
        hook = self.config.hook_point_out
        scale = 1.0
        if self.config.normalization == "dataset" and hook in self.config.dataset_norms:
            scale = math.sqrt(self.config.d_model) / self.config.dataset_norms[hook]
        return {hook: self.W_O.detach() / scale}

    def qk_head_of(self, features: Tensor | np.ndarray | int) -> Any:
        """The QK head of each feature index (``i // ov_group_size``)."""
        return features // self.config.ov_group_size

    # --- z-patterns (which source tokens a feature reads) -----------------------------------------

    @torch.no_grad()
    def z_patterns(self, x: Tensor, sequence_indices: Tensor, feature_indices: Tensor, positions: Tensor,
                   attention_mask: Tensor | None = None) -> Tensor:
        """Contributions ``A_{h(i)}[t, s] * v_i[s]`` of every source position s, ``(K, T)``, for K
        (sequence b, feature i, query position t) triples of the batch ``x`` ``(B, T, d)``.

        Row k sums to the pre-activation ``h_i[t]`` of sequence b; entries with s > t are 0.
        """
        seq = torch.as_tensor(sequence_indices, dtype=torch.int64, device=x.device).reshape(-1)
        feat = torch.as_tensor(feature_indices, dtype=torch.int64, device=x.device).reshape(-1)
        pos = torch.as_tensor(positions, dtype=torch.int64, device=x.device).reshape(-1)
        if not (seq.shape == feat.shape == pos.shape):
            raise ShapeError(f"z_patterns: {seq.numel()} sequence indices, {feat.numel()} feature indices and "
                             f"{pos.numel()} positions must be as many")
        A = self.attention_pattern(x, attention_mask)  # (B, H, T, T)
        rows = A[seq, feat // self.config.ov_group_size, pos]  # (K, T)
        v = x[seq] @ self.W_V[feat][:, :, None] + self.b_V[feat][:, None, None]  # (K, T, 1)
        return rows * v[..., 0]

    def z_pattern(self, x: Tensor, feature: int, position: int, attention_mask: Tensor | None = None) -> Tensor:
        """Contributions of every source position to ``feature`` at query ``position``: ``(T,)``
        for one sequence ``x`` ``(T, d)``, or ``(B, T)`` for ``x`` ``(B, T, d)``."""
        single = x.ndim == 2
        xb = x[None] if single else x
        mask = attention_mask[None] if (single and attention_mask is not None) else attention_mask
        B = xb.shape[0]
        out = self.z_patterns(xb, torch.arange(B), torch.full((B,), int(feature)), torch.full((B,), int(position)),
                              mask)
        return out[0] if single else out

    @torch.no_grad()
    def sample_extras(self, x: Tensor, acts: Tensor, sequence_indices: Any, feature_indices: Any,
                      positions: Any, *, fraction: float = Z_PATTERN_FRACTION,
                      max_sources: int = Z_PATTERN_MAX_SOURCES) -> dict[str, np.ndarray]:
        """Sparse z-patterns of K kept samples, for feature analysis (same pass as the encoding).

        For sample k (sequence ``sequence_indices[k]`` of the batch ``x``, feature
        ``feature_indices[k]``, peak query ``positions[k]``), the source positions whose
        contribution ``A[t, s] v_i[s]`` has ``|.| >= fraction * |h_i[t]|``, largest first, at most
        ``max_sources``:

        - ``z_pattern_positions``: int32 ``(K, max_sources)``, -1 past the stored entries;
        - ``z_pattern_values``: float32 ``(K, max_sources)``, 0 past the stored entries.

        ``acts`` (the activations) is accepted for the analyzer's hook signature; the threshold
        is relative to the pre-activation, which the contributions sum to.
        """
        contrib = self.z_patterns(x, sequence_indices, feature_indices, positions).double()  # (K, T)
        n = min(max_sources, contrib.shape[1])
        total = contrib.sum(dim=-1, keepdim=True).abs()
        magnitude = contrib.abs()
        order = magnitude.argsort(dim=-1, descending=True, stable=True)[:, :n]
        values = contrib.gather(1, order)
        keep = (values.abs() >= fraction * total) & (values != 0)
        positions_out = torch.where(keep, order, torch.full_like(order, -1)).to(torch.int32)
        values_out = torch.where(keep, values, torch.zeros_like(values)).to(torch.float32)
        pad = max_sources - n
        if pad:
            positions_out = torch.nn.functional.pad(positions_out, (0, pad), value=-1)
            values_out = torch.nn.functional.pad(values_out, (0, pad), value=0.0)
        return {"z_pattern_positions": positions_out.cpu().numpy(), "z_pattern_values": values_out.cpu().numpy()}

    # --- initialisation ---------------------------------------------------------------------------

    def _uniform(self, shape: tuple[int, ...], bound: float, generator: torch.Generator | None) -> Tensor:
        # drawn on the CPU in float32 whatever the parameters' device and dtype: one seed gives
        # the same initial dictionary everywhere
        return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter, seeded through ``generator``.

        - ``W_Q``, ``W_K`` ~ U(±sqrt(3/d)): on inputs of norm sqrt(d) (normalised), every
          query/key coordinate has variance about 1;
        - ``W_O`` rows U(-1, 1) scaled to unit norm, ``W_V = W_O`` (as an SAE's encoder is its
          decoder's transpose; the initializer may redo it);
        - biases 0, QK-norm weights 1, JumpReLU ``log_threshold = log(jumprelu_init_threshold)``.

        :func:`lmsae_lorsa.init.init_from_attention` replaces the QK and OV weights with the
        language model's own.
        """
        cfg = self.config
        H, e, d, F = cfg.n_qk_heads, cfg.d_qk_head, cfg.d_model, cfg.d_sae
        bound = math.sqrt(3.0 / d)
        self.W_Q.copy_(self._uniform((H, d, e), bound, generator))
        self.W_K.copy_(self._uniform((H, d, e), bound, generator))
        w_o = self._uniform((F, d), 1.0, generator)
        w_o = w_o / w_o.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_O.copy_(w_o)
        self.W_V.copy_(w_o)
        for p in (self.b_Q, self.b_K, self.b_V, self.b_D):
            p.zero_()
        if self.q_norm_weight is not None:
            self.q_norm_weight.fill_(1.0)
            self.k_norm_weight.fill_(1.0)
        if isinstance(self.activation, JumpReLU):
            self.activation.log_threshold.fill_(math.log(cfg.jumprelu_init_threshold))

    @torch.no_grad()
    def initialize_from_language_model(self, lm: Any, init_batch: Mapping[str, Any] | None = None,
                                       generator: torch.Generator | None = None) -> dict[str, Any]:
        """Copy the QK heads and build the OV features from the language model's attention layer
        (:func:`lmsae_lorsa.init.init_from_attention`; the layer comes from ``hook_point_out``).

        The capability a train task would call after the core initializer when asked to initialise
        from the run's language model (a proposed core hook); ``init_batch`` is a raw batch.
        """
        from lmsae_lorsa.init import init_from_attention  # the init module imports this one

        return init_from_attention(self, lm, batch=init_batch, generator=generator)

    # --- capabilities used by lmsae.training.initializer ------------------------------------------

    @torch.no_grad()
    def set_decoder_norm(self, value: float) -> None:
        """Scale every ``W_O`` row to L2 norm ``value`` exactly."""
        if not (value > 0 and math.isfinite(value)):
            raise LmsaeError(f"decoder norm must be a finite number > 0, got {value!r}")
        self.W_O.mul_(value / self.W_O.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def init_encoder_from_decoder(self, factor: float = 1.0) -> None:
        """``W_V = W_O · factor`` (each feature reads along the direction it writes)."""
        self.W_V.copy_(self.W_O * factor)

    @torch.no_grad()
    def init_decoder_bias(self, mean: Tensor) -> None:
        """``b_D = mean`` (shape ``(d,)``), e.g. the mean of the normalised labels."""
        if tuple(mean.shape) != tuple(self.b_D.shape):
            raise ShapeError(f"decoder bias init: mean has shape {tuple(mean.shape)}, b_D has shape "
                             f"{tuple(self.b_D.shape)}")
        self.b_D.copy_(mean)

    @torch.no_grad()
    def init_encoder_bias_from_mean_pre(self, x: Tensor, mask: Tensor | None = None, **extras: Any) -> None:
        """Shift ``b_V`` so the mean pre-activation over the unmasked tokens of ``x`` is 0.

        Exact in one step: attention rows sum to 1, so ``b_V[i] - c`` lowers ``h_i`` by c everywhere.
        """
        flat = self.encode_pre(x, **extras).reshape(-1, self.config.d_sae)
        if mask is not None:
            flat = flat[mask.reshape(-1).to(flat.device) != 0]
        if flat.shape[0] == 0:
            raise LmsaeError("cannot initialise the value bias: the batch has no unmasked token")
        self.b_V.sub_(flat.mean(dim=0))

    @torch.no_grad()
    def init_active_subspace(self, label: Tensor, d: int, mask: Tensor | None = None) -> None:
        """Put every ``W_O`` row inside the top-``d`` principal subspace of ``label`` (unit norm).

        ``W_O[i] <- W_O[i, :d] @ V_d`` with ``V_d`` the d leading right-singular vectors of the
        de-meaned labels. (The per-head variant, from the language model's own value vectors,
        is part of :func:`lmsae_lorsa.init.init_from_attention`.)
        """
        width = self.config.d_model
        flat = label.reshape(-1, label.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1).to(flat.device) != 0]
        limit = min(width, flat.shape[0])
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= limit:
            raise LmsaeError(f"active subspace dimension must be an integer in [1, {limit}] (min of d_model="
                             f"{width} and {flat.shape[0]} tokens), got {d!r}")
        centred = (flat - flat.mean(dim=0)).to(torch.float64)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        rows = self.W_O[:, :d] @ vh[:d].to(self.W_O.dtype)
        self.W_O.copy_(rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # --- folding ------------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_scales(self, scales_in: Mapping[str, float], scales_out: Mapping[str, float]) -> None:
        """Rewrite the weights for raw activations (module docstring): q, k, v and the
        pre-activations are unchanged, the prediction is divided by the output scale."""
        (s,) = (float(v) for v in scales_in.values())
        (t,) = (float(v) for v in scales_out.values())
        if not (s > 0 and t > 0 and math.isfinite(s) and math.isfinite(t)):
            raise LmsaeError(f"fold_scales: scales must be finite and > 0, got s_in={s!r}, s_out={t!r}")
        self.W_Q.mul_(s)
        self.W_K.mul_(s)
        self.W_V.mul_(s)
        self.W_O.div_(t)
        self.b_D.div_(t)
        if isinstance(self.activation, JumpReLU) and self.config.decoder_norm_gating:
            self.activation.rescale_threshold(1.0 / t)

    # --- training metrics ---------------------------------------------------------------------------

    @torch.no_grad()
    def training_metrics(self, ctx: Mapping[str, Any]) -> dict[str, float]:
        """``lorsa/l0_qk_head_<h>``: mean active features per token among those of QK head h."""
        acts = ctx["acts"].detach()
        mask = ctx.get("mask")
        H, G = self.config.n_qk_heads, self.config.ov_group_size
        per_head = (acts != 0).reshape(*acts.shape[:-1], H, G).sum(dim=-1).double()  # (B, T, H)
        if mask is not None:
            weight = (mask != 0).double()[..., None]
            mean = (per_head * weight).sum(dim=(0, 1)) / weight.sum().clamp_min(1.0)
        else:
            mean = per_head.mean(dim=(0, 1))
        return {f"lorsa/l0_qk_head_{h}": float(v) for h, v in enumerate(mean.tolist())}
