"""Checkpoint pieces without pickle: tensors go to safetensors, everything else to JSON.

Optimizer, LR-scheduler and RNG states are turned into a flat ``dict[str, Tensor]`` plus a
JSON-serialisable ``meta`` dict, and back. :func:`save_tensors_and_json` writes such a pair as
``<stem>.safetensors`` and ``<stem>.json``; every file is written atomically (temporary file in
the same directory, fsync, :func:`os.replace`), so a crash leaves either the old file or the new
one, never a torn one. Loading never unpickles anything.

JSON cannot represent every Python value found in these states, so values are encoded with a
few tagged single-key objects:

- ``{"__tuple__": [...]}`` a tuple (e.g. Adam's ``betas``);
- ``{"__float__": "nan" | "inf" | "-inf"}`` a non-finite float (keeps the JSON strict);
- ``{"__items__": [[key, value], ...]}`` a dict whose keys are not all strings (optimizer state
  is keyed by parameter index);
- ``{"__tensor__": "<key>"}`` a tensor stored under ``<key>`` in the tensors dict, or
  ``{"__tensor__": {"dtype": ..., "shape": [...], "data": [...]}}`` a small tensor inlined where
  there is no tensors dict (scheduler state).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import uuid
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmsae.errors import CheckpointError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "load_tensors_and_json",
    "optimizer_state_from_flat",
    "optimizer_state_to_flat",
    "rng_state_capture",
    "rng_state_restore",
    "save_tensors_and_json",
    "scheduler_state_from_json",
    "scheduler_state_to_json",
]

PathLike = str | os.PathLike[str]

_TUPLE = "__tuple__"
_FLOAT = "__float__"
_ITEMS = "__items__"
_TENSOR = "__tensor__"
_TAGS = frozenset({_TUPLE, _FLOAT, _ITEMS, _TENSOR})

_OPTIMIZER_FORMAT = "lmsae.optimizer_state"
_SCHEDULER_FORMAT = "lmsae.lr_scheduler_state"
_RNG_FORMAT = "lmsae.rng_state"
_PAIR_FORMAT = "lmsae.tensors_and_json"
_FORMAT_VERSION = 1
_PAIR_ID_KEY = "lmsae_pair_id"


# --------------------------------------------------------------------------------------------
# Atomic file writes


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable. Some file systems refuse fsync on a directory; the data
    # is already safe then as far as we can make it, so that is not an error.
    with contextlib.suppress(OSError):
        _fsync_path(directory)


def _atomic_write(path: PathLike, fill: Callable[[str], None]) -> None:
    """Create ``path`` atomically: ``fill(tmp)`` writes a temporary file next to it, which is
    fsynced and renamed over ``path``. On any failure the temporary file is removed, ``path`` is
    untouched, and the exception propagates."""
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    # Same directory so that os.replace is a rename within one file system (hence atomic);
    # a leading dot keeps half-written files out of casual listings.
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
    try:
        fill(tmp)
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename).

    The parent directory must exist. On failure the previous content of ``path`` (if any) is
    left intact, no temporary file remains, and the error (usually :class:`OSError`) propagates.
    """

    def fill(tmp: str) -> None:
        # O_EXCL: never clobber anything; mode 0o666 lets the process umask decide permissions,
        # as for a file opened with open(path, "wb").
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    _atomic_write(path, fill)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (``indent=2``, keys in insertion order, trailing newline) atomically.

    The object is serialised before the file is touched, so an unserialisable object raises
    :class:`TypeError` and leaves ``path`` as it was.
    """
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# JSON encoding of state values


def _encode(obj: Any, path: str, sink: dict[str, torch.Tensor] | None) -> Any:
    """Encode ``obj`` into JSON-able values; tensors go into ``sink`` keyed by ``path``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if math.isfinite(value):
            return value
        return {_FLOAT: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(obj, torch.Tensor):
        if sink is None:
            flat = obj.detach().to("cpu").reshape(-1)
            return {
                _TENSOR: {
                    "dtype": str(obj.dtype).removeprefix("torch."),
                    "shape": list(obj.shape),
                    "data": [_encode(x, path, None) for x in flat.tolist()],
                }
            }
        if path in sink:
            raise CheckpointError(f"two state entries map to the same tensor key {path!r}")
        # A CPU snapshot: the caller may keep training (mutating the live state in place) while
        # this copy is being written, and it must not alias the live optimizer state.
        sink[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: path}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{path}.{i}", sink) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", sink) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        looks_tagged = len(obj) == 1 and next(iter(obj)) in _TAGS
        if all(isinstance(k, str) for k in obj) and not looks_tagged:
            return {k: _encode(v, f"{path}.{k}", sink) for k, v in obj.items()}
        return {
            _ITEMS: [
                [_encode(k, f"{path}.key", None), _encode(v, f"{path}.{k}", sink)]
                for k, v in obj.items()
            ]
        }
    raise CheckpointError(
        f"cannot store a value of type {type(obj).__name__} at {path!r} without pickle"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor] | None, what: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, what) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, body),) = obj.items()
        if tag == _TUPLE:
            return tuple(_decode(v, tensors, what) for v in body)
        if tag == _FLOAT:
            return float(body)
        if tag == _ITEMS:
            return {
                _decode(k, tensors, what): _decode(v, tensors, what) for k, v in body
            }
        if tag == _TENSOR:
            if isinstance(body, str):
                if tensors is None or body not in tensors:
                    raise CheckpointError(f"{what}: tensor {body!r} is missing")
                return tensors[body]
            try:
                data = [_decode(x, None, what) for x in body["data"]]
                return torch.tensor(data, dtype=getattr(torch, body["dtype"])).reshape(
                    body["shape"]
                )
            except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
                raise CheckpointError(f"{what}: malformed inline tensor {body!r}") from exc
    return {k: _decode(v, tensors, what) for k, v in obj.items()}


def _check_format(meta: Any, expected: str, what: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != expected:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{what}: expected format {expected!r}, found {found!r}")
    version = meta.get("version")
    if not isinstance(version, int) or version > _FORMAT_VERSION:
        raise CheckpointError(
            f"{what}: unsupported format version {version!r} (this lmsae reads up to "
            f"{_FORMAT_VERSION})"
        )
    return meta


# --------------------------------------------------------------------------------------------
# Optimizer and scheduler state


def optimizer_state_to_flat(
    optimizer: torch.optim.Optimizer, *, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON metadata.

    Args:
        optimizer: any optimizer whose state holds tensors and plain Python values.
        prefix: prepended to every tensor key, to share one tensors file with other pieces.

    Returns:
        ``(tensors, meta)``: tensors keyed ``<prefix>state.<param_idx>.<name>`` (CPU copies,
        e.g. ``state.0.exp_avg``); ``meta`` holds the parameter groups, the non-tensor state
        values and references to the tensor keys. Both are independent of the live optimizer.

    Raises:
        CheckpointError: the state holds a value that cannot be stored without pickle.
    """
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta = {
        "format": _OPTIMIZER_FORMAT,
        "version": _FORMAT_VERSION,
        "optimizer": type(optimizer).__name__,
        "state": _encode(state_dict["state"], f"{prefix}state", tensors),
        "param_groups": _encode(state_dict["param_groups"], f"{prefix}param_groups", tensors),
    }
    return tensors, meta


def optimizer_state_from_flat(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> dict[str, Any]:
    """Rebuild the ``state_dict`` saved by :func:`optimizer_state_to_flat`.

    The result is accepted by ``optimizer.load_state_dict`` of an optimizer of the same class
    built over the same parameters. Extra entries in ``tensors`` are ignored.

    Raises:
        CheckpointError: ``meta`` is not optimizer state, or a referenced tensor is missing.
    """
    what = "optimizer state"
    _check_format(meta, _OPTIMIZER_FORMAT, what)
    state = _decode(meta.get("state"), tensors, what)
    param_groups = _decode(meta.get("param_groups"), tensors, what)
    if not isinstance(state, dict) or not isinstance(param_groups, list):
        raise CheckpointError(f"{what}: malformed 'state' or 'param_groups'")
    return {"state": state, "param_groups": param_groups}


def scheduler_state_to_json(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """JSON-serialisable state of a learning-rate scheduler such as ``LambdaLR``.

    The learning-rate functions are not stored (they are rebuilt from the config); only the
    counters and learning rates (``last_epoch``, ``base_lrs``, ``_last_lr``...) are.

    Raises:
        CheckpointError: the state holds a value that cannot be stored without pickle.
    """
    state = dict(scheduler.state_dict())
    lr_lambdas = state.pop("lr_lambdas", None)
    return {
        "format": _SCHEDULER_FORMAT,
        "version": _FORMAT_VERSION,
        "scheduler": type(scheduler).__name__,
        "num_lr_lambdas": None if lr_lambdas is None else len(lr_lambdas),
        "state": _encode(state, "scheduler", None),
    }


def scheduler_state_from_json(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild a state dict for ``scheduler.load_state_dict`` from :func:`scheduler_state_to_json`.

    For ``LambdaLR`` the ``lr_lambdas`` entry is a list of None, so the scheduler keeps the
    functions it was constructed with.

    Raises:
        CheckpointError: ``obj`` is not scheduler state.
    """
    what = "scheduler state"
    _check_format(obj, _SCHEDULER_FORMAT, what)
    state = _decode(obj.get("state"), None, what)
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: malformed 'state'")
    count = obj.get("num_lr_lambdas")
    if count is not None:
        state["lr_lambdas"] = [None] * int(count)
    return state


# --------------------------------------------------------------------------------------------
# Random number generators


def rng_state_capture() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Capture the global RNG states of torch (CPU and every CUDA device), ``random`` and numpy.

    Returns:
        ``(tensors, meta)``: tensors ``torch_cpu`` (uint8), ``torch_cuda.<i>`` (uint8, one per
        CUDA device when CUDA is available) and ``numpy_mt19937`` (the 624 MT19937 key words,
        bit-cast from uint32 to int32); ``meta`` holds the ``random`` state and the rest of the
        numpy state.
    """
    tensors: dict[str, torch.Tensor] = {"torch_cpu": torch.get_rng_state().clone()}
    cuda_devices = 0
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = state.cpu().clone()
            cuda_devices += 1

    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # pragma: no cover - legacy=True always gives a tuple
        raise CheckpointError("numpy global RNG is not MT19937; cannot capture its state")
    bit_generator, keys, pos, has_gauss, cached_gaussian = np_state
    # safetensors has no unsigned 32-bit type everywhere: store the same bits as int32.
    keys_i32 = np.ascontiguousarray(keys, np.uint32).view(np.int32).copy()
    tensors["numpy_mt19937"] = torch.from_numpy(keys_i32)
    meta = {
        "format": _RNG_FORMAT,
        "version": _FORMAT_VERSION,
        "cuda_devices": cuda_devices,
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": bit_generator,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    return tensors, meta


def rng_state_restore(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Restore the RNG states captured by :func:`rng_state_capture`.

    CUDA states are restored for the devices present in both the capture and this process;
    a mismatch in device count (e.g. resuming on CPU) gives a warning, not an error.

    Raises:
        CheckpointError: ``meta`` is not RNG state or an entry is missing or malformed.
    """
    what = "RNG state"
    _check_format(meta, _RNG_FORMAT, what)
    try:
        cpu_state = tensors["torch_cpu"]
        keys = tensors["numpy_mt19937"]
        py = meta["python"]
        npm = meta["numpy"]
        py_state = (int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss_next"])
        np_state = (
            str(npm["bit_generator"]),
            keys.detach().cpu().contiguous().numpy().view(np.uint32).copy(),
            int(npm["pos"]),
            int(npm["has_gauss"]),
            float(npm["cached_gaussian"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{what}: missing or malformed entry ({exc})") from exc

    try:
        torch.set_rng_state(cpu_state.detach().cpu().to(torch.uint8))
        random.setstate(py_state)
        np.random.set_state(np_state)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{what}: could not restore ({exc})") from exc

    saved_cuda = int(meta.get("cuda_devices", 0))
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved_cuda != available:
        warnings.warn(
            f"RNG state was captured with {saved_cuda} CUDA device(s) and {available} are "
            f"available; restoring the CUDA RNG of the first {min(saved_cuda, available)}",
            RuntimeWarning,
            stacklevel=2,
        )
    for i in range(min(saved_cuda, available)):
        key = f"torch_cuda.{i}"
        if key not in tensors:
            raise CheckpointError(f"{what}: tensor {key!r} is missing")
        torch.cuda.set_rng_state(tensors[key].detach().cpu().to(torch.uint8), i)


# --------------------------------------------------------------------------------------------
# Tensors + JSON file pairs


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, non-aliasing tensors, as safetensors requires."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise CheckpointError(f"tensor keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:
            # safetensors refuses tensors sharing memory; a copy stores the same values.
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen_storage.add(ptr)
        out[key] = t
    return out


def save_tensors_and_json(
    directory: PathLike,
    stem: str,
    tensors: Mapping[str, torch.Tensor],
    meta: Any,
) -> None:
    """Write ``<directory>/<stem>.safetensors`` and ``<directory>/<stem>.json``, each atomically.

    The directory is created if needed. Both files carry the same random pair id, so
    :func:`load_tensors_and_json` detects a pair torn by a crash between the two writes (the
    tensors file is written first).

    Args:
        directory: destination directory.
        stem: file name without extension.
        tensors: tensors to store (moved to CPU; any dtype safetensors supports).
        meta: JSON-serialisable value stored under ``"meta"`` in the JSON file.

    Raises:
        CheckpointError: a value cannot be stored, or writing failed (the previous files, if
            any, are then left intact).
    """
    directory = os.fspath(directory)
    st_path = os.path.join(directory, f"{stem}.safetensors")
    json_path = os.path.join(directory, f"{stem}.json")
    prepared = _prepare_tensors(tensors)
    pair_id = uuid.uuid4().hex
    doc = {
        "format": _PAIR_FORMAT,
        "version": _FORMAT_VERSION,
        "pair_id": pair_id,
        "tensors_file": os.path.basename(st_path),
        "meta": meta,
    }
    try:
        text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot write {json_path}: meta is not JSON-serialisable ({exc})"
        ) from exc
    try:
        os.makedirs(directory, exist_ok=True)
        header = {_PAIR_ID_KEY: pair_id}
        _atomic_write(st_path, lambda tmp: save_file(prepared, tmp, metadata=header))
        atomic_write_bytes(json_path, text.encode("utf-8"))
    except OSError as exc:
        raise CheckpointError(
            f"cannot write checkpoint files {st_path} / {json_path}: {exc}"
        ) from exc


def load_tensors_and_json(
    directory: PathLike, stem: str
) -> tuple[dict[str, torch.Tensor], Any]:
    """Read the pair written by :func:`save_tensors_and_json`.

    Returns:
        ``(tensors, meta)`` with tensors on CPU.

    Raises:
        CheckpointError: naming the file, when a file is missing, unreadable or corrupt, or
            the two files do not belong to the same save.
    """
    directory = os.fspath(directory)
    st_path = os.path.join(directory, f"{stem}.safetensors")
    json_path = os.path.join(directory, f"{stem}.json")
    for path in (json_path, st_path):
        if not os.path.isfile(path):
            raise CheckpointError(f"missing checkpoint file {path}")

    try:
        with open(json_path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt or unreadable checkpoint file {json_path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != _PAIR_FORMAT or "meta" not in doc:
        raise CheckpointError(
            f"corrupt checkpoint file {json_path}: not an lmsae tensors+json file"
        )
    if not isinstance(doc.get("version"), int) or doc["version"] > _FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint file {json_path} has unsupported format version {doc.get('version')!r}"
        )

    try:
        with safe_open(st_path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own and builtin errors for bad files
        raise CheckpointError(f"corrupt or unreadable checkpoint file {st_path}: {exc}") from exc

    if header.get(_PAIR_ID_KEY) != doc.get("pair_id"):
        raise CheckpointError(
            f"checkpoint files {st_path} and {json_path} come from different saves "
            "(interrupted write?)"
        )
    return tensors, doc["meta"]


# --------------------------------------------------------------------------------------------
# Arbitrary nested state (dicts of JSON values and tensors)


def nested_to_flat(state: Any, prefix: str = "state") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts/lists/tuples of JSON values and tensors) into
    ``(tensors, meta)``: tensors keyed by their path, and a JSON value referencing them."""
    sink: dict[str, torch.Tensor] = {}
    meta = _encode(state, prefix, sink)
    return sink, meta


def nested_from_flat(tensors: Mapping[str, torch.Tensor], meta: Any, what: str = "state") -> Any:
    """The inverse of :func:`nested_to_flat`."""
    return _decode(meta, tensors, what)
