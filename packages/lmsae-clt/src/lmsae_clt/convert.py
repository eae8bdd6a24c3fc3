"""TopK -> JumpReLU conversion of a CLT, with one threshold per layer calibrated on activations.

A TopK CLT (any of ``topk``, ``layertopk``, ``batchtopk``, ``batchlayertopk``) is turned into a
JumpReLU CLT with the same weights and, for every layer i, a threshold θ_i shared by the layer's
features, chosen so that on the calibration tokens **the JumpReLU fires exactly as many
(token, feature) entries of layer i as the TopK did** (per-layer L0 preserved):

1. run the TopK CLT on the calibration batches; C_i = number of active entries of layer i over
   the unmasked tokens;
2. g = the activation's input (h, or h·n with decoder-norm gating, which the JumpReLU keeps: it
   then compares h·n with θ, just as the TopK ranked h·n); v_i = the C_i + 1 largest values of
   relu(g) at layer i, collected in a second pass (a running top-(C_i + 1) merge, so memory is
   O(C_i), not O(tokens · features));
3. θ_i = (v_i[C_i - 1] + v_i[C_i]) / 2, the midpoint between the smallest value that must fire
   and the largest that must not (exact L0 up to ties). A layer that never fired gets θ above
   every value seen.

For ``batchtopk`` (per layer over the batch) with a single calibration batch the JumpReLU fires
exactly the TopK's entries; for the per-token variants the same number of entries fires per
layer, not necessarily the same ones, so the reconstruction changes a little: the report shows
L0 and explained variance before and after on held-out batches.

Why a converter: JumpReLU thresholds make every feature's activation depend only on its own
token and layer, which circuit tracing needs (a per-token TopK couples features of a token, a
batch TopK couples tokens, an across-layer TopK couples layers) and which the circuit-tracer
format can express.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from lmsae.errors import DataError, LmsaeError
from lmsae_clt.config import TOPK_ACT_FNS
from lmsae_clt.model import CrossLayerTranscoder

__all__ = ["ConversionReport", "calibrate_layer_thresholds", "convert_topk_to_jumprelu", "reconstruction_report"]

Batch = Mapping[str, Any]


def _to_model(batch: Batch, model: CrossLayerTranscoder) -> dict[str, Any]:
    param = model.W_E
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            value = value.to(param.device, dtype=param.dtype) if value.is_floating_point() else value.to(param.device)
        out[key] = value
    return out


def _forward_parts(model: CrossLayerTranscoder, batch: Batch) -> dict[str, Tensor | None]:
    """Normalised input, label, mask (bool or None), pre-activations, activations and the gate input g."""
    nb = model.normalize(_to_model(batch, model))
    x, _ = model.prepare_input(nb)
    mask = nb.get("mask")
    h = model.encode_pre(x)
    acts = model.activate(h, mask=mask)
    if model.config.decoder_norm_gating:
        eps = max(1e-8, torch.finfo(h.dtype).tiny)
        gate_input = h * model.decoder_norm().clamp_min(eps)  # what apply_with_decoder_norm_gating compares
    else:
        gate_input = h
    return {"x": x, "label": model.prepare_label(nb), "mask": None if mask is None else mask != 0, "h": h,
            "acts": acts, "gate_input": gate_input}


def _rows(t: Tensor, mask: Tensor | None, n_trailing: int) -> Tensor:
    """``(tokens..., *trailing)`` -> ``(n_unmasked, *trailing)``."""
    flat = t.reshape(-1, *t.shape[t.ndim - n_trailing:])
    return flat if mask is None else flat[mask.reshape(-1)]


@torch.no_grad()
def calibrate_layer_thresholds(model: CrossLayerTranscoder, batches: Sequence[Batch]) -> tuple[Tensor, Tensor, int]:
    """Per-layer JumpReLU thresholds that reproduce the model's per-layer L0 on ``batches`` (raw batches).

    Returns ``(thresholds (L,), counts (L,), n_tokens)``: θ_i in the units the JumpReLU compares
    (h, or h·n with gating), the number of active entries of each layer, and the number of
    unmasked tokens. Two passes over ``batches`` (module docstring).
    """
    n_layers = model.config.n_layers
    counts = torch.zeros(n_layers, dtype=torch.int64)
    n_tokens = 0
    for batch in batches:
        parts = _forward_parts(model, batch)
        acts = _rows(parts["acts"], parts["mask"], 2)  # (n, L, F)
        counts += (acts > 0).sum(dim=(0, 2)).cpu()
        n_tokens += acts.shape[0]
    if n_tokens == 0:
        raise DataError("the calibration batches hold no (unmasked) token")
    keep = [int(c) + 1 for c in counts]
    top: list[Tensor | None] = [None] * n_layers
    for batch in batches:
        parts = _forward_parts(model, batch)
        g = torch.relu(_rows(parts["gate_input"], parts["mask"], 2))  # (n, L, F)
        for i in range(n_layers):
            values = g[:, i, :].reshape(-1)
            if top[i] is not None:
                values = torch.cat([top[i], values])
            top[i] = values.topk(min(keep[i], values.numel()), sorted=True).values
    thresholds = torch.empty(n_layers, dtype=torch.float64)
    for i in range(n_layers):
        v = top[i].double().cpu()
        c = int(counts[i])
        if c == 0:
            # nothing fired in this layer: put θ above every value seen
            thresholds[i] = max(2.0 * float(v[0]) if v.numel() else 0.0, 1e-6)
            continue
        lo = float(v[c - 1])
        hi = float(v[c]) if v.numel() > c else 0.0
        thresholds[i] = (lo + hi) / 2.0
    return thresholds, counts, n_tokens


@attrs.frozen
class ConversionReport:
    """Outcome of :func:`convert_topk_to_jumprelu` (per-layer lists are in layer order).

    ``l0_*`` are mean active features per token at each layer, ``ev_*`` explained variances per
    output layer (pooled over the evaluation tokens, in the dictionary's normalised space) and
    ``ev_total_*`` over all layers together.
    """

    act_fn_before: str
    thresholds: list[float]
    calibration_tokens: int
    calibration_l0: list[float]
    eval_tokens: int
    l0_before: list[float]
    l0_after: list[float]
    ev_before: list[float]
    ev_after: list[float]
    ev_total_before: float
    ev_total_after: float

    def lines(self) -> list[str]:
        """A human-readable table."""
        out = [(f"converted act_fn={self.act_fn_before!r} -> 'jumprelu' (thresholds calibrated on "
                f"{self.calibration_tokens:,} tokens; metrics on {self.eval_tokens:,} tokens)"),
               f"{'layer':>5}  {'threshold':>10}  {'L0 before':>9}  {'L0 after':>8}  {'EV before':>9}  {'EV after':>8}"]
        for i, th in enumerate(self.thresholds):
            out.append(f"{i:>5}  {th:>10.4g}  {self.l0_before[i]:>9.2f}  {self.l0_after[i]:>8.2f}  "
                       f"{self.ev_before[i]:>9.4f}  {self.ev_after[i]:>8.4f}")
        out.append(f"{'all':>5}  {'':>10}  {sum(self.l0_before):>9.2f}  {sum(self.l0_after):>8.2f}  "
                   f"{self.ev_total_before:>9.4f}  {self.ev_total_after:>8.4f}")
        return out


@torch.no_grad()
def reconstruction_report(model: CrossLayerTranscoder, batches: Iterable[Batch]) -> dict[str, Any]:
    """Per-layer L0 and explained variance of ``model`` pooled over ``batches`` (raw batches).

    Returns ``{"n_tokens", "l0": [L], "ev": [L], "ev_total"}``; EV_j = 1 - Σ||ŷ_j - y_j||² / Σ||y_j - ȳ_j||²
    over the unmasked tokens (normalised space).
    """
    n_layers = model.config.n_layers
    active = torch.zeros(n_layers, dtype=torch.float64)
    err = torch.zeros(n_layers, dtype=torch.float64)
    sum_y: Tensor | None = None
    sum_y2 = torch.zeros(n_layers, dtype=torch.float64)
    n = 0
    for batch in batches:
        parts = _forward_parts(model, batch)
        acts = _rows(parts["acts"], parts["mask"], 2)
        y = _rows(parts["label"], parts["mask"], 2).double().cpu()  # (n, L, o)
        y_hat = _rows(model.decode(parts["acts"]), parts["mask"], 2).double().cpu()
        active += (acts > 0).sum(dim=(0, 2)).double().cpu()
        err += (y_hat - y).square().sum(dim=(0, 2))
        sum_y = y.sum(0) if sum_y is None else sum_y + y.sum(0)
        sum_y2 += y.square().sum(dim=(0, 2))
        n += y.shape[0]
    if n == 0:
        raise DataError("the evaluation batches hold no (unmasked) token")
    var = sum_y2 - sum_y.square().sum(-1) / n  # (L,)
    ev = 1 - err / var.clamp_min(1e-30)
    return {"n_tokens": n, "l0": (active / n).tolist(), "ev": ev.tolist(),
            "ev_total": float(1 - err.sum() / var.sum().clamp_min(1e-30))}


@torch.no_grad()
def convert_topk_to_jumprelu(model: CrossLayerTranscoder, calibration: Iterable[Batch],
                             evaluation: Iterable[Batch] | None = None, *,
                             bandwidth: float | None = None) -> tuple[CrossLayerTranscoder, ConversionReport]:
    """A JumpReLU copy of the TopK CLT ``model`` with per-layer thresholds (module docstring).

    ``calibration``: raw batches (hook point -> activations, optional ``mask``), read twice;
    ``evaluation``: raw batches for the before/after report (default: the calibration batches;
    pass held-out ones to see the generalisation). ``bandwidth``: the JumpReLU kernel width of
    the new config (default: keep ``jumprelu_bandwidth``). ``model`` itself is not modified.
    """
    cfg = model.config
    if cfg.act_fn not in TOPK_ACT_FNS:
        raise LmsaeError(f"only TopK CLTs can be converted to JumpReLU (act_fn one of {list(TOPK_ACT_FNS)}); "
                         f"this one has act_fn={cfg.act_fn!r}")
    batches = list(calibration)
    if not batches:
        raise DataError("no calibration batch given")
    thresholds, counts, n_cal = calibrate_layer_thresholds(model, batches)
    new_cfg = attrs.evolve(cfg, act_fn="jumprelu",
                           jumprelu_bandwidth=cfg.jumprelu_bandwidth if bandwidth is None else bandwidth,
                           jumprelu_init_threshold=float(thresholds.mean()))
    param = model.W_E
    converted = CrossLayerTranscoder(new_cfg).to(device=param.device, dtype=param.dtype)
    result = converted.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys or set(result.missing_keys) != {"activation.log_threshold"}:
        raise LmsaeError(f"internal error: state mismatch while converting (missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys})")
    log_theta = thresholds.log().to(param.dtype)[:, None].expand(cfg.n_layers, cfg.n_features)
    converted.activation.log_threshold.copy_(log_theta)
    eval_batches = batches if evaluation is None else list(evaluation)
    before = reconstruction_report(model, eval_batches)
    after = reconstruction_report(converted, eval_batches)
    report = ConversionReport(
        act_fn_before=cfg.act_fn, thresholds=[float(t) for t in thresholds], calibration_tokens=n_cal,
        calibration_l0=[int(c) / n_cal for c in counts], eval_tokens=before["n_tokens"],
        l0_before=before["l0"], l0_after=after["l0"], ev_before=before["ev"], ev_after=after["ev"],
        ev_total_before=before["ev_total"], ev_total_after=after["ev_total"])
    if not all(math.isfinite(t) and t > 0 for t in report.thresholds):  # pragma: no cover - by construction
        raise LmsaeError(f"calibration produced invalid thresholds {report.thresholds}")
    return converted, report
