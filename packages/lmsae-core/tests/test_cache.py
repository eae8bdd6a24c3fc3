"""Tests for lmsae.activations.cache (format, writer, reader, checks) and the ``activations check`` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from lmsae.activations import cache as cache_mod
from lmsae.activations.cache import (
    MANIFEST,
    WRITER_SPEC,
    ActivationCache,
    ActivationWriter,
    ActivationWriterConfig,
    CacheFileError,
    build_activation_writer,
    check_cache,
    describe_cache,
    rebuild_manifest,
)
from lmsae.activations.commands import register
from lmsae.activations.protocol import SourceContext
from lmsae.config.fields import FieldValueError, field_doc
from lmsae.errors import DataError
from lmsae.sources.synthetic_source import SyntheticSource, SyntheticSourceConfig

A = "blocks.0.hook_resid_post"
B = "blocks.1.hook_mlp_out"
T = 6
DESCRIPTION = {"model": "toy-lm", "dataset": {"name": "toy", "split": "train"}}


def make_sequences(n: int, hooks=(A, B), d=(8, 4), seed=0) -> dict:
    """``n`` hand-made sequences with distinct tokens, a ragged mask and meta."""
    g = torch.Generator().manual_seed(seed)
    out = {h: torch.randn(n, T, dd, generator=g) for h, dd in zip(hooks, d, strict=True)}
    out["tokens"] = torch.randint(0, 1000, (n, T), generator=g)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    out["mask"] = torch.arange(T)[None, :] < lengths[:, None]
    out["meta"] = [{"context_idx": i, "dataset_name": "toy"} for i in range(n)]
    return out


def batches_of(data: dict, size: int, start: int = 0):
    n = data["tokens"].shape[0]
    for lo in range(start, n, size):
        hi = min(lo + size, n)
        yield {k: v[lo:hi] for k, v in data.items()}


def write_cache(directory, data, *, hooks=(A, B), batch=5, **cfg) -> ActivationWriter:
    cfg.setdefault("chunk_sequences", 4)
    cfg.setdefault("write_threads", 0)
    writer = ActivationWriter(directory, hooks, ActivationWriterConfig(**cfg), description=DESCRIPTION)
    for b in batches_of(data, batch):
        writer.write(b)
    writer.close()
    return writer


def read_all(directory, hooks=(A, B), verify="sha256") -> list[dict]:
    cache = ActivationCache(directory)
    return [cache.read_chunk(ref, hooks, verify) for ref in cache.chunks()]


def tree_bytes(directory) -> dict[str, bytes]:
    root = Path(directory)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".manifest.lock"}


def records(directory) -> list[dict]:
    manifest = json.loads((Path(directory) / MANIFEST).read_text())
    return [c for s in manifest["shards"] for c in s["chunks"]]


# ---------------------------------------------------------------------- config


def test_writer_config_defaults_docs_and_validation():
    cfg = ActivationWriterConfig()
    assert (cfg.name, cfg.chunk_sequences, cfg.dtype, cfg.write_threads) == ("safetensors", 64, "float32", 2)
    for field in cfg.__attrs_attrs__:
        assert field_doc(field), field.name
    with pytest.raises(FieldValueError, match="dtype"):
        ActivationWriterConfig(dtype="float64")
    with pytest.raises(FieldValueError, match="chunk_sequences"):
        ActivationWriterConfig(chunk_sequences=0)
    with pytest.raises(FieldValueError, match="write_threads"):
        ActivationWriterConfig(write_threads=-1)
    assert WRITER_SPEC.name == "safetensors" and WRITER_SPEC.factory is build_activation_writer


# ---------------------------------------------------------------------- round trip


def test_round_trip_float32_exact(tmp_path):
    data = make_sequences(35)
    write_cache(tmp_path, data)
    chunks = read_all(tmp_path)
    assert [c["tokens"].shape[0] for c in chunks] == [4] * 8 + [3]
    for key in (A, B, "tokens", "mask"):
        got = torch.cat([c[key] for c in chunks])
        assert got.dtype == data[key].dtype
        assert torch.equal(got, data[key]), key
    assert [m for c in chunks for m in c["meta"]] == data["meta"]

    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["format"] == "lmsae.activation_cache" and manifest["version"] == 1
    assert manifest["model"] == "toy-lm" and manifest["dataset"] == DESCRIPTION["dataset"]
    assert manifest["hook_points"] == {A: {"d": 8, "dtype": "float32"}, B: {"d": 4, "dtype": "float32"}}
    assert (manifest["context_size"], manifest["layout"], manifest["n_shards"]) == (T, "sequences", 1)
    totals = manifest["totals"]
    assert totals["chunks"] == 9 and totals["sequences"] == 35 and totals["tokens"] == 35 * T
    assert totals["unmasked_tokens"] == int(data["mask"].sum())
    shard = manifest["shards"][0]
    assert shard["finished"] and shard["dir"] == "shard-0000"
    rec = shard["chunks"][0]
    assert rec["files"][A]["file"] == f"{A}/chunk-000000.safetensors"
    assert rec["meta_file"] == "meta/chunk-000000.json"
    path = tmp_path / "shard-0000" / rec["files"][A]["file"]
    assert rec["files"][A]["bytes"] == path.stat().st_size
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert f.metadata() == {"hook": A, "chunk": "0", "shard": "0"}
        assert set(f.keys()) == {"activation", "tokens", "mask"}

    info = describe_cache(tmp_path)
    assert info["sequences"] == 35 and info["chunks"] == 9 and info["model"] == "toy-lm"
    assert info["unfinished_shards"] == [] and info["missing_shards"] == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_round_trip_low_precision_storage(tmp_path, dtype):
    data = make_sequences(9)
    write_cache(tmp_path, data, dtype=dtype)
    chunks = read_all(tmp_path)
    storage = getattr(torch, dtype)
    for hook in (A, B):
        got = torch.cat([c[hook] for c in chunks])
        assert got.dtype == torch.float32
        assert torch.equal(got, data[hook].to(storage).to(torch.float32))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["dtype"] == dtype


def test_synthetic_source_round_trip(tmp_path):
    cfg = SyntheticSourceConfig(d_model=8, n_features=32, mean_active=2.0, batch_size=5, seed=3, context_size=T,
                                n_batches=3, hook_point=A, hook_point_out=B, d_out=4)
    source = SyntheticSource(cfg, SourceContext(hook_points=(A, B), layout="sequences"))
    original = list(source)
    writer = ActivationWriter(tmp_path, (A, B), ActivationWriterConfig(chunk_sequences=4, write_threads=2))
    for batch in original:
        writer.write(batch)
    writer.close()
    chunks = read_all(tmp_path)
    for key in (A, B, "tokens", "mask"):
        assert torch.equal(torch.cat([c[key] for c in chunks]), torch.cat([b[key] for b in original]))
    assert [m for c in chunks for m in c["meta"]] == [{}] * 15


def test_threaded_and_synchronous_writes_are_byte_identical(tmp_path):
    data = make_sequences(37)
    write_cache(tmp_path / "sync", data, write_threads=0, chunk_sequences=3)
    write_cache(tmp_path / "threads", data, write_threads=3, chunk_sequences=3, batch=7)
    a, b = tree_bytes(tmp_path / "sync"), tree_bytes(tmp_path / "threads")
    assert a.keys() == b.keys() and len(a) > 20
    assert a == b


def test_writer_rejects_malformed_batches_and_hook_names(tmp_path):
    writer = ActivationWriter(tmp_path, (A,), ActivationWriterConfig(write_threads=0))
    with pytest.raises(DataError, match="whole sequences"):
        writer.write({A: torch.randn(4, 8)})
    with pytest.raises(DataError, match="no hook point"):
        writer.write({"other": torch.randn(2, T, 8)})
    with pytest.raises(DataError, match="'mask' must be a bool"):
        writer.write({A: torch.randn(2, T, 8), "mask": torch.ones(2, T)})
    writer.write({A: torch.randn(2, T, 8)})
    with pytest.raises(DataError, match="context_size"):
        writer.write({A: torch.randn(2, T + 1, 8)})
    with pytest.raises(DataError, match="d of hook"):
        writer.write({A: torch.randn(2, T, 9)})
    writer.close()
    with pytest.raises(DataError, match="closed"):
        writer.write({A: torch.randn(2, T, 8)})
    for bad in ("a/b", "..", ".hidden", "meta", "tokens", ""):
        with pytest.raises(DataError, match="hook point name|non-empty"):
            ActivationWriter(tmp_path / "x", (bad,))


def test_background_write_error_surfaces_on_next_call(tmp_path, monkeypatch):
    real = cache_mod._atomic_write_parts
    calls = {"n": 0}

    def flaky(path, parts):
        if str(path).endswith("chunk-000001.safetensors"):
            calls["n"] += 1
            raise OSError("disk full (simulated)")
        return real(path, parts)

    monkeypatch.setattr(cache_mod, "_atomic_write_parts", flaky)
    writer = ActivationWriter(tmp_path, (A,), ActivationWriterConfig(chunk_sequences=2, write_threads=1))
    data = make_sequences(4, hooks=(A,), d=(8,))
    with pytest.raises(OSError, match="disk full"):
        for batch in batches_of(data, 2):
            writer.write(batch)
        writer.close()
    assert calls["n"] == 1
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    # chunk 0 was committed, the shard stays unfinished and resumable
    monkeypatch.setattr(cache_mod, "_atomic_write_parts", real)
    again = ActivationWriter(tmp_path, (A,), ActivationWriterConfig(chunk_sequences=2, write_threads=1))
    assert again.resume_position() == 2 and not again.finished
    again.abort()


# ---------------------------------------------------------------------- resume and shards


@pytest.mark.parametrize("threads", [0, 2])
def test_resume_after_kill_gives_same_files_as_uninterrupted(tmp_path, threads):
    data = make_sequences(30)
    cfg = {"chunk_sequences": 4, "write_threads": threads}
    write_cache(tmp_path / "ref", data, **cfg)

    out = tmp_path / "resumed"
    if threads == 0:
        # A killed process: some batches written, never closed.
        killed = ActivationWriter(out, (A, B), ActivationWriterConfig(**cfg), description=DESCRIPTION)
        for b in list(batches_of(data, 5))[:3]:
            killed.write(b)
        del killed
    else:
        # An exception inside the with-block aborts: submitted chunks complete, the rest is dropped.
        with (pytest.raises(RuntimeError, match="boom"),
              ActivationWriter(out, (A, B), ActivationWriterConfig(**cfg), description=DESCRIPTION) as w):
            for i, b in enumerate(batches_of(data, 5)):
                if i == 3:
                    raise RuntimeError("boom")
                w.write(b)
    assert not (out / MANIFEST).exists()
    shard = json.loads((out / "shard-0000" / MANIFEST).read_text())
    assert not shard["finished"] and len(shard["chunks"]) == 3
    # leftovers of the kill: a temporary file and a chunk file written but never committed
    (out / "shard-0000" / A / ".chunk-000003.safetensors.deadbeef.tmp").write_bytes(b"half")
    (out / "shard-0000" / B / "chunk-000003.safetensors").write_bytes(b"uncommitted")

    writer = ActivationWriter(out, (B, A), ActivationWriterConfig(**cfg), description=DESCRIPTION)
    assert writer.resume_position() == 12 and writer.next_chunk_index == 3
    assert not (out / "shard-0000" / A / ".chunk-000003.safetensors.deadbeef.tmp").exists()
    assert not (out / "shard-0000" / B / "chunk-000003.safetensors").exists()
    for b in batches_of(data, 7, start=writer.resume_position()):
        writer.write(b)
    writer.close()
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


def test_two_shards_written_separately(tmp_path):
    data = [make_sequences(9, seed=0), make_sequences(6, seed=1)]
    for shard in (1, 0):  # order of completion does not matter
        w = ActivationWriter(tmp_path, (A, B), ActivationWriterConfig(chunk_sequences=4, write_threads=0),
                             shard_index=shard, n_shards=2, description=DESCRIPTION)
        for b in batches_of(data[shard], 5):
            w.write(b)
        w.close()
        manifest = json.loads((tmp_path / MANIFEST).read_text())
        assert [s["index"] for s in manifest["shards"]] == ([1] if shard == 1 else [0, 1])
    assert manifest["n_shards"] == 2 and manifest["totals"]["sequences"] == 15
    assert [len(s["chunks"]) for s in manifest["shards"]] == [3, 2]
    chunks = read_all(tmp_path)
    assert torch.equal(torch.cat([c[A] for c in chunks]), torch.cat([data[0][A], data[1][A]]))
    assert check_cache(tmp_path, progress=False).ok

    # a shard of a different run is refused
    with pytest.raises(DataError, match="n_shards"):
        ActivationWriter(tmp_path, (A, B), shard_index=0, n_shards=3, description=DESCRIPTION)


def test_partial_cache_reports_missing_and_unfinished_shards(tmp_path):
    w = ActivationWriter(tmp_path, (A,), ActivationWriterConfig(chunk_sequences=2, write_threads=0),
                         shard_index=1, n_shards=3)
    w.write({A: torch.randn(5, T, 8)})
    rebuild_manifest(tmp_path)  # publish what a killed writer left
    report = check_cache(tmp_path, progress=False)
    messages = [str(p) for p in report.problems]
    assert report.n_chunks == 2
    assert any("shard 0 of 3 is missing" in m for m in messages)
    assert any("shard 2 of 3 is missing" in m for m in messages)
    assert any("shard 1 is not finished" in m for m in messages)


@pytest.mark.parametrize(("change", "field"), [
    ({"config": ActivationWriterConfig(dtype="bfloat16")}, "dtype"),
    ({"hooks": (A,)}, "hook_points"),
    ({"description": {"model": "other-lm"}}, "model"),
])
def test_incompatible_reopen_is_refused_unless_overwrite(tmp_path, change, field):
    write_cache(tmp_path, make_sequences(5))
    kwargs = {"config": ActivationWriterConfig(), "description": DESCRIPTION, "hooks": (A, B)}
    kwargs.update(change)
    hooks = kwargs.pop("hooks")
    with pytest.raises(DataError, match=field) as info:
        ActivationWriter(tmp_path, hooks, kwargs["config"], description=kwargs["description"])
    # the CLI user's key (top level of the generate config) and the Python argument
    assert "set overwrite = true (a top-level key of the generate config" in str(info.value)
    assert "overwrite=True in Python" in str(info.value)
    w = ActivationWriter(tmp_path, hooks, kwargs["config"], description=kwargs["description"], overwrite=True)
    assert w.resume_position() == 0 and not (tmp_path / MANIFEST).exists()
    w.close()


@pytest.mark.parametrize(("damaged", "text"), [
    ("shard-0000/manifest.json", "{not json"),  # this writer's shard
    ("shard-0001/manifest.json", "{not json"),  # another shard
    ("shard-0001/manifest.json", '{"format": "something else"}'),
    ("manifest.json", '{"format": "something else"}'),
])
def test_refused_existing_data_names_the_overwrite_key(tmp_path, damaged, text):
    """The refusal tells a CLI user which config key discards the data (and a Python caller which
    argument); with it, the writer discards the damaged data and closes cleanly."""
    write_cache(tmp_path, make_sequences(5))
    (tmp_path / damaged).parent.mkdir(exist_ok=True)
    (tmp_path / damaged).write_text(text)
    with pytest.raises(DataError) as info:
        ActivationWriter(tmp_path, (A, B), description=DESCRIPTION)
    message = str(info.value)
    assert "set overwrite = true (a top-level key of the generate config: --set overwrite=true; " \
           "overwrite=True in Python) to discard" in message, message
    ActivationWriter(tmp_path, (A, B), description=DESCRIPTION, overwrite=True).close()


def test_context_size_and_width_conflicts_are_caught_on_first_write(tmp_path):
    write_cache(tmp_path, make_sequences(5))
    w = ActivationWriter(tmp_path, (A, B), ActivationWriterConfig(write_threads=0), description=DESCRIPTION)
    assert w.resume_position() == 5 and w.finished
    with pytest.raises(DataError, match="context_size"):
        w.write({A: torch.randn(1, T + 2, 8), B: torch.randn(1, T + 2, 4)})
    with pytest.raises(DataError, match=f"d of hook '{B}'"):
        w.write({A: torch.randn(1, T, 8), B: torch.randn(1, T, 5)})
    w.abort()


# ---------------------------------------------------------------------- corruption


@pytest.fixture()
def small_cache(tmp_path):
    data = make_sequences(12)
    write_cache(tmp_path, data)
    return tmp_path, ActivationCache(tmp_path)


def chunk_file(root, hook, index=0) -> Path:
    return root / "shard-0000" / hook / f"chunk-{index:06d}.safetensors"


def activation_offset(raw: bytes) -> int:
    """Offset of the first byte of the "activation" tensor in a safetensors file."""
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8:8 + n])["activation"]["data_offsets"][0]


def test_deleted_chunk_file(small_cache):
    root, cache = small_cache
    chunk_file(root, B, 1).unlink()
    with pytest.raises(CacheFileError, match="missing file") as info:
        cache.read_chunk(cache.chunks()[1], (A, B))
    assert str(chunk_file(root, B, 1)) in str(info.value) and repr(B) in str(info.value)
    assert info.value.hook == B


def test_truncated_chunk_file(small_cache):
    root, cache = small_cache
    path = chunk_file(root, A)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheFileError, match="size mismatch") as info:
        cache.read_chunk(cache.chunks()[0], (A, B), verify="size")
    assert str(path) in str(info.value) and repr(A) in str(info.value)


def test_flipped_byte_is_caught_by_sha256(small_cache):
    root, cache = small_cache
    path = chunk_file(root, B)
    raw = bytearray(path.read_bytes())
    raw[activation_offset(raw) + 5] ^= 0xFF  # inside the activations: only a checksum can notice
    path.write_bytes(bytes(raw))
    cache.read_chunk(cache.chunks()[0], (A, B), verify="size")
    with pytest.raises(CacheFileError, match="checksum mismatch") as info:
        cache.read_chunk(cache.chunks()[0], (A, B), verify="sha256")
    assert str(path) in str(info.value) and repr(B) in str(info.value)


@pytest.mark.parametrize("verify", ["none", "size"])
def test_corrupt_header_gives_clean_error_without_checksums(small_cache, verify):
    root, cache = small_cache
    path = chunk_file(root, A)
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\x00\xffzz"  # the JSON header starts at byte 8
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="not a valid safetensors file") as info:
        cache.read_chunk(cache.chunks()[0], (A, B), verify=verify)
    assert str(path) in str(info.value) and repr(A) in str(info.value)


def _rewrite_with_other_tokens(root: Path, hook: str, index: int = 0) -> Path:
    """Replace ``hook``'s file of chunk ``index`` with different tokens, and fix the manifest's
    checksum and size so that only the cross-hook check can notice."""
    from safetensors.torch import load_file, save_file

    path = chunk_file(root, hook, index)
    tensors = load_file(path)
    tensors["tokens"] = tensors["tokens"] + 1
    save_file(tensors, path, metadata={"hook": hook, "chunk": str(index), "shard": "0"})
    manifest = json.loads((root / MANIFEST).read_text())
    info = manifest["shards"][0]["chunks"][index]["files"][hook]
    info["bytes"] = path.stat().st_size
    info["sha256"] = cache_mod._sha256_hex(path.read_bytes())
    (root / MANIFEST).write_text(json.dumps(manifest))
    return path


def test_tokens_mismatch_between_hooks(small_cache):
    root, _ = small_cache
    path = _rewrite_with_other_tokens(root, B)
    cache = ActivationCache(root)
    with pytest.raises(CacheFileError, match="tokens differ") as info:
        cache.read_chunk(cache.chunks()[0], (A, B), verify="sha256")
    message = str(info.value)
    assert str(path) in message and repr(A) in message and repr(B) in message
    # one hook alone has nothing to compare with, but its tokens no longer match the manifest
    with pytest.raises(CacheFileError, match="tokens_sha256"):
        cache.read_chunk(cache.chunks()[0], (B,), verify="sha256")


def test_missing_manifest(small_cache):
    root, _ = small_cache
    (root / MANIFEST).unlink()
    with pytest.raises(DataError, match="missing manifest") as info:
        ActivationCache(root)
    assert str(root / MANIFEST) in str(info.value) and "rebuild_manifest" in str(info.value)
    report = check_cache(root, progress=False)
    assert not report.ok and "missing manifest" in str(report.problems[0])
    # the shard manifests are enough to publish it again
    rebuild_manifest(root)
    assert check_cache(root, progress=False).ok


def test_check_cache_collects_every_problem(small_cache):
    root, _ = small_cache
    assert check_cache(root, progress=False).ok
    chunk_file(root, A, 0).unlink()
    truncated = chunk_file(root, B, 1)
    truncated.write_bytes(truncated.read_bytes()[:100])
    flipped = chunk_file(root, A, 2)
    raw = bytearray(flipped.read_bytes())
    raw[activation_offset(raw)] ^= 1
    flipped.write_bytes(bytes(raw))
    (root / "shard-0000" / "meta" / "chunk-000002.json").write_text("[]")

    report = check_cache(root, verify="sha256", progress=False)
    assert (report.n_chunks, report.n_sequences, report.n_tokens) == (3, 12, 12 * T)
    found = {(Path(p.file).name, p.hook, p.message.split(":")[0]) for p in report.problems}
    assert found == {
        ("chunk-000000.safetensors", A, "missing file"),
        ("chunk-000001.safetensors", B, "size mismatch"),
        ("chunk-000002.safetensors", A, "checksum mismatch"),
        ("chunk-000002.json", None, "size mismatch"),
    }
    # size-only verification misses the flipped data byte, finds the rest
    assert len(check_cache(root, verify="size", progress=False).problems) == 3


def test_check_cache_reports_tokens_mismatch(small_cache):
    root, _ = small_cache
    _rewrite_with_other_tokens(root, A, 1)
    report = check_cache(root, progress=False)
    messages = [str(p) for p in report.problems]
    assert any("tokens differ" in m and repr(A) in m and repr(B) in m for m in messages)
    assert any("tokens_sha256" in m for m in messages)


# ---------------------------------------------------------------------- CLI


def make_cli() -> click.Group:
    @click.group()
    def cli() -> None:
        pass

    register(cli)
    return cli


def test_cli_check_clean_cache(small_cache):
    root, _ = small_cache
    result = CliRunner().invoke(make_cli(), ["activations", "check", str(root), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 chunks, 12 sequences" in result.output and ": ok" in result.output
    assert "toy-lm" in result.output and A in result.output
    result = CliRunner().invoke(make_cli(), ["activations", "check", str(root), "--verify", "size", "--no-progress"])
    assert result.exit_code == 0 and "verify=size" in result.output


def test_cli_check_reports_problems_and_fails(small_cache):
    root, _ = small_cache
    chunk_file(root, A, 0).unlink()
    chunk_file(root, B, 2).write_bytes(b"garbage")
    result = CliRunner().invoke(make_cli(), ["activations", "check", str(root), "--no-progress"])
    problems = [line for line in result.output.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 2
    assert str(chunk_file(root, A, 0)) in problems[0] and repr(A) in problems[0] and "missing file" in problems[0]
    assert str(chunk_file(root, B, 2)) in problems[1] and "size mismatch" in problems[1]
    assert "2 problems" in result.output
    # the lmsae entry point turns this error into exit code 2
    assert isinstance(result.exception, DataError) and result.exception.exit_code == 2
    assert "2 problems found" in str(result.exception)


def test_cli_check_missing_manifest(tmp_path):
    result = CliRunner().invoke(make_cli(), ["activations", "check", str(tmp_path), "--no-progress"])
    assert isinstance(result.exception, DataError)
    assert "missing manifest" in result.output


def test_orphan_files_are_ignored_by_readers(small_cache):
    root, _ = small_cache
    (root / "shard-0000" / A / ".chunk-000009.safetensors.x.tmp").write_bytes(b"x")
    (root / "shard-0000" / A / "chunk-000009.safetensors").write_bytes(b"x")
    assert check_cache(root, progress=False).ok
    assert len(read_all(root)) == 3


def test_cache_files_never_use_pickle(small_cache):
    root, _ = small_cache
    for name, data in tree_bytes(root).items():
        assert not data.startswith(b"\x80"), name  # pickle protocol marker
        assert name.endswith((".json", ".safetensors")), name
    assert os.path.getsize(root / MANIFEST) > 0


def test_manifest_cannot_point_outside_the_cache(small_cache):
    root, _ = small_cache
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["shards"][0]["chunks"][1]["files"][A]["file"] = "../../../etc/passwd"
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="chunk 1 of shard 0: file of hook"):
        ActivationCache(root)
    assert "malformed" in str(check_cache(root, progress=False).problems[0])


def test_meta_must_be_json_and_sync_write_errors_are_fatal(tmp_path, monkeypatch):
    writer = ActivationWriter(tmp_path, (A,), ActivationWriterConfig(chunk_sequences=2, write_threads=0))
    with pytest.raises(DataError, match="not JSON-serialisable"):
        writer.write({A: torch.randn(1, T, 8), "meta": [{"x": object()}]})
    writer.write({A: torch.randn(1, T, 8), "meta": [{"x": 1}]})  # still usable

    def broken(path, data):
        raise OSError("read-only file system (simulated)")

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", broken)
    with pytest.raises(OSError, match="read-only"):
        writer.write({A: torch.randn(1, T, 8)})
    with pytest.raises(OSError, match="read-only"):  # a gap would follow: refuse to continue
        writer.write({A: torch.randn(2, T, 8)})
    with pytest.raises(OSError, match="read-only"):
        writer.close()
