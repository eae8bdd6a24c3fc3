"""Export to, and import from, SAELens' on-disk SAE format.

A SAELens SAE directory holds ``cfg.json`` and ``sae_weights.safetensors`` with tensors
``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,) and, for
JumpReLU, ``threshold`` (d_sae,). Inference semantics (what both directions preserve exactly)::

    x' = x - b_dec * apply_b_dec_to_input
    h  = x' W_enc + b_enc
    f  = relu(h)                   architecture "standard"
         relu(top-k of h)          architecture "topk" (cfg "k")
         h * [h > threshold]       architecture "jumprelu" (threshold > 0)
    y  = f W_dec + b_dec

Exporting works on a copy: dataset normalisation is folded into the weights, and decoder-norm
gating is removed exactly (``W_enc·n``, ``b_enc·n``, ``W_dec/n`` with n the decoder row norms,
which leaves unit-norm decoder rows; a JumpReLU threshold already lives in that gated space and
is kept). A model without decoder bias is exported with ``b_dec = 0``, which is exact.

Not expressible in that format, hence refused: transcoders, GLU encoders, BatchTopK (its
SAELens inference form is a JumpReLU whose thresholds would have to be calibrated on data) and
token- or batch-wise input normalisation (they depend on the data, not on fixed weights).
"""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import re
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmsae import __version__
from lmsae.dictionary.io import write_directory_atomically
from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder
from lmsae.errors import CheckpointError, LmsaeError

__all__ = ["CFG_FILE", "SAELENS_FORMAT_VERSION", "WEIGHTS_FILE", "export_saelens", "import_saelens"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
#: SAELens version whose file layout is written (``metadata`` holds hook and model names)
SAELENS_FORMAT_VERSION = "6.0.0"

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}
_ARCH_OF_ACT = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}


def _hook_layer(hook_name: str) -> int:
    match = re.search(r"(?:^|\.)blocks\.(\d+)\.", hook_name)
    return int(match.group(1)) if match else 0


def _refusals(model: SparseAutoEncoder) -> list[str]:
    cfg = model.config
    why = []
    if cfg.is_transcoder:
        why.append(f"it is a transcoder ({cfg.hook_point_in!r} -> {cfg.hook_point_out!r}); SAELens SAEs "
                   "reconstruct their input")
    if cfg.use_glu_encoder:
        why.append("it has a GLU encoder (use_glu_encoder = true), which SAELens SAEs do not have")
    if cfg.act_fn == "batchtopk":
        why.append("act_fn = 'batchtopk' depends on the whole batch; its SAELens inference form is a JumpReLU "
                   "with per-feature thresholds calibrated on data, which this exporter does not do")
    if cfg.normalization in ("token", "batch"):
        why.append(f"normalization = {cfg.normalization!r} depends on the data and cannot be folded into "
                   "the weights")
    return why


def export_saelens(model: SparseAutoEncoder, directory: str | os.PathLike, *, hook_name: str | None = None,
                   registry: Any = None, model_name: str | None = None) -> pathlib.Path:
    """Write ``model`` as a SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``) into ``directory``.

    - ``hook_name``: the SAELens hook name (default: the model's ``hook_point_in``);
    - ``registry``: when given, the original lmsae config is stored under the ``lmsae_config`` key
      of cfg.json (SAELens ignores unknown keys);
    - ``model_name``: the language model's name, recorded in the metadata.

    The caller's model is never modified. Raises :class:`LmsaeError` for models the format cannot
    represent (see the module docstring). Returns the directory.
    """
    if not isinstance(model, SparseAutoEncoder):
        raise LmsaeError(f"SAELens export supports the 'sae' architecture only, got {type(model).__name__}")
    cfg: SAEConfig = model.config
    why = _refusals(model)
    if why:
        raise LmsaeError("cannot export to SAELens: " + "; ".join(why))
    dtype = next(model.parameters()).dtype
    if dtype not in _DTYPE_NAMES:
        raise LmsaeError(f"cannot export parameters of dtype {dtype} to SAELens")

    work = copy.deepcopy(model).to("cpu")
    work.fold_normalization()
    with torch.no_grad():
        w_enc = work.W_E.detach().clone()
        b_enc = work.b_E.detach().clone()
        w_dec = work.W_D.detach().clone()
        b_dec = (work.b_D.detach().clone() if work.b_D is not None
                 else torch.zeros(cfg.d_model, dtype=dtype))
        if cfg.decoder_norm_gating:
            # act(h·n)/n then ·W_D  ==  act(h̃)·(W_D/n) with h̃ = x'(W_E·n) + b_E·n; the same floor
            # as apply_with_decoder_norm_gating keeps a zero decoder row exact too.
            eps = max(1e-8, torch.finfo(dtype).tiny)
            n = w_dec.norm(dim=1).clamp_min(eps)
            w_enc = w_enc * n
            b_enc = b_enc * n
            w_dec = w_dec / n[:, None]
        tensors = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
        if cfg.act_fn == "jumprelu":
            tensors["threshold"] = work.activation.threshold.detach().clone()
    tensors = {k: v.contiguous() for k, v in tensors.items()}

    hook = hook_name or cfg.hook_point_in
    layer = _hook_layer(hook)
    arch = _ARCH_OF_ACT[cfg.act_fn]
    data: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_model,
        "d_sae": cfg.n_features,
        "dtype": _DTYPE_NAMES[dtype],
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_decoder_bias_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "model_name": model_name,
            "hook_name": hook,
            "hook_layer": layer,
            "hook_head_index": None,
        },
        # the pre-6.0 layout kept these at the top level; newer readers ignore them
        "hook_name": hook,
        "hook_layer": layer,
        "hook_head_index": None,
        "model_name": model_name,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "finetuning_scaling_factor": False,
        "exported_by": f"lmsae {__version__}",
    }
    if arch == "topk":
        data["k"] = cfg.top_k
        data["activation_fn_kwargs"] = {"k": cfg.top_k}
    if registry is not None:
        data["lmsae_config"] = registry.unstructure(cfg)
    return write_directory_atomically(directory, {
        CFG_FILE: (json.dumps(data, indent=2) + "\n").encode("utf-8"),
        WEIGHTS_FILE: lambda p: save_file(tensors, str(p), metadata={"format": "saelens",
                                                                       "exported_by": f"lmsae {__version__}"}),
    })


# --- import --------------------------------------------------------------------------------------------


def _require(cfg: dict[str, Any], key: str, path: pathlib.Path) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{path}: missing key {key!r}")
    return cfg[key]


def _int_value(cfg: dict[str, Any], key: str, path: pathlib.Path) -> int:
    value = _require(cfg, key, path)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{path}: {key!r} must be a positive integer, got {value!r}")
    return value


def import_saelens(directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> SparseAutoEncoder:
    """Read a SAELens SAE directory into a :class:`SparseAutoEncoder` (CPU, the file's dtype
    unless ``dtype`` is given) with ``normalization = "none"``.

    Supported: architectures 'standard' (ReLU, or TopK in pre-6.0 files with
    ``activation_fn_str = "topk"``), 'topk' and 'jumprelu'; ``apply_b_dec_to_input`` is honoured
    (missing means true, SAELens' default); ``normalize_activations`` must be 'none'. Anything
    else raises :class:`lmsae.errors.CheckpointError` naming the file and the key.
    """
    root = pathlib.Path(directory)
    cfg_path, weights_path = root / CFG_FILE, root / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: no such file (is {root} a SAELens SAE directory?)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_path}: 'metadata' must be an object")

    d_in = _int_value(cfg, "d_in", cfg_path)
    d_sae = _int_value(cfg, "d_sae", cfg_path)
    arch = cfg.get("architecture", "standard")
    act_fn: str
    k = 50
    if arch == "standard":
        fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        if fn == "relu":
            act_fn = "relu"
        elif fn == "topk":
            kwargs = cfg.get("activation_fn_kwargs") or {}
            if "k" not in kwargs:
                raise CheckpointError(f"{cfg_path}: missing key 'activation_fn_kwargs.k' for activation_fn 'topk'")
            act_fn, k = "topk", _int_value(kwargs, "k", cfg_path)
        else:
            raise CheckpointError(f"{cfg_path}: activation function {fn!r} of a 'standard' SAE is not supported "
                                  "(supported: 'relu', 'topk')")
    elif arch == "topk":
        act_fn, k = "topk", _int_value(cfg, "k", cfg_path)
    elif arch == "jumprelu":
        act_fn = "jumprelu"
    else:
        raise CheckpointError(f"{cfg_path}: 'architecture' = {arch!r} is not supported "
                              "(supported: 'standard', 'topk', 'jumprelu')")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise CheckpointError(f"{cfg_path}: 'rescale_acts_by_decoder_norm' = true is not supported")

    norm = cfg.get("normalize_activations", "none")
    if norm is False:  # pre-6.0 files stored a boolean
        norm = "none"
    if norm != "none":
        raise CheckpointError(f"{cfg_path}: 'normalize_activations' = {norm!r} is not supported (only 'none'; fold "
                              "the scaling into the weights first)")
    if cfg.get("reshape_activations", "none") != "none":
        raise CheckpointError(f"{cfg_path}: 'reshape_activations' = {cfg['reshape_activations']!r} is not supported")
    if cfg.get("finetuning_scaling_factor"):
        raise CheckpointError(f"{cfg_path}: 'finetuning_scaling_factor' = true is not supported")
    head = meta.get("hook_head_index", cfg.get("hook_head_index", cfg.get("hook_point_head_index")))
    if head is not None:
        raise CheckpointError(f"{cfg_path}: 'hook_head_index' = {head!r} is not supported (an SAE on one attention "
                              "head's slice of a hook)")
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if not isinstance(hook, str) or not hook:
        raise CheckpointError(f"{cfg_path}: missing key 'metadata.hook_name' (or 'hook_name')")
    apply = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply, bool):
        raise CheckpointError(f"{cfg_path}: 'apply_b_dec_to_input' must be true or false, got {apply!r}")

    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: no such file")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: cannot read weights ({exc})") from None
    if "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not bool((scaling == 1).all()):
        raise CheckpointError(f"{weights_path}: tensor 'scaling_factor' is not all ones; it is not supported")
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if act_fn == "jumprelu":
        expected["threshold"] = (d_sae,)
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{weights_path}: missing tensor {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{weights_path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                  f"{CFG_FILE} implies {shape}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{weights_path}: unexpected tensors {unexpected} for architecture {arch!r}")
    threshold = None
    if act_fn == "jumprelu":
        threshold = tensors["threshold"].double()
        if not bool((threshold > 0).all() and threshold.isfinite().all()):
            raise CheckpointError(f"{weights_path}: tensor 'threshold' must be finite and > 0 everywhere "
                                  "(lmsae stores log thresholds)")

    file_dtype = tensors["W_enc"].dtype
    init_threshold = float(threshold.median()) if threshold is not None else 0.01
    config = SAEConfig(hook_point_in=hook, d_model=d_in, d_sae=d_sae, act_fn=act_fn, top_k=k,  # type: ignore[arg-type]
                       jumprelu_init_threshold=init_threshold if math.isfinite(init_threshold) else 0.01,
                       apply_decoder_bias_to_input=apply, normalization="none")
    model = SparseAutoEncoder(config).to(dtype=file_dtype)
    with torch.no_grad():
        model.W_E.copy_(tensors["W_enc"])
        model.b_E.copy_(tensors["b_enc"])
        model.W_D.copy_(tensors["W_dec"])
        model.b_D.copy_(tensors["b_dec"])
        if threshold is not None:
            model.activation.log_threshold.copy_(threshold.log())
    if dtype is not None:
        model.to(dtype=dtype)
    return model
