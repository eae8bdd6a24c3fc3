"""MOLT: a mixture of sparse-gated, low-rank linear transforms of the input.

One hook point in (x, width d), one out (y, width o); F transforms, transform i of rank r_i::

    h = x W_E + b_E                         gate pre-activations, (..., F)
    f = act(h)                              or act(h * n) / n with decoder-norm gating, n_i = ||U_i V_i||_F
    y = sum_i f_i U_i (V_i x) + b_D         (..., o); b_D only with use_decoder_bias

The decoder is bilinear in (f, x): it needs the ORIGINAL input, which :meth:`prepare_input`
passes through the contract's extras as ``original_x`` (not ``x``: the core calls
``encode(x, **extras)``, so an extra named ``x`` would collide with the positional argument).

Parameters (stable names; ``<r>`` is the decimal rank):

- ``W_E`` (d, F), ``b_E`` (F,): the gate encoder; ``b_D`` (o,);
- ``U.<r>`` (count_r, o, r) and ``V.<r>`` (count_r, r, d): the transforms of rank r, U_i V_i (o, d);
- ``activation.log_threshold`` (F,) with ``act_fn = "jumprelu"``.

Canonical feature order: ascending rank, then the index within the rank group — feature
``offset_r + j`` is ``(U.<r>[j], V.<r>[j])`` and gate column ``W_E[:, offset_r + j]``, with
``offset_r`` the number of features of smaller ranks. It is the order of every saved tensor and
of the feature activations, whatever the parallel layout (see :mod:`lmsae_molt.sharding`).

Decoder norms ``||U_i V_i||_F`` are computed through r x r Gram matrices,
``||U V||_F^2 = tr((U^T U)(V V^T))`` = the sum of the elementwise product of the two (symmetric)
Grams, in O(count · r^2 · (d + o)) — never materialising a d x o matrix per feature.
Feature parallelism (``[distributed] model = k``): shard i holds block i of every rank group —
its slices of ``U.<r>``/``V.<r>`` and the matching gate columns (:func:`lmsae_molt.spec.molt_sharding_rules`,
group-aware) — so a shard is itself a MOLT in canonical order with every count divided by k
(:func:`lmsae_molt.spec.molt_shard_config`; :func:`lmsae_molt.sharding.local_feature_indices`
maps its local features to the global ones). Gates, decoder norms and transforms are local;
TopK/BatchTopK select globally (core activations); the partial predictions are summed across
shards with ``b_D`` added by the first one (:meth:`MixtureOfLinearTransforms.decode` there,
:meth:`~MixtureOfLinearTransforms.decode_linear` elsewhere).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lmsae.dictionary.base import SparseDictionary
from lmsae.errors import DataError, LmsaeError, ShapeError
from lmsae.nn.activations import JumpReLU, apply_with_decoder_norm_gating, build_activation
from lmsae.nn.axes import flatten_tokens

from lmsae_molt.config import MOLTConfig

__all__ = ["MixtureOfLinearTransforms", "TopSingular"]


class TopSingular(NamedTuple):
    """Per-feature singular structure of the maps ``U_i V_i`` (canonical order, float64)."""

    #: (F, r_max) singular values, descending, zero-padded past each feature's rank
    values: Tensor
    #: (F, o) top left singular vectors
    u: Tensor
    #: (F, d) top right singular vectors; σ_1 u v^T is the best rank-1 approximation of U_i V_i (the
    #: pair's joint sign is arbitrary)
    v: Tensor


class MixtureOfLinearTransforms(SparseDictionary):
    """MOLT (see the module docstring for the maths and the parameter layout)."""

    config: MOLTConfig

    def __init__(self, config: MOLTConfig):
        super().__init__(config)
        d, o, f = config.d_model, config.output_width, config.n_features
        self.W_E = nn.Parameter(torch.empty(d, f))
        self.b_E = nn.Parameter(torch.empty(f))
        self.U = nn.ParameterDict({str(r): nn.Parameter(torch.empty(c, o, r)) for r, c in config.rank_groups})
        self.V = nn.ParameterDict({str(r): nn.Parameter(torch.empty(c, r, d)) for r, c in config.rank_groups})
        self.b_D = nn.Parameter(torch.empty(o)) if config.use_decoder_bias else None
        self.activation = build_activation(config.act_fn, k=config.top_k, shape=f,
                                           init_threshold=config.jumprelu_init_threshold,
                                           bandwidth=config.jumprelu_bandwidth)
        self.reset_parameters()

    # --- the rank groups ----------------------------------------------------------------------------

    def groups(self) -> Iterator[tuple[int, int, int]]:
        """``(rank, start, stop)`` of every rank group in the canonical feature order."""
        start = 0
        for r, c in self.config.rank_groups:
            yield r, start, start + c
            start += c

    def feature_ranks(self) -> Tensor:
        """Rank of every feature, ``(F,)`` int64, in the canonical order (ascending)."""
        return torch.cat([torch.full((c,), r, dtype=torch.int64) for r, c in self.config.rank_groups])

    def transform(self, index: int) -> tuple[Tensor, Tensor]:
        """``(U_i, V_i)`` of canonical feature ``index``: shapes (o, r) and (r, d) (views)."""
        for r, start, stop in self.groups():
            if start <= index < stop:
                return self.U[str(r)][index - start], self.V[str(r)][index - start]
        raise IndexError(f"feature index {index} out of range [0, {self.n_features})")

    # --- what the dictionary reads and predicts ----------------------------------------------------

    def prepare_input(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """``(x, {"original_x": x})``: the gate reads x and the decoder applies the transforms to it."""
        x, _ = super().prepare_input(batch)
        return x, {"original_x": x}

    def hook_dims(self) -> dict[str, int]:
        dims = {self.config.hook_point_in: self.config.d_model}
        dims.setdefault(self.config.hook_point_out, self.config.output_width)
        return dims

    # --- maths ------------------------------------------------------------------------------------

    def encode_pre(self, x: Tensor, **extras: Any) -> Tensor:
        """Gate pre-activations ``(..., F)`` of inputs ``(..., d)``."""
        return x @ self.W_E + self.b_E

    def activate(self, hidden_pre: Tensor, mask: Tensor | None = None) -> Tensor:
        """Gate activations ``(..., F)``; gated by the live ``||U_i V_i||_F`` when configured."""
        if self.config.decoder_norm_gating:
            return apply_with_decoder_norm_gating(self.activation, hidden_pre, self.decoder_norm(), mask)
        return self.activation(hidden_pre, mask=mask)

    def decode(self, feature_acts: Tensor, original_x: Tensor | None = None, **extras: Any) -> Tensor:
        """``sum_i f_i U_i (V_i x) + b_D``, shape ``(..., o)``, from gates ``(..., F)`` and inputs ``(..., d)``.

        Per rank group this is two GEMMs: ``z = x V^T`` over the group's stacked ``V`` (n, count·r),
        scaled per feature by f, then ``z U^T`` over the stacked ``U``. Without autograd (evaluation,
        splicing, analysis) each group is restricted to the features active somewhere in the batch,
        which is exact. With autograd every feature is kept: JumpReLU's threshold gradient needs
        dL/df_i of inactive features too.
        """
        out = self._transforms(feature_acts, original_x, "decode")
        return out + self.b_D if self.b_D is not None else out

    def decode_linear(self, feature_acts: Tensor, original_x: Tensor | None = None, **extras: Any) -> Tensor:
        """:meth:`decode` without the output bias: ``sum_i f_i U_i (V_i x)`` (linear in the gates ``f``)."""
        return self._transforms(feature_acts, original_x, "decode_linear")

    def _transforms(self, feature_acts: Tensor, original_x: Tensor | None, what: str) -> Tensor:
        if original_x is None:
            raise DataError(f"MOLT {what} needs the original input (original_x): its transforms act on it; pass the "
                            "extras returned by prepare_input")
        d, o, n_f = self.config.d_model, self.config.output_width, self.n_features
        if feature_acts.shape[-1] != n_f or original_x.shape[-1] != d or \
                feature_acts.shape[:-1] != original_x.shape[:-1]:
            raise ShapeError(f"MOLT {what}: feature activations {tuple(feature_acts.shape)} (..., {n_f}) and input "
                             f"{tuple(original_x.shape)} (..., {d}) must share their token axes")
        lead = feature_acts.shape[:-1]
        f = feature_acts.reshape(-1, n_f)
        x = original_x.reshape(-1, d).to(f.dtype)
        n = f.shape[0]
        restrict = not torch.is_grad_enabled()
        out = f.new_zeros(n, o)
        for r, start, stop in self.groups():
            f_g, u, v = f[:, start:stop], self.U[str(r)], self.V[str(r)]
            if restrict:
                cols = f_g.any(dim=0).nonzero().squeeze(-1)
                if cols.numel() == 0:
                    continue
                if cols.numel() < f_g.shape[1]:
                    f_g, u, v = f_g[:, cols], u[cols], v[cols]
            c = f_g.shape[1]
            z = x @ v.reshape(c * r, d).T  # (n, c·r): V_i x for every feature i of the group
            z = (z.view(n, c, r) * f_g.unsqueeze(-1)).reshape(n, c * r)
            out = out + z @ u.transpose(1, 2).reshape(c * r, o)
        return out.reshape(*lead, o)

    def group_norms_squared(self) -> Iterator[tuple[int, Tensor]]:
        """``(rank, ||U_i V_i||_F^2 of the group's features (count,))`` via r x r Gram matrices."""
        for r, _, _ in self.groups():
            u, v = self.U[str(r)], self.V[str(r)]
            gram_u = u.transpose(1, 2) @ u  # (c, r, r) = U_i^T U_i
            gram_v = v @ v.transpose(1, 2)  # (c, r, r) = V_i V_i^T
            # tr(G_U G_V) = sum_ab G_U[a, b] G_V[b, a]; both are symmetric
            yield r, (gram_u * gram_v).sum(dim=(-2, -1))

    def decoder_norm(self) -> Tensor:
        """Frobenius norm ``||U_i V_i||_F`` of every transform, ``(F,)`` in the canonical order."""
        sq = torch.cat([s for _, s in self.group_norms_squared()])
        # clamp: rounding can make the sum a hair negative, and sqrt has an infinite slope at 0
        return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()

    # --- singular structure, decoder directions -------------------------------------------------------

    @torch.no_grad()
    def singular(self) -> TopSingular:
        """Singular values and top singular vectors of every ``U_i V_i`` (float64, canonical order).

        Only r x r matrices are decomposed. With ``U^T U = P Λ P^T`` (eigh), ``||U z|| = ||Λ^½ P^T z||``
        for every z, so ``U V`` has the singular values and right singular vectors of
        ``K = Λ^½ P^T V`` (r x d), i.e. the eigen-decomposition of ``K K^T = Λ^½ P^T (V V^T) P Λ^½``
        (r x r): ``σ_j^2`` and ``w_j``, with ``v_j = K^T w_j / σ_j`` and ``u_j = U V v_j / σ_j``.
        """
        r_max = max(self.config.ranks)
        values, us, vs = [], [], []
        for r, _, _ in self.groups():
            u = self.U[str(r)].detach().double()  # (c, o, r)
            v = self.V[str(r)].detach().double()  # (c, r, d)
            lam, p = torch.linalg.eigh(u.transpose(1, 2) @ u)
            root = p * lam.clamp_min(0).sqrt().unsqueeze(-2)  # P Λ^½, (c, r, r)
            sig2, w = torch.linalg.eigh(root.transpose(1, 2) @ (v @ v.transpose(1, 2)) @ root)  # ascending
            sig = sig2.clamp_min(0).sqrt().flip(-1)  # (c, r) descending
            v1 = torch.einsum("crd,cr->cd", v, (root @ w[:, :, -1:]).squeeze(-1))  # K^T w_1 = σ_1 v_1
            v1 = v1 / v1.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            u1 = (u @ (v @ v1.unsqueeze(-1))).squeeze(-1)  # U V v_1 = σ_1 u_1
            u1 = u1 / u1.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            values.append(torch.nn.functional.pad(sig, (0, r_max - r)))
            us.append(u1)
            vs.append(v1)
        return TopSingular(torch.cat(values), torch.cat(us), torch.cat(vs))

    def _raw_map_factor(self) -> float:
        """Factor turning the normalised map U_i V_i into the raw one (s_in / s_out; 1 once folded)."""
        cfg = self.config
        if cfg.normalization != "dataset":
            return 1.0
        norms = cfg.dataset_norms
        if cfg.hook_point_in not in norms or cfg.hook_point_out not in norms:
            return 1.0
        s_in = math.sqrt(cfg.d_model) / norms[cfg.hook_point_in]
        s_out = math.sqrt(cfg.output_width) / norms[cfg.hook_point_out]
        return s_in / s_out

    @torch.no_grad()
    def decoder_directions(self) -> dict[str, Tensor]:
        """``{hook_point_out: (F, o)}``: each transform's dominant write, ``σ_1 u_1`` of its raw-space map.

        A transform writes a whole subspace (``U_i V_i x`` depends on x), not one direction; its
        best rank-1 summary is the top singular pair: an input of unit norm along ``v_1`` is written
        as ``σ_1 u_1``. The SVD leaves the sign of (u_1, v_1) arbitrary; it is fixed so that ``v_1``
        points along the gate's column ``W_E[:, i]`` (``v_1 · W_E[:, i] >= 0``): inputs that open the
        gate then have, on average, a positive ``v_1`` component, and ``σ_1 u_1`` is what they write.
        Row norms are σ_1 (raw units), comparable across ranks.
        """
        top = self.singular()
        gate = self.W_E.detach().double().T  # (F, d)
        sign = torch.where((top.v * gate).sum(-1) < 0, -1.0, 1.0).to(top.u.dtype)
        directions = top.u * (top.values[:, 0] * sign * self._raw_map_factor()).unsqueeze(-1)
        return {self.config.hook_point_out: directions.to(self.W_E.dtype)}

    # --- metrics ----------------------------------------------------------------------------------

    @torch.no_grad()
    def training_metrics(self, ctx: Mapping[str, Any]) -> dict[str, float]:
        """Per-rank-group metrics of the last batch (masked tokens excluded):

        - ``metrics/l0/rank<r>``: mean number of active transforms of rank r per token;
        - ``metrics/l0_ratio/rank<r>``: that number's share of the total L0 (0 when nothing fires);
        - ``metrics/rank_used``: mean total rank applied per token, ``sum_r r * L0_r``.
        """
        acts = flatten_tokens(ctx["acts"].detach(), ctx["feature_axes"], ctx.get("mask"))  # (n, F)
        if acts.shape[0] == 0:
            return {}
        active = (acts != 0).double()
        per_group = {r: float(active[:, start:stop].sum(-1).mean()) for r, start, stop in self.groups()}
        total = sum(per_group.values())
        out: dict[str, float] = {}
        for r, l0 in per_group.items():
            out[f"metrics/l0/rank{r}"] = l0
            out[f"metrics/l0_ratio/rank{r}"] = l0 / total if total > 0 else 0.0
        out["metrics/rank_used"] = sum(r * l0 for r, l0 in per_group.items())
        return out

    # --- initialisation ---------------------------------------------------------------------------

    def _uniform(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        # drawn on the CPU in float32 whatever the parameters' device and dtype: one seed, one model
        return torch.empty(shape, dtype=torch.float32).uniform_(-1.0, 1.0, generator=generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter, seeded through ``generator``.

        - ``W_E``: columns U(-1, 1) scaled to unit L2 norm; ``b_E``, ``b_D`` = 0;
        - ``U.<r>``, ``V.<r>``: entries U(-1, 1), then each pair scaled (the same factor on U_i and V_i)
          so that ``||U_i V_i||_F = 1``. With inputs normalised to norm sqrt(d), a transform then writes
          an output of norm ~1 per unit gate whatever its rank, like a unit-norm SAE decoder row;
        - JumpReLU ``log_threshold`` = log(jumprelu_init_threshold).
        """
        cfg = self.config
        w_e = self._uniform((cfg.d_model, cfg.n_features), generator)
        self.W_E.copy_(w_e / w_e.norm(dim=0, keepdim=True).clamp_min(1e-12))
        self.b_E.zero_()
        for r, c in cfg.rank_groups:
            self.U[str(r)].copy_(self._uniform((c, cfg.output_width, r), generator))
            self.V[str(r)].copy_(self._uniform((c, r, cfg.d_model), generator))
        self.set_decoder_norm(1.0)
        if self.b_D is not None:
            self.b_D.zero_()
        if isinstance(self.activation, JumpReLU):
            self.activation.log_threshold.fill_(math.log(cfg.jumprelu_init_threshold))

    # --- capabilities used by lmsae.training.initializer ------------------------------------------

    @torch.no_grad()
    def set_decoder_norm(self, value: float) -> None:
        """Scale every transform to ``||U_i V_i||_F = value`` (sqrt of the factor on U_i and on V_i)."""
        if not (value > 0 and math.isfinite(value)):
            raise LmsaeError(f"decoder norm must be a finite number > 0, got {value!r}")
        for r, sq in list(self.group_norms_squared()):
            factor = (value / sq.clamp_min(1e-300).sqrt()).sqrt()  # (c,)
            self.U[str(r)].mul_(factor.view(-1, 1, 1))
            self.V[str(r)].mul_(factor.view(-1, 1, 1))

    @torch.no_grad()
    def init_encoder_from_decoder(self, factor: float = 1.0) -> None:
        """Point each gate at the input its transform amplifies most: ``W_E[:, i] = factor·||U_i V_i||_F·v_1``.

        MOLT has no decoder matrix to transpose; the closest analogue of an SAE's ``W_E = W_D^T``
        (an encoder column as long as its decoder row) is the top right singular vector ``v_1`` of
        ``U_i V_i`` scaled by the transform's Frobenius norm. Works for any d_out.
        """
        top = self.singular()
        norms = self.decoder_norm().detach().double()
        self.W_E.copy_((top.v * (factor * norms).unsqueeze(-1)).T.to(self.W_E.dtype))

    @torch.no_grad()
    def init_decoder_bias(self, mean: Tensor) -> None:
        """Set ``b_D`` to ``mean`` (shape ``(d_out,)``), e.g. the mean of the normalised labels."""
        if self.b_D is None:
            raise LmsaeError("cannot initialise the decoder bias: this MOLT has use_decoder_bias = false")
        if tuple(mean.shape) != tuple(self.b_D.shape):
            raise ShapeError(f"decoder bias init: mean has shape {tuple(mean.shape)}, b_D has shape "
                             f"{tuple(self.b_D.shape)}")
        self.b_D.copy_(mean)

    @torch.no_grad()
    def init_encoder_bias_from_mean_pre(self, x: Tensor, mask: Tensor | None = None, **extras: Any) -> None:
        """Shift ``b_E`` so that the mean gate pre-activation over the (unmasked) tokens of ``x`` is 0."""
        pre = self.encode_pre(x)
        flat = pre.reshape(-1, pre.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1).to(flat.device) != 0]
        if flat.shape[0] == 0:
            raise LmsaeError("cannot initialise the encoder bias: the batch has no unmasked token")
        self.b_E.sub_(flat.mean(dim=0))

    @torch.no_grad()
    def init_active_subspace(self, label: Tensor, d: int, mask: Tensor | None = None) -> None:
        """Put every transform's output inside the top-``d`` principal subspace of ``label``.

        ``label`` ``(..., d_out)`` is de-meaned and decomposed by SVD; ``U_i ← B^T U_i[:d]`` with ``B``
        (d, d_out) the leading right-singular vectors (the first d rows of U_i as random coefficients),
        then every transform is rescaled to its previous Frobenius norm.
        """
        o = self.config.output_width
        flat = label.reshape(-1, label.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1).to(flat.device) != 0]
        if flat.shape[-1] != o:
            raise ShapeError(f"active subspace init: labels have width {flat.shape[-1]}, the transforms write {o}")
        limit = min(o, flat.shape[0])
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= limit:
            raise LmsaeError(f"active subspace dimension must be an integer in [1, {limit}] "
                             f"(min of d_out={o} and {flat.shape[0]} tokens), got {d!r}")
        centred = (flat - flat.mean(dim=0)).to(torch.float64)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        basis = vh[:d].to(self.W_E.dtype)  # (d, o), orthonormal rows
        before = dict(self.group_norms_squared())
        for r, _, _ in self.groups():
            u = self.U[str(r)]
            u.copy_(basis.T @ u[:, :d, :])  # (o, d) @ (c, d, r) -> (c, o, r)
        for r, sq in list(self.group_norms_squared()):
            factor = (before[r].sqrt() / sq.clamp_min(1e-300).sqrt())
            self.U[str(r)].mul_(factor.view(-1, 1, 1))

    # --- folding ------------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_scales(self, scales_in: Mapping[str, float], scales_out: Mapping[str, float]) -> None:
        """Rewrite the weights so the model takes raw activations (see the base class).

        With s = scale of the input hook and t = scale of the output hook, the normalised model sees
        ``s·x`` and predicts ``t·y``: ``t·y = sum_i f_i U_i V_i (s·x) + b_D``. The gates are kept
        unchanged and the bilinear map absorbs both factors:

        - gate: ``W_E ← s·W_E`` (b_E unchanged), so ``h`` and f are unchanged;
        - transforms: ``V_i ← s·V_i`` (V reads the input space), ``U_i ← U_i / t`` (U writes the output
          space), so ``U_i V_i x`` equals the old ``U_i V_i (s·x) / t``; ``b_D ← b_D / t``;
        - thresholds: without gating the activation sees h, unchanged, so θ is unchanged. With gating it
          sees ``h·n`` where ``n = ||U_i V_i||_F`` became ``n·s/t``; ``act(c·z)/(c·n)`` with c = s/t
          equals ``act(z)/n`` for ReLU/TopK/BatchTopK (positively homogeneous), and for JumpReLU
          when θ ← θ·s/t.

        (The reference scaled U and V by sqrt(s/t) each and divided b_E by s, i.e. it divided the gates
        by s without compensating in the map: off by a factor s.)
        """
        (s,) = (float(v) for v in scales_in.values())
        (t,) = (float(v) for v in scales_out.values())
        if not (s > 0 and t > 0 and math.isfinite(s) and math.isfinite(t)):
            raise LmsaeError(f"fold_scales: scales must be finite and > 0, got s_in={s!r}, s_out={t!r}")
        self.W_E.mul_(s)
        for r in self.config.ranks:
            self.V[str(r)].mul_(s)
            self.U[str(r)].div_(t)
        if self.b_D is not None:
            self.b_D.div_(t)
        if isinstance(self.activation, JumpReLU) and self.config.decoder_norm_gating:
            self.activation.rescale_threshold(s / t)
