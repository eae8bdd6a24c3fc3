"""Pickle-free checkpoint pieces: round trips, RNG restore and atomic writes."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from lmsae.errors import CheckpointError
from lmsae.training import state_io
from lmsae.training.optim import SparseAdam
from lmsae.training.schedules import make_lr_scheduler
from lmsae.training.state_io import (
    atomic_write_bytes,
    atomic_write_json,
    load_tensors_and_json,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    rng_state_capture,
    rng_state_restore,
    save_tensors_and_json,
    scheduler_state_from_json,
    scheduler_state_to_json,
)


def _make(opt_cls, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))]
    frozen = torch.nn.Parameter(torch.randn(3, generator=gen))  # never gets a grad: no state
    groups = [{"params": params[:1]}, {"params": [frozen, params[1]], "lr": 2e-3}]
    return params + [frozen], opt_cls(groups, lr=1e-2)


def _grads(step, params):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params[:2]:
        g = torch.randn(p.shape, generator=gen)
        p.grad = g * (torch.rand(p.shape, generator=gen) < 0.5)  # sparse, exercises SparseAdam


def _no_tmp_files(directory):
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, SparseAdam])
def test_optimizer_round_trip_through_files_is_bit_identical(tmp_path, opt_cls):
    params, opt = _make(opt_cls)
    sched = make_lr_scheduler(opt, "cosine", total_steps=20, warmup_steps=3, cooldown_steps=0, end_ratio=0.1)
    for step in range(5):
        _grads(step, params)
        opt.step()
        sched.step()

    tensors, meta = optimizer_state_to_flat(opt)
    # State indices follow the order of parameters across groups: 0, frozen = 1, 2.
    assert "state.0.exp_avg" in tensors and "state.2.exp_avg_sq" in tensors
    assert not any(key.startswith("state.1.") for key in tensors)  # the frozen param has no state
    both = {"optimizer": meta, "scheduler": scheduler_state_to_json(sched)}
    save_tensors_and_json(tmp_path, "optimizer", tensors, both)
    # The JSON file is plain JSON (no NaN, no pickle) and human-readable.
    json.loads((tmp_path / "optimizer.json").read_text(), parse_constant=lambda c: pytest.fail(c))

    # A fresh optimizer over fresh copies of the parameters, loaded from disk.
    params2, opt2 = _make(opt_cls)
    with torch.no_grad():
        for a, b in zip(params2, params, strict=True):
            a.copy_(b)
    sched2 = make_lr_scheduler(opt2, "cosine", total_steps=20, warmup_steps=3, cooldown_steps=0, end_ratio=0.1)
    loaded_tensors, loaded_meta = load_tensors_and_json(tmp_path, "optimizer")
    opt2.load_state_dict(optimizer_state_from_flat(loaded_tensors, loaded_meta["optimizer"]))
    sched2.load_state_dict(scheduler_state_from_json(loaded_meta["scheduler"]))
    assert sched2.last_epoch == sched.last_epoch == 5
    assert opt2.param_groups[1]["betas"] == opt.param_groups[1]["betas"]
    assert isinstance(opt2.param_groups[1]["betas"], tuple)

    for step in range(5, 12):
        for ps in (params, params2):
            _grads(step, ps)
        opt.step()
        opt2.step()
        sched.step()
        sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)


def test_optimizer_flat_is_a_snapshot_not_an_alias():
    params, opt = _make(torch.optim.Adam)
    _grads(0, params)
    opt.step()
    tensors, _ = optimizer_state_to_flat(opt)
    saved = tensors["state.0.exp_avg"].clone()
    _grads(1, params)
    opt.step()
    assert torch.equal(tensors["state.0.exp_avg"], saved)


def test_optimizer_from_flat_errors():
    params, opt = _make(torch.optim.Adam)
    _grads(0, params)
    opt.step()
    tensors, meta = optimizer_state_to_flat(opt, prefix="opt.")
    assert all(key.startswith("opt.state.") for key in tensors)
    del tensors["opt.state.0.exp_avg"]
    with pytest.raises(CheckpointError, match="opt.state.0.exp_avg"):
        optimizer_state_from_flat(tensors, meta)
    with pytest.raises(CheckpointError, match="format"):
        optimizer_state_from_flat(tensors, {"format": "something else"})


def test_encoding_of_awkward_values_round_trips():
    value = {
        "t": (1, 2.5, None),
        "nan": float("nan"),
        "inf": float("-inf"),
        "ints": {3: "a", 4: (True,)},
        "looks_like_tag": {"__tuple__": [1]},
        "tensor": torch.arange(6, dtype=torch.int16).reshape(2, 3),
    }
    encoded = state_io._encode(value, "x", None)
    text = json.dumps(encoded, allow_nan=False)  # strict JSON
    decoded = state_io._decode(json.loads(text), None, "test")
    assert decoded["t"] == (1, 2.5, None)
    assert np.isnan(decoded["nan"]) and decoded["inf"] == float("-inf")
    assert decoded["ints"] == {3: "a", 4: (True,)}
    assert decoded["looks_like_tag"] == {"__tuple__": [1]}
    assert torch.equal(decoded["tensor"], value["tensor"]) and decoded["tensor"].dtype == torch.int16
    with pytest.raises(CheckpointError, match="object"):
        state_io._encode({"bad": object()}, "x", None)


def test_scheduler_json_round_trip():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make_lr_scheduler(opt, "linear_decay", total_steps=10, warmup_steps=2, cooldown_steps=0, end_ratio=0.0)
    for _ in range(4):
        opt.step()
        sched.step()
    obj = json.loads(json.dumps(scheduler_state_to_json(sched)))
    assert "lr_lambdas" not in obj["state"]

    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched2 = make_lr_scheduler(opt2, "linear_decay", total_steps=10, warmup_steps=2, cooldown_steps=0, end_ratio=0.0)
    sched2.load_state_dict(scheduler_state_from_json(obj))
    assert sched2.last_epoch == 4 and sched2.get_last_lr() == sched.get_last_lr()
    # The learning-rate function survived (it was not replaced by anything loaded).
    for o, s in ((opt, sched), (opt2, sched2)):
        o.step()
        s.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_rng_capture_and_restore(tmp_path):
    def draw():
        torch_part = torch.rand(5).tolist()
        python_part = (random.random(), random.gauss(0, 1))
        numpy_part = (np.random.rand(3).tolist(), np.random.randn())
        return torch_part, python_part, numpy_part

    random.gauss(0, 1)  # leaves a cached gaussian in `random`'s state
    np.random.randn()
    tensors, meta = rng_state_capture()
    first = draw()
    # Through files, as a resume would do.
    save_tensors_and_json(tmp_path, "rng", tensors, meta)
    draw()  # move every generator on
    rng_state_restore(*load_tensors_and_json(tmp_path, "rng"))
    assert draw() == first
    rng_state_restore(tensors, meta)
    assert draw() == first


def test_rng_restore_rejects_malformed_state():
    tensors, meta = rng_state_capture()
    with pytest.raises(CheckpointError):
        rng_state_restore({k: v for k, v in tensors.items() if k != "torch_cpu"}, meta)
    with pytest.raises(CheckpointError):
        rng_state_restore(tensors, {**meta, "format": "x"})


# --------------------------------------------------------------------------------------------
# Files


def test_save_and_load_tensors_and_json(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tensors = {
        "a": base.reshape(3, 4).t(),  # non-contiguous
        "b": base,  # shares memory with "a"
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "ids": torch.tensor([1, 2], dtype=torch.int64),
    }
    meta = {"step": 7, "nested": {"names": ["x", "y"]}}
    save_tensors_and_json(tmp_path / "sub", "piece", tensors, meta)
    loaded, loaded_meta = load_tensors_and_json(tmp_path / "sub", "piece")
    assert loaded_meta == meta
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype
    assert _no_tmp_files(tmp_path / "sub") == []


def test_save_empty_tensors(tmp_path):
    save_tensors_and_json(tmp_path, "empty", {}, {"x": 1})
    assert load_tensors_and_json(tmp_path, "empty") == ({}, {"x": 1})


@pytest.mark.parametrize("missing", ["piece.json", "piece.safetensors"])
def test_load_missing_file_names_it(tmp_path, missing):
    save_tensors_and_json(tmp_path, "piece", {"a": torch.ones(2)}, {})
    (tmp_path / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_tensors_and_json(tmp_path, "piece")


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("piece.json", lambda b: b[: len(b) // 2]),
        ("piece.json", lambda b: b"[1, 2]"),
        ("piece.safetensors", lambda b: b[: len(b) - 5]),
        ("piece.safetensors", lambda b: b"\xff" * 16),
    ],
)
def test_load_corrupt_file_names_it(tmp_path, name, damage):
    save_tensors_and_json(tmp_path, "piece", {"a": torch.ones(100)}, {"k": "v"})
    path = tmp_path / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_tensors_and_json(tmp_path, "piece")


def test_load_detects_torn_pair(tmp_path):
    save_tensors_and_json(tmp_path / "one", "piece", {"a": torch.ones(2)}, {"v": 1})
    save_tensors_and_json(tmp_path / "two", "piece", {"a": torch.zeros(2)}, {"v": 2})
    os.replace(tmp_path / "two" / "piece.json", tmp_path / "one" / "piece.json")
    with pytest.raises(CheckpointError, match="different saves"):
        load_tensors_and_json(tmp_path / "one", "piece")


def test_save_rejects_non_tensor_and_unserialisable_meta(tmp_path):
    with pytest.raises(CheckpointError):
        save_tensors_and_json(tmp_path, "x", {"a": [1, 2]}, {})
    with pytest.raises(CheckpointError, match="JSON"):
        save_tensors_and_json(tmp_path, "x", {}, {"a": object()})
    assert os.listdir(tmp_path) == []


def test_atomic_write_json_format(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    text = path.read_text()
    assert text == json.dumps({"b": 1, "a": [1, 2]}, indent=2) + "\n"  # insertion order kept
    atomic_write_bytes(path, b"raw")
    assert path.read_bytes() == b"raw"


def test_failed_replace_keeps_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"version": 1})

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(state_io.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_json(path, {"version": 2})
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"version": 1}
    assert _no_tmp_files(tmp_path) == []


def test_failure_inside_writer_keeps_previous_file_and_no_temp(tmp_path, monkeypatch):
    save_tensors_and_json(tmp_path, "piece", {"a": torch.ones(3)}, {"v": 1})

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("killed mid-write")

    monkeypatch.setattr(state_io, "save_file", half_written)
    with pytest.raises(CheckpointError, match="killed mid-write"):
        save_tensors_and_json(tmp_path, "piece", {"a": torch.zeros(3)}, {"v": 2})
    monkeypatch.undo()
    tensors, meta = load_tensors_and_json(tmp_path, "piece")
    assert meta == {"v": 1} and torch.equal(tensors["a"], torch.ones(3))
    assert _no_tmp_files(tmp_path) == []


def test_failure_between_the_two_files_is_detected(tmp_path, monkeypatch):
    save_tensors_and_json(tmp_path, "piece", {"a": torch.ones(3)}, {"v": 1})
    real_replace = os.replace

    def replace_only_tensors(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("crash before the json")
        real_replace(src, dst)

    monkeypatch.setattr(state_io.os, "replace", replace_only_tensors)
    with pytest.raises(CheckpointError):
        save_tensors_and_json(tmp_path, "piece", {"a": torch.zeros(3)}, {"v": 2})
    monkeypatch.undo()
    assert _no_tmp_files(tmp_path) == []
    with pytest.raises(CheckpointError, match="different saves"):
        load_tensors_and_json(tmp_path, "piece")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_adam_state_saved_on_cpu_resumes_on_cuda(tmp_path):  # pragma: no cover - GPU only
    params, opt = _make(SparseAdam)
    for step in range(3):
        _grads(step, params)
        opt.step()
    save_tensors_and_json(tmp_path, "opt", *optimizer_state_to_flat(opt))
    cuda_params = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    groups = [{"params": cuda_params[:1]}, {"params": [cuda_params[2], cuda_params[1]], "lr": 2e-3}]
    opt2 = SparseAdam(groups, lr=1e-2)
    opt2.load_state_dict(optimizer_state_from_flat(*load_tensors_and_json(tmp_path, "opt")))
    assert opt2.state[cuda_params[0]]["step"].device.type == "cuda"
    for p in cuda_params[:2]:
        p.grad = torch.ones_like(p)
    opt2.step()
    tensors, meta = rng_state_capture()
    assert "torch_cuda.0" in tensors and meta["cuda_devices"] == torch.cuda.device_count()
