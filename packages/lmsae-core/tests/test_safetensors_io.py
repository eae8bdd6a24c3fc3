"""The shared safetensors writer: loadable by safetensors, deterministic, aligned, typed errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lmsae.errors import CheckpointError, DataError
from lmsae.safetensors_io import safetensors_parts, write_safetensors


def test_round_trip_alignment_and_determinism(tmp_path):
    tensors = {"mask": torch.tensor([True, False, True]), "b": torch.randn(3, dtype=torch.float64),
               "a": torch.randn(2, 5), "tokens": torch.arange(7)}
    meta = {"z": "1", "a": "2"}
    write_safetensors(tmp_path / "one.safetensors", tensors, meta)
    write_safetensors(tmp_path / "two.safetensors", dict(reversed(list(tensors.items()))), dict(reversed(meta.items())))
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    with safe_open(str(tmp_path / "one.safetensors"), "pt") as f:
        assert f.metadata() == meta
        for name, value in tensors.items():
            assert torch.equal(f.get_tensor(name), value)
    parts = safetensors_parts(tensors, meta)
    header_len = int.from_bytes(parts[0], "little")
    assert header_len % 8 == 0
    header = json.loads(bytes(parts[1]))
    for name, value in tensors.items():
        assert header[name]["data_offsets"][0] % value.element_size() == 0  # aligned to its element size


def test_typed_errors():
    with pytest.raises(CheckpointError, match="strings to strings"):
        safetensors_parts({"a": torch.zeros(1)}, {"k": 1}, error=CheckpointError)  # type: ignore[dict-item]
    with pytest.raises(DataError, match="cannot save tensor 'c' of dtype torch.complex64"):
        safetensors_parts({"c": torch.zeros(1, dtype=torch.complex64)}, {}, error=DataError)
