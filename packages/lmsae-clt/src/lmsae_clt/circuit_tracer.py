"""Export to, and import from, circuit-tracer's cross-layer-transcoder layout.

A circuit-tracer CLT directory (``CrossLayerTranscoder.to_safetensors`` / ``load_clt`` in
circuit-tracer's ``circuit_tracer/transcoder/cross_layer_transcoder.py``) holds, for L layers,
F features per layer and width d:

- ``config.yaml``: ``model_kind: cross_layer_transcoder``, ``feature_input_hook`` and
  ``feature_output_hook`` (TransformerLens hook names inside a block, e.g.
  ``ln2.hook_normalized`` / ``hook_mlp_out``, used as ``blocks.{layer}.<hook>``) and
  ``model_name``;
- ``W_enc_{i}.safetensors`` with ``W_enc_{i}`` (F, d), ``b_enc_{i}`` (F,), ``b_dec_{i}`` (d,)
  and, for a JumpReLU, ``threshold_{i}`` (F,) (an optional ``W_skip_{i}`` (d, d) is a skip
  connection lmsae does not have, so import refuses it);
- ``W_dec_{i}.safetensors`` with ``W_dec_{i}`` (F, L - i, d): the decoders of layer i's
  features into layers i, i+1, ..., L-1.

Inference semantics preserved in both directions (circuit-tracer's)::

    f_i = relu(x_i W_enc_i^T + b_enc_i)                 (no threshold files)
    f_i = g·[g > threshold_i], g = x_i W_enc_i^T + b_enc_i   (JumpReLU)
    y_j = sum_{i <= j} f_i W_dec_i[:, j - i] + b_dec_j

Assumptions (documented because the format has no written spec): the key names above are those
written by circuit-tracer's ``to_safetensors``; ``config.yaml`` keys beyond ``model_kind`` and
the two hooks are ignored by circuit-tracer, so lmsae also writes an ``lmsae`` block with the
full hook-point lists (a CLT trained on layers 5..7 would otherwise be read as layers 0..2).

Export works on a copy: dataset-wise normalisation is folded into the weights, and decoder-norm
gating is removed exactly (``W_enc·n``, ``b_enc·n``, ``W_dec/n`` with n the combined decoder norm,
so circuit-tracer's activations are ``f·n``; a JumpReLU threshold already lives in that gated
space and is kept). Refused: TopK variants (convert with ``lmsae clt to-jumprelu`` first),
token- or batch-wise normalisation, and ``d_out != d_model`` (the format has one width).

Import: ``threshold_i`` must be >= 0; a zero threshold (circuit-tracer's JumpReLU at 0 is a ReLU)
becomes the smallest positive normal number of the dtype, since lmsae stores log-thresholds.
"""

from __future__ import annotations

import copy
import math
import os
import pathlib
import re
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmsae.dictionary.io import write_directory_atomically
from lmsae.errors import CheckpointError, LmsaeError
from lmsae_clt.config import CLTConfig
from lmsae_clt.model import CrossLayerTranscoder

__all__ = ["CONFIG_FILE", "MODEL_KIND", "export_circuit_tracer", "import_circuit_tracer"]

CONFIG_FILE = "config.yaml"
MODEL_KIND = "cross_layer_transcoder"
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _block_suffix(hooks: tuple[str, ...]) -> str | None:
    """``"ln2.hook_normalized"`` when ``hooks[i] == f"blocks.{i}.ln2.hook_normalized"`` for every i, else None."""
    suffixes = set()
    for i, h in enumerate(hooks):
        m = _BLOCK.match(h)
        if m is None or int(m.group(1)) != i:
            return None
        suffixes.add(m.group(2))
    return suffixes.pop() if len(suffixes) == 1 else None


def _refusals(model: CrossLayerTranscoder) -> list[str]:
    cfg = model.config
    why = []
    if cfg.act_fn not in ("relu", "jumprelu"):
        why.append(f"act_fn={cfg.act_fn!r}: circuit-tracer CLTs use ReLU or JumpReLU; convert a TopK CLT first with "
                   "`lmsae clt to-jumprelu`")
    if cfg.normalization in ("token", "batch"):
        why.append(f"normalization={cfg.normalization!r} depends on the data and cannot be folded into the weights")
    if cfg.output_width != cfg.d_model:
        why.append(f"d_out={cfg.output_width} differs from d_model={cfg.d_model}; the format has a single width")
    return why


def export_circuit_tracer(model: CrossLayerTranscoder, directory: str | os.PathLike, *,
                          model_name: str = "") -> pathlib.Path:
    """Write ``model`` in circuit-tracer's CLT layout into ``directory`` (replaced atomically).

    Tensors are written in the model's dtype (float32 for a saved lmsae dictionary).
    """
    why = _refusals(model)
    if why:
        raise LmsaeError("cannot export this CLT to circuit-tracer's format: " + "; ".join(why))
    m = copy.deepcopy(model).cpu()
    if m.config.normalization == "dataset":
        m.fold_normalization()
    cfg = m.config
    n_layers = cfg.n_layers
    with torch.no_grad():
        if cfg.decoder_norm_gating:
            eps = max(1e-8, torch.finfo(m.W_E.dtype).tiny)
            norm = m.decoder_norm().clamp_min(eps)  # (L, F), exactly the gate's n
        else:
            norm = torch.ones_like(m.b_E)
        files: dict[str, Any] = {}
        for i in range(n_layers):
            enc = {f"W_enc_{i}": (m.W_E[i] * norm[i]).T.contiguous(),
                   f"b_enc_{i}": (m.b_E[i] * norm[i]).contiguous(),
                   f"b_dec_{i}": m.b_D[i].contiguous()}
            if cfg.act_fn == "jumprelu":
                enc[f"threshold_{i}"] = m.activation.threshold[i].contiguous()
            dec = torch.stack([m.W_D[j][i] / norm[i][:, None] for j in range(i, n_layers)], dim=1).contiguous()
            files[f"W_enc_{i}.safetensors"] = _writer({k: v.detach().clone() for k, v in enc.items()})
            files[f"W_dec_{i}.safetensors"] = _writer({f"W_dec_{i}": dec.detach().clone()})
    in_suffix, out_suffix = _block_suffix(cfg.hooks_in), _block_suffix(cfg.hooks_out)
    meta = {
        "model_name": model_name,
        "model_kind": MODEL_KIND,
        "feature_input_hook": in_suffix if in_suffix is not None else cfg.hooks_in[0],
        "feature_output_hook": out_suffix if out_suffix is not None else cfg.hooks_out[0],
        "lmsae": {"hook_points_in": list(cfg.hooks_in), "hook_points_out": list(cfg.hooks_out),
                  "act_fn": cfg.act_fn},
    }
    files[CONFIG_FILE] = yaml.safe_dump(meta, sort_keys=False).encode("utf-8")
    return write_directory_atomically(directory, files)


def _writer(tensors: dict[str, torch.Tensor]):
    return lambda path: save_file(tensors, str(path))


def _load(path: pathlib.Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a circuit-tracer CLT has W_enc_<i> and W_dec_<i> files for "
                              "every layer)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None


def _hooks(meta: dict[str, Any], n_layers: int, path: pathlib.Path) -> tuple[list[str], list[str]]:
    block = meta.get("lmsae")
    if isinstance(block, dict) and "hook_points_in" in block and "hook_points_out" in block:
        hooks_in, hooks_out = list(block["hook_points_in"]), list(block["hook_points_out"])
        if len(hooks_in) != n_layers or len(hooks_out) != n_layers:
            raise CheckpointError(f"{path}: the lmsae block names {len(hooks_in)}/{len(hooks_out)} hook points but "
                                  f"the directory holds {n_layers} layers")
        return hooks_in, hooks_out
    names = []
    for key in ("feature_input_hook", "feature_output_hook"):
        hook = meta.get(key)
        if not isinstance(hook, str) or not hook:
            raise CheckpointError(f"{path}: missing {key!r}")
        if "{layer}" in hook:
            names.append([hook.format(layer=i) for i in range(n_layers)])
        else:
            names.append([f"blocks.{i}.{hook}" for i in range(n_layers)])
    return names[0], names[1]


def import_circuit_tracer(directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> CrossLayerTranscoder:
    """Read a circuit-tracer CLT directory as an lmsae :class:`CrossLayerTranscoder` (``normalization='none'``)."""
    root = pathlib.Path(directory)
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: no such file (is {root} a circuit-tracer CLT directory?)")
    try:
        meta = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{cfg_path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_path}: must hold a mapping")
    kind = meta.get("model_kind", MODEL_KIND)
    if kind != MODEL_KIND:
        raise CheckpointError(f"{cfg_path}: model_kind is {kind!r}; only {MODEL_KIND!r} directories can be imported "
                              "as a CLT")
    layers = sorted(int(m.group(1)) for p in root.iterdir()
                    if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", p.name)))
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{root}: expected W_enc_0.safetensors ... W_enc_<L-1>.safetensors, found layers {layers}")
    n_layers = len(layers)
    enc = [_load(root / f"W_enc_{i}.safetensors") for i in range(n_layers)]
    dec = [_load(root / f"W_dec_{i}.safetensors") for i in range(n_layers)]
    if any(f"W_skip_{i}" in e for i, e in enumerate(enc)):
        raise CheckpointError(f"{root}: the CLT has a skip connection (W_skip_<i>), which lmsae CLTs do not have")
    for i in range(n_layers):
        for key in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"):
            if key not in enc[i]:
                raise CheckpointError(f"{root / f'W_enc_{i}.safetensors'}: missing tensor {key!r}")
        if f"W_dec_{i}" not in dec[i]:
            raise CheckpointError(f"{root / f'W_dec_{i}.safetensors'}: missing tensor 'W_dec_{i}'")
    n_feat, d_model = enc[0]["W_enc_0"].shape
    has_threshold = [f"threshold_{i}" in e for i, e in enumerate(enc)]
    if any(has_threshold) and not all(has_threshold):
        raise CheckpointError(f"{root}: threshold_<i> is present for some layers only")
    for i in range(n_layers):
        shapes = {f"W_enc_{i}": (n_feat, d_model), f"b_enc_{i}": (n_feat,), f"b_dec_{i}": (d_model,)}
        if has_threshold[i]:
            shapes[f"threshold_{i}"] = (n_feat,)
        got = {k: tuple(enc[i][k].shape) for k in shapes}
        got[f"W_dec_{i}"] = tuple(dec[i][f"W_dec_{i}"].shape)
        shapes[f"W_dec_{i}"] = (n_feat, n_layers - i, d_model)
        wrong = {k: (got[k], shapes[k]) for k in shapes if got[k] != shapes[k]}
        if wrong:
            raise CheckpointError(f"{root}: layer {i} tensors have unexpected shapes (got, expected): {wrong}")
    hooks_in, hooks_out = _hooks(meta, n_layers, cfg_path)
    jump = all(has_threshold)
    thresholds = None
    if jump:
        thresholds = torch.stack([enc[i][f"threshold_{i}"].double() for i in range(n_layers)])
        if bool((thresholds < 0).any()) or not bool(torch.isfinite(thresholds).all()):
            raise CheckpointError(f"{root}: JumpReLU thresholds must be finite and >= 0 (lmsae JumpReLUs pass "
                                  "h·[h > θ] with θ > 0)")
    config = CLTConfig(hook_points_in=hooks_in, hook_points_out=hooks_out, d_model=d_model, d_sae=n_feat,
                       act_fn="jumprelu" if jump else "relu", normalization="none")
    model = CrossLayerTranscoder(config).to(dtype=dtype)
    with torch.no_grad():
        for i in range(n_layers):
            model.W_E[i].copy_(enc[i][f"W_enc_{i}"].T)
            model.b_E[i].copy_(enc[i][f"b_enc_{i}"])
            model.b_D[i].copy_(enc[i][f"b_dec_{i}"])
            for j in range(i, n_layers):
                model.W_D[j][i].copy_(dec[i][f"W_dec_{i}"][:, j - i])
        if thresholds is not None:
            tiny = torch.finfo(dtype).tiny
            model.activation.log_threshold.copy_(thresholds.clamp_min(tiny).log().to(dtype))
    if not math.isfinite(float(model.W_E.detach().abs().max())):
        raise CheckpointError(f"{root}: the encoder holds non-finite values")
    return model
