"""Numpy arrays and store records as bytes and JSON, without pickle.

Two layers:

- :func:`arrays_to_bytes` / :func:`bytes_to_arrays`: ``dict[str, ndarray]`` ⇄ safetensors bytes.
- A document codec for nested plain data holding arrays anywhere (records' samples, extras,
  histograms...). :func:`encode_document` turns a value into a JSON text plus one safetensors
  blob holding every array (``None`` when there is none); arrays are referenced from the JSON by
  key. :func:`decode_document` is the inverse. :func:`pack_document` / :func:`unpack_document`
  frame the same pair as one self-contained byte string (used where a single blob is needed,
  e.g. GridFS).

The JSON is strict (no NaN literals) and values JSON cannot express are written as tagged
single-key objects:

- ``{"__array__": "<key>"}`` a numpy array stored under ``<key>`` in the safetensors blob;
- ``{"__float__": "nan" | "inf" | "-inf"}`` a non-finite float;
- ``{"__tuple__": [...]}`` a tuple (so records compare equal after a round trip);
- ``{"__items__": [[key, value], ...]}`` a dict whose keys are not all strings;
- ``{"__dict__": {...}}`` a user dict that would otherwise be mistaken for a tag.

Numpy scalars become Python scalars. Only bool, signed/unsigned integer and float16/32/64 arrays
are accepted (what safetensors stores); anything else raises :class:`StoreError`.

Record converters (``*_to_plain`` / ``*_from_plain``) map the records of
:mod:`lmsae.stores.base` to plain nested data and back; both backends use them so the two agree
on what is stored.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from lmsae.errors import StoreError
from lmsae.stores.base import (
    EvaluationRecord,
    FeatureAnalysis,
    Interpretation,
    LogitAttribution,
    Sample,
    Sampling,
    TokenLogit,
)

__all__ = [
    "arrays_to_bytes",
    "bytes_to_arrays",
    "decode_document",
    "encode_document",
    "evaluation_from_plain",
    "evaluation_to_plain",
    "feature_heavy_from_plain",
    "feature_heavy_to_plain",
    "interpretation_from_plain",
    "logit_attribution_from_plain",
    "logit_attribution_to_plain",
    "pack_document",
    "unpack_document",
]

_ARRAY = "__array__"
_FLOAT = "__float__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"
_DICT = "__dict__"
_TAGS = frozenset({_ARRAY, _FLOAT, _TUPLE, _ITEMS, _DICT})

_ALLOWED_DTYPES = frozenset(
    np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                          np.uint64, np.float16, np.float32, np.float64)
)

# Framing of a packed document: magic, uint64 little-endian JSON length, JSON, safetensors.
_PACK_MAGIC = b"LMSAEDC1"
_PACK_HEADER = struct.Struct("<8sQ")


# --------------------------------------------------------------------------------------------
# Arrays <-> safetensors bytes


def _storable(key: str, array: np.ndarray) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise StoreError(f"array {key!r} is a {type(array).__name__}, not a numpy array")
    dtype = array.dtype
    if dtype.byteorder == ">":
        # safetensors holds little-endian data; the values and the dtype's kind are unchanged.
        dtype = dtype.newbyteorder("<")
        array = array.astype(dtype)
    if dtype not in _ALLOWED_DTYPES:
        raise StoreError(f"array {key!r} has dtype {array.dtype}, which cannot be stored "
                         "(bool, int8-64, uint8-64 and float16/32/64 can)")
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def _save(prepared: Mapping[str, np.ndarray]) -> bytes:
    try:
        return _st_save(dict(prepared))
    except Exception as exc:  # safetensors raises its own error type
        raise StoreError(f"cannot serialise arrays: {exc}") from exc


def arrays_to_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays as safetensors bytes (dtype, shape and values are kept exactly).

    Raises:
        StoreError: an array has a dtype safetensors cannot hold (strings, objects, complex...).
    """
    return _save({str(k): _storable(str(k), v) for k, v in arrays.items()})


def bytes_to_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The arrays serialised by :func:`arrays_to_bytes` (writable, native byte order).

    Raises:
        StoreError: ``data`` is not valid safetensors.
    """
    try:
        loaded = _st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error type for corrupt input
        raise StoreError(f"corrupt array blob: {exc}") from exc
    return {k: v if v.flags.writeable and v.dtype.isnative else np.array(v, dtype=v.dtype.newbyteorder("="))
            for k, v in loaded.items()}


# --------------------------------------------------------------------------------------------
# Nested values <-> JSON + arrays


def _encode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    # Checks ordered by how often each type occurs in records (this runs per sample).
    if isinstance(obj, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = _storable(key, obj)
        return {_ARRAY: key}
    if isinstance(obj, dict):
        if all(type(k) is str for k in obj):
            body = {k: _encode(v, arrays) for k, v in obj.items()}
            if len(body) == 1 and next(iter(body)) in _TAGS:
                return {_DICT: body}
            return body
        return {_ITEMS: [[_encode(k, arrays), _encode(v, arrays)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if math.isfinite(value):
            return value
        return {_FLOAT: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(obj, list):
        return [_encode(v, arrays) for v in obj]
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, arrays) for v in obj]}
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Mapping):
        return _encode(dict(obj), arrays)
    raise StoreError(f"cannot store a value of type {type(obj).__name__} ({obj!r:.80}); "
                     "use JSON values and numpy arrays")


def _decode(obj: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        tag, body = next(iter(obj.items()))
        if tag == _ARRAY:
            if body not in arrays:
                raise StoreError(f"corrupt record: array {body!r} is missing from its blob")
            return arrays[body]
        if tag == _FLOAT:
            return float(body)
        if tag == _TUPLE:
            return tuple(_decode(v, arrays) for v in body)
        if tag == _ITEMS:
            return {_decode(k, arrays): _decode(v, arrays) for k, v in body}
        if tag == _DICT:
            return {k: _decode(v, arrays) for k, v in body.items()}
    return {k: _decode(v, arrays) for k, v in obj.items()}


def encode_document(value: Any) -> tuple[str, bytes | None]:
    """``(json_text, arrays_blob)`` for a nested value of JSON data and numpy arrays.

    ``arrays_blob`` is safetensors bytes holding every array (``None`` when there is none).

    Raises:
        StoreError: the value holds something that cannot be stored without pickle.
    """
    arrays: dict[str, np.ndarray] = {}
    doc = _encode(value, arrays)
    # ASCII escapes keep tokenizer strings with lone surrogates storable as UTF-8 text.
    text = json.dumps(doc, allow_nan=False, separators=(",", ":"), ensure_ascii=True)
    return text, (_save(arrays) if arrays else None)


def decode_document(text: str, arrays_blob: bytes | None = None) -> Any:
    """The value encoded by :func:`encode_document`.

    Raises:
        StoreError: the text or blob is corrupt, or an array it references is missing.
    """
    try:
        doc = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"corrupt record document: {exc}") from exc
    arrays = bytes_to_arrays(arrays_blob) if arrays_blob else {}
    return _decode(doc, arrays)


def pack_document(value: Any) -> bytes:
    """One self-contained byte string for ``value``: a small header, the JSON, the arrays."""
    text, blob = encode_document(value)
    raw = text.encode("utf-8")
    return _PACK_HEADER.pack(_PACK_MAGIC, len(raw)) + raw + (blob or b"")


def unpack_document(data: bytes) -> Any:
    """The value packed by :func:`pack_document`.

    Raises:
        StoreError: ``data`` is not a packed document or is truncated.
    """
    data = bytes(data)
    if len(data) < _PACK_HEADER.size:
        raise StoreError("corrupt packed record: too short")
    magic, length = _PACK_HEADER.unpack_from(data)
    if magic != _PACK_MAGIC:
        raise StoreError("corrupt packed record: bad header")
    start = _PACK_HEADER.size
    if start + length > len(data):
        raise StoreError("corrupt packed record: truncated")
    text = data[start:start + length].decode("utf-8")
    rest = data[start + length:]
    return decode_document(text, rest or None)


# --------------------------------------------------------------------------------------------
# Records <-> plain data


def _sample_to_plain(sample: Sample) -> dict[str, Any]:
    return {"tokens": sample.tokens, "activations": sample.activations, "meta": dict(sample.meta),
            "extras": dict(sample.extras)}


def feature_heavy_to_plain(feature: FeatureAnalysis) -> dict[str, Any]:
    """The heavy part of a feature analysis (everything but the statistics columns)."""
    return {
        "histogram_counts": feature.histogram_counts,
        "histogram_edges": feature.histogram_edges,
        "samplings": [{"name": s.name, "samples": [_sample_to_plain(x) for x in s.samples]}
                      for s in feature.samplings],
        "extras": dict(feature.extras),
    }


def feature_heavy_from_plain(index: int, act_count: int, n_tokens: int, max_activation: float,
                             heavy: Mapping[str, Any]) -> FeatureAnalysis:
    """Rebuild a :class:`FeatureAnalysis` from its statistics and :func:`feature_heavy_to_plain`."""
    try:
        samplings = tuple(
            Sampling(name=s["name"], samples=tuple(
                Sample(tokens=x["tokens"], activations=x["activations"], meta=x["meta"], extras=x["extras"])
                for x in s["samples"]))
            for s in heavy["samplings"])
        return FeatureAnalysis(index=int(index), act_count=int(act_count), n_tokens=int(n_tokens),
                               max_activation=float(max_activation),
                               histogram_counts=heavy["histogram_counts"],
                               histogram_edges=heavy["histogram_edges"],
                               samplings=samplings, extras=heavy["extras"])
    except (KeyError, TypeError) as exc:
        raise StoreError(f"corrupt feature analysis record for feature {index}: {exc!r}") from exc


def logit_attribution_to_plain(record: LogitAttribution) -> dict[str, Any]:
    """The token lists of a logit attribution as ``[[token_id, token, logit], ...]``."""
    return {
        "top_positive": [[int(t.token_id), t.token, float(t.logit)] for t in record.top_positive],
        "top_negative": [[int(t.token_id), t.token, float(t.logit)] for t in record.top_negative],
    }


def logit_attribution_from_plain(index: int, plain: Mapping[str, Any]) -> LogitAttribution:
    """Rebuild a :class:`LogitAttribution` from :func:`logit_attribution_to_plain`."""
    try:
        return LogitAttribution(
            index=int(index),
            top_positive=tuple(TokenLogit(int(i), t, float(v)) for i, t, v in plain["top_positive"]),
            top_negative=tuple(TokenLogit(int(i), t, float(v)) for i, t, v in plain["top_negative"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"corrupt logit attribution record for feature {index}: {exc!r}") from exc


def interpretation_from_plain(index: int, text: str, explainer_model: str, created_at: float,
                                      plain: Mapping[str, Any]) -> Interpretation:
    """Rebuild an :class:`Interpretation` from its columns and ``{"scores", "details"}``."""
    try:
        return Interpretation(index=int(index), text=text, explainer_model=explainer_model,
                              scores=dict(plain["scores"]), details=dict(plain["details"]),
                              created_at=float(created_at))
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"corrupt interpretation record for feature {index}: {exc!r}") from exc


def evaluation_to_plain(record: EvaluationRecord) -> dict[str, Any]:
    """The payload of an evaluation record (everything but its name and creation time)."""
    return {"metrics": dict(record.metrics), "arrays": dict(record.arrays), "config": dict(record.config)}


def evaluation_from_plain(name: str, created_at: float, plain: Mapping[str, Any]) -> EvaluationRecord:
    """Rebuild an :class:`EvaluationRecord` from :func:`evaluation_to_plain`."""
    try:
        return EvaluationRecord(name=name, metrics=dict(plain["metrics"]), arrays=dict(plain["arrays"]),
                                config=dict(plain["config"]), created_at=float(created_at))
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"corrupt evaluation record {name!r}: {exc!r}") from exc
