"""Initialise a Lorsa from the language model's own attention layer (TransformerLens).

:func:`init_from_attention` copies the layer's query/key heads and builds every feature's rank-1
OV circuit from the head its QK head was copied from:

1. **QK** — Lorsa QK head j copies the model's query head ``h = j // r`` (``r = n_qk_heads /
   n_heads``; grouped-query attention is handled through TransformerLens' expanded ``W_K`` /
   ``b_K``, whose query head h uses key/value head ``h // (n_heads / n_key_value_heads)``). The
   layer norm's weight and bias (when not folded into the model) are folded in, and the input
   normalisation factor s is divided out: ``W_Q[j] = diag(w) W_Q^h / s``,
   ``b_Q[j] = b W_Q^h + b_Q^h`` (the same for K), so the Lorsa's patterns are the model's.
2. **OV, active subspace per head** — for the G features of QK head j, unit directions
   ``u_1..u_G`` in the head's value space (width d_head): random combinations of the top
   ``min(d_qk_head, d_head)`` right-singular vectors of the head's value vectors on the
   initialisation batch (uniformly random directions without a batch), or given
   ``directions``. Feature i then reads ``v_i = x.(diag(w) W_V^h u_i) / s + (b W_V^h + b_V^h).u_i``
   and writes ``W_O[i] = t * u_i W_O^h`` (t the output normalisation factor), rescaled so that
   ``||W_O[i]|| = 1`` with the inverse factor on its value (the product is unchanged).
   With directions ``[I; -I]`` (``G = 2 d_head``) and ReLU, a QK group reproduces its head's
   output exactly: ``sum_u relu(z.u) u W_O^h = z W_O^h``.
3. **Output scale** — with a batch holding the layer's output, each group's decoder rows are
   multiplied by the least-squares factor ``c_j >= 0`` and ``b_D`` is the least-squares offset
   (the sparse activation keeps only part of each head's output; this puts the initial
   reconstruction on the right scale). Without one, ``b_D = t * b_O``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from lmsae.errors import LmsaeError
from torch import Tensor

from lmsae_lorsa.config import LorsaConfig
from lmsae_lorsa.model import LowRankSparseAttention

__all__ = ["attention_settings", "init_from_attention", "layer_of"]

_OUT_HOOK = re.compile(r"^blocks\.(\d+)\.hook_attn_out$")


def _hooked(lm: Any) -> Any:
    """The ``HookedTransformer`` of an lmsae TransformerLens model (or the model itself)."""
    hooked = getattr(lm, "hooked", lm)
    if not hasattr(hooked, "blocks") or not hasattr(hooked, "cfg"):
        raise LmsaeError(f"initialising a Lorsa from a language model needs a TransformerLens model "
                         f"([model] backend = \"transformer_lens\"), got {type(lm).__name__}")
    return hooked


def layer_of(config: LorsaConfig) -> int:
    """The layer a Lorsa replaces, from ``hook_point_out = "blocks.<L>.hook_attn_out"``."""
    m = _OUT_HOOK.match(config.hook_point_out)
    if m is None:
        raise LmsaeError(f"cannot tell which attention layer to copy: hook_point_out = {config.hook_point_out!r} is not "
                         f"'blocks.<L>.hook_attn_out' (pass the layer explicitly)")
    return int(m.group(1))


def attention_settings(lm: Any, layer: int) -> dict[str, Any]:
    """The Lorsa config values that reproduce attention layer ``layer`` of ``lm`` (TransformerLens).

    Keys: ``d_model``, ``d_qk_head``, ``attn_scale``, ``positional_embedding``, the rotary and
    NTK-by-parts settings when the model uses RoPE, ``qk_norm`` (and ``qk_norm_eps``).
    ``n_qk_heads`` must be a multiple of ``n_heads`` (also returned, as the smallest choice).
    Raises :class:`LmsaeError` for attention variants a Lorsa cannot reproduce.
    """
    hooked = _hooked(lm)
    cfg = hooked.cfg
    if not 0 <= layer < cfg.n_layers:
        raise LmsaeError(f"layer {layer} does not exist: the model has {cfg.n_layers} layers")
    attn = hooked.blocks[layer].attn
    unsupported = []
    if getattr(cfg, "attention_dir", "causal") != "causal":
        unsupported.append("bidirectional attention")
    if getattr(attn, "attn_type", "global") == "local":
        unsupported.append("local (sliding-window) attention")
    for flag, what in (("use_logn_attn", "log-n attention scaling"), ("use_attention_sinks", "attention sinks"),
                       ("use_yarn_rope", "YaRN RoPE"), ("use_dynamic_ntk_rope", "dynamic NTK RoPE")):
        if getattr(cfg, flag, False):
            unsupported.append(what)
    if (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0:
        unsupported.append("attention-score soft-capping")
    if getattr(cfg, "rotary_scaling_factor", 1.0) not in (None, 1.0):
        unsupported.append("linear RoPE scaling")
    pos = cfg.positional_embedding_type
    out: dict[str, Any] = {"d_model": int(cfg.d_model), "d_qk_head": int(cfg.d_head), "n_qk_heads": int(cfg.n_heads),
                           "attn_scale": float(attn.attn_scale)}
    if pos == "rotary":
        out.update(positional_embedding="rotary", rotary_dim=int(cfg.rotary_dim), rotary_base=float(cfg.rotary_base),
                   rotary_style="gptj" if cfg.rotary_adjacent_pairs else "neox",
                   ntk_by_parts=bool(getattr(cfg, "use_NTK_by_parts_rope", False)))
        if out["ntk_by_parts"]:
            out.update(ntk_factor=float(cfg.NTK_by_parts_factor),
                       ntk_low_freq_factor=float(cfg.NTK_by_parts_low_freq_factor),
                       ntk_high_freq_factor=float(cfg.NTK_by_parts_high_freq_factor),
                       ntk_original_context=int(cfg.NTK_original_ctx_len))
    elif pos == "standard":
        out["positional_embedding"] = "none"  # absolute positions are already in the residual stream
    else:
        unsupported.append(f"positional_embedding_type {pos!r}")
    if unsupported:
        raise LmsaeError(f"layer {layer} of the model uses {', '.join(unsupported)}, which a Lorsa does not reproduce")
    if getattr(cfg, "use_qk_norm", False):
        out.update(qk_norm="rms", qk_norm_eps=float(cfg.eps))
    else:
        out["qk_norm"] = "none"
    return out


def _check_config(config: LorsaConfig, settings: Mapping[str, Any], layer: int) -> None:
    wrong = []
    for key, value in settings.items():
        if key == "n_qk_heads":
            if config.n_qk_heads % value:
                wrong.append(f"n_qk_heads = {value} (or a multiple of it)")
            continue
        ours = {"attn_scale": config.resolved_attn_scale, "rotary_dim": config.resolved_rotary_dim}.get(
            key, getattr(config, key))
        same = (math.isclose(float(ours), float(value), rel_tol=1e-9)
                if isinstance(value, float) and not isinstance(value, bool) else ours == value)
        if not same:
            wrong.append(f"{key} = {value!r} (got {ours!r})")
    if wrong:
        raise LmsaeError(f"the Lorsa config does not match attention layer {layer} of the model; set in [dictionary]: "
                         + "; ".join(wrong))
    expected = (f"blocks.{layer}.ln1.hook_normalized", f"blocks.{layer}.hook_attn_out")
    if (config.hook_point_in, config.hook_point_out) != expected:
        raise LmsaeError(f"to copy attention layer {layer}, the Lorsa must read {expected[0]!r} and predict "
                         f"{expected[1]!r}; it reads {config.hook_point_in!r} and predicts {config.hook_point_out!r}")


def _scales(model: LowRankSparseAttention) -> tuple[float, float]:
    cfg = model.config
    if cfg.normalization == "none":
        return 1.0, 1.0
    if cfg.normalization != "dataset":
        raise LmsaeError(f"initialising from the model needs normalization = 'dataset' or 'none' (a fixed input "
                         f"scale to divide out), got {cfg.normalization!r}")
    missing = [h for h in cfg.hook_points if h not in cfg.dataset_norms]
    if missing:
        raise LmsaeError(f"initialising from the model needs the dataset norms of {missing}; estimate them first")
    d = cfg.d_model
    return (math.sqrt(d) / cfg.dataset_norms[cfg.hook_point_in], math.sqrt(d) / cfg.dataset_norms[cfg.hook_point_out])


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def init_from_attention(model: LowRankSparseAttention, lm: Any, layer: int | None = None,
                        batch: Mapping[str, Any] | None = None, *, generator: torch.Generator | None = None,
                        directions: Tensor | None = None, subspace_dim: int | None = None,
                        fit_output_scale: bool = True) -> dict[str, Any]:
    """Set ``model``'s QK heads, OV circuits and decoder bias from attention layer ``layer`` of ``lm``
    (module docstring). Returns a report.

    Args:
        model: the Lorsa; its dataset norms must be known when it normalises its inputs.
        lm: an lmsae TransformerLens model (``.hooked``) or a ``HookedTransformer``.
        layer: the layer (default: from ``hook_point_out``).
        batch: optional RAW batch of sequences (hook points ``(B, T, d)``, ``mask``): the value
            vectors of its unmasked tokens choose each head's active subspace, and with the
            output hook present the output scale is fitted on it.
        generator: seeds the random directions.
        directions: ``(n_qk_heads, G, d_head)`` value-space directions to use instead.
        subspace_dim: dimension of each head's active subspace (default and maximum: d_head,
            where it is the span of the value vectors, i.e. usually the whole value space).
        fit_output_scale: fit the per-group output scale and b_D when the batch allows it.

    Report keys: ``layer``, ``source_heads`` (LM head of each QK head), ``subspace_dim``,
    ``directions`` (the unit value-space directions, ``(n_qk_heads, G, d_head)``), and after a
    fit ``output_scale`` (per QK head) and ``explained_variance`` on the batch.
    """
    cfg = model.config
    layer = layer_of(cfg) if layer is None else int(layer)
    hooked = _hooked(lm)
    settings = attention_settings(hooked, layer)
    _check_config(cfg, settings, layer)
    s, t = _scales(model)
    attn = hooked.blocks[layer].attn
    ln = hooked.blocks[layer].ln1
    f64 = dict(dtype=torch.float64, device="cpu")
    d, e = cfg.d_model, cfg.d_qk_head
    ln_w = getattr(ln, "w", None)
    ln_b = getattr(ln, "b", None)
    w = ln_w.detach().to(**f64) if isinstance(ln_w, Tensor) else torch.ones(d, **f64)
    b = ln_b.detach().to(**f64) if isinstance(ln_b, Tensor) else torch.zeros(d, **f64)

    def effective(W: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        # (n_heads, d, e) weights and (n_heads, e) biases acting on the hook_normalized input
        W, bias = W.detach().to(**f64), bias.detach().to(**f64)
        return w[None, :, None] * W, torch.einsum("d,hde->he", b, W) + bias

    W_Q, b_Q = effective(attn.W_Q, attn.b_Q)
    W_K, b_K = effective(attn.W_K, attn.b_K)  # expanded to every query head under GQA
    W_V, b_V = effective(attn.W_V, attn.b_V)
    W_O = attn.W_O.detach().to(**f64)  # (n_heads, e, d)
    b_O = attn.b_O.detach().to(**f64)
    n_heads = W_Q.shape[0]
    H, G = cfg.n_qk_heads, cfg.ov_group_size
    source = [j // (H // n_heads) for j in range(H)]

    x_norm = mask = label = None
    if batch is not None:
        nb = model.normalize({k: (v.to(model.W_Q) if isinstance(v, Tensor) and v.is_floating_point() else v)
                              for k, v in batch.items()})
        x_norm, _ = model.prepare_input(nb)
        mask = nb.get("mask")
        if cfg.hook_point_out in nb:
            label = nb[cfg.hook_point_out]

    # value-space directions of every QK group
    if directions is not None:
        if tuple(directions.shape) != (H, G, e):
            raise LmsaeError(f"directions must have shape (n_qk_heads, G, d_head) = {(H, G, e)}, got "
                             f"{tuple(directions.shape)}")
        u = _unit(directions.to(**f64))
        subspace = e
    else:
        if subspace_dim is not None and not 1 <= subspace_dim <= e:
            raise LmsaeError(f"the active subspace dimension must be in [1, d_head={e}], got {subspace_dim}")
        subspace = e
        bases: dict[int, Tensor] = {}
        if x_norm is not None:
            x_raw = (x_norm.to(**f64) / s).reshape(-1, d)
            if mask is not None:
                x_raw = x_raw[mask.reshape(-1).cpu() != 0]
            if x_raw.shape[0] == 0:
                raise LmsaeError("the initialisation batch has no unmasked token")
            subspace = max(1, min(subspace_dim or e, x_raw.shape[0]))
        elif subspace_dim is not None and subspace_dim < e:
            raise LmsaeError("an active subspace smaller than d_head needs a batch of activations")
        if x_norm is not None:
            for h in sorted(set(source)):
                values = x_raw @ W_V[h] + b_V[h]  # (N, e): the head's value vectors
                _, _, vh = torch.linalg.svd(values, full_matrices=False)
                bases[h] = vh[:subspace]  # (k, e), orthonormal rows
        g = torch.randn((H, G, subspace), generator=generator, dtype=torch.float32).to(torch.float64)
        u = torch.stack([_unit(g[j] @ bases[source[j]]) if source[j] in bases else _unit(g[j]) for j in range(H)])

    # rank-1 OV circuits: feature i = j*G + g of QK head j
    src = torch.tensor(source)
    w_v = torch.einsum("jde,jge->jgd", W_V[src], u) / s  # (H, G, d)
    b_v = torch.einsum("je,jge->jg", b_V[src], u)
    w_o = torch.einsum("jge,jed->jgd", u, W_O[src]) * t
    norm = w_o.norm(dim=-1, keepdim=True)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    w_o, w_v, b_v = w_o / safe, w_v * safe, b_v * safe[..., 0]

    target = dict(dtype=model.W_Q.dtype, device=model.W_Q.device)
    model.W_Q.copy_((W_Q[src] / s).to(**target))
    model.W_K.copy_((W_K[src] / s).to(**target))
    model.b_Q.copy_(b_Q[src].to(**target))
    model.b_K.copy_(b_K[src].to(**target))
    if model.q_norm_weight is not None:
        model.q_norm_weight.copy_(attn.q_norm.w.detach().to(**f64).expand(H, e).to(**target))
        model.k_norm_weight.copy_(attn.k_norm.w.detach().to(**f64).expand(H, e).to(**target))
    model.W_V.copy_(w_v.reshape(H * G, d).to(**target))
    model.b_V.copy_(b_v.reshape(H * G).to(**target))
    model.W_O.copy_(w_o.reshape(H * G, d).to(**target))
    model.b_D.copy_((b_O * t).to(**target))

    report: dict[str, Any] = {"layer": layer, "source_heads": source, "subspace_dim": subspace,
                              "directions": u.to(torch.float32)}
    if fit_output_scale and x_norm is not None and label is not None:
        report.update(_fit_output_scale(model, x_norm, label, mask))
    return report


@torch.no_grad()
def _fit_output_scale(model: LowRankSparseAttention, x: Tensor, label: Tensor,
                      mask: Tensor | None) -> dict[str, Any]:
    """Least-squares ``c_j >= 0`` per QK group (decoder rows times c_j) and ``b_D``; the feature
    selection is unchanged without decoder-norm gating (only ``W_O`` changes)."""
    cfg = model.config
    H, G, d = cfg.n_qk_heads, cfg.ov_group_size, cfg.d_model
    acts = model.encode(x, mask=mask)
    keep = (mask.reshape(-1) != 0) if mask is not None else torch.ones(acts.shape[0] * acts.shape[1], dtype=torch.bool)
    f = acts.reshape(-1, H, G)[keep.to(acts.device)].double()  # (N, H, G)
    y = label.reshape(-1, d)[keep.to(label.device)].double()
    w_o = model.W_O.detach().double().reshape(H, G, d)
    outs = torch.einsum("nhg,hgd->nhd", f, w_o)  # (N, H, d): each group's contribution
    y_mean, o_mean = y.mean(dim=0), outs.mean(dim=0)
    Y, O = y - y_mean, outs - o_mean
    gram = torch.einsum("nhd,nkd->hk", O, O)
    rhs = torch.einsum("nhd,nd->h", O, Y)
    ridge = 1e-9 * gram.diagonal().mean().clamp_min(1e-30)
    c = torch.linalg.solve(gram + ridge * torch.eye(H, dtype=gram.dtype, device=gram.device), rhs)
    # a group whose best scale is negative or zero would only subtract: keep a small positive
    # scale so that it still learns (zero rows receive no gradient through TopK)
    floor = 1e-3 * float(c.abs().max().clamp_min(1e-12))
    c = c.clamp_min(floor)
    b_D = y_mean - torch.einsum("h,hd->d", c, o_mean)
    model.W_O.mul_(c.repeat_interleave(G)[:, None].to(model.W_O))
    model.b_D.copy_(b_D.to(model.b_D))
    recon = model.decode(model.encode(x, mask=mask)).reshape(-1, d)[keep.to(x.device)].double()
    ev = 1.0 - float((recon - y).pow(2).sum() / Y.pow(2).sum().clamp_min(1e-30))
    return {"output_scale": [float(v) for v in c], "explained_variance": ev}
