"""Deterministic safetensors serialisation shared by the dictionary writer and the activation cache.

``safetensors.torch.save_file`` keeps the metadata in a hash map whose order changes between
calls, so equal inputs gave different bytes (and checksums), and ``save`` returns one big copy of
the data. :func:`safetensors_parts` gives the bytes of a file as a list of buffers instead: the
8-byte little-endian header length, the JSON header with sorted keys padded with spaces to a
multiple of 8 bytes, then the tensors' little-endian data in order of decreasing element size,
then name (every tensor starts at a multiple of its element size, as safetensors lays them out).
The tensor data is a view of the tensors' memory, not a copy. The files load with ``safetensors``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from lmsae.errors import LmsaeError

__all__ = ["SAFETENSORS_DTYPES", "safetensors_parts", "write_safetensors"]

#: safetensors dtype names of the tensors lmsae writes
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL"}


def safetensors_parts(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                      error: type[LmsaeError] = LmsaeError) -> list[bytes | memoryview]:
    """The bytes of a safetensors file holding ``tensors`` (moved to the CPU) and ``metadata``,
    as a list of buffers; the same bytes for equal inputs. Problems raise ``error`` (the caller's
    typed error) naming the tensor or the metadata keys."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise error("writing safetensors files needs a little-endian machine")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise error(f"safetensors metadata must map strings to strings; not so for {bad}")
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    parts: list[bytes | memoryview] = []
    offset = 0
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        x = tensors[name].detach().to("cpu").contiguous()
        if x.dtype not in SAFETENSORS_DTYPES:
            raise error(f"cannot save tensor {name!r} of dtype {x.dtype} (supported: "
                        f"{', '.join(str(d) for d in SAFETENSORS_DTYPES)})")
        raw = memoryview(x.reshape(-1).view(torch.uint8).numpy())
        header[name] = {"dtype": SAFETENSORS_DTYPES[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + raw.nbytes]}
        parts.append(raw)
        offset += raw.nbytes
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return [len(text).to_bytes(8, "little"), text, *parts]


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                      error: type[LmsaeError] = LmsaeError) -> None:
    """Write :func:`safetensors_parts` to ``path`` (not atomically: callers that need it write into a
    temporary directory or file and rename)."""
    parts = safetensors_parts(tensors, metadata, error=error)
    with open(path, "wb") as fh:
        fh.writelines(parts)
