"""The on-disk activation cache: format, writer, reader and integrity checks.

A cache holds whole sequences of activations of one or more hook points, written once (by the
activation-generation task, possibly as several shards in parallel or one after the other) and
read many times (by the ``cached`` source, :mod:`lmsae.sources.cached_source`).

Layout (format ``lmsae.activation_cache``, version 1)::

    <cache_dir>/
      manifest.json                 top-level manifest, (re)built atomically from every shard
                                    manifest when a shard writer closes (see "Top-level manifest")
      .manifest.lock                lock file serialising those rebuilds (POSIX only; no data)
      shard-0000/
        manifest.json               per-shard progress manifest, rewritten atomically after every
                                    chunk whose files are all on disk (see "Shard manifest")
        <hook>/chunk-000000.safetensors
                                    one file per hook point and chunk, tensors:
                                      "activation" (S, T, d) in the storage dtype
                                      "tokens"     (S, T) int64 token ids (-1 where unknown)
                                      "mask"       (S, T) bool (False: padding/BOS/ignored)
                                    safetensors metadata {"hook": name, "chunk": "<index>",
                                    "shard": "<shard index>"} (all strings)
        meta/chunk-000000.json      JSON list of S per-sequence metadata dicts
      shard-0001/ ...

``S`` is the number of sequences of the chunk (``chunk_sequences`` for every chunk but possibly
the last of a shard), ``T`` the context size (the same for the whole cache) and ``d`` the hook's
width. Chunk indices start at 0 in every shard and are contiguous. Hook names are used as
directory names: dots are fine; names that are empty, start with ".", contain "/", "\\" or
"..", or equal "meta", "manifest.json" or a reserved batch key ("tokens", "mask") are rejected.

Shard manifest (``shard-XXXX/manifest.json``, compact JSON)::

    {"format": "lmsae.activation_cache.shard", "version": 1,
     "shard": 0, "n_shards": 2, "layout": "sequences",
     "hook_points": {"<hook>": {"d": 576 | null, "dtype": "float32"}, ...},   # d null before the 1st chunk
     "dtype": "float32", "context_size": 128 | null, "chunk_sequences": 64,
     "model": "<name>" | null, "dataset": <any JSON> | null, "description": {...},
     "chunks": [ <chunk record>, ... ],       # chunks 0..k-1, all files complete
     "finished": false}                       # true once the writer closed normally

Chunk record (paths relative to the shard directory)::

    {"index": 0, "n_sequences": 64, "n_tokens": 8192, "n_unmasked": 8100,
     "files": {"<hook>": {"file": "<hook>/chunk-000000.safetensors",
                          "sha256": "<hex of the file bytes>", "bytes": 1234}, ...},
     "meta_file": "meta/chunk-000000.json", "meta_sha256": "<hex>", "meta_bytes": 56,
     "tokens_sha256": "<hex of the tokens tensor as little-endian int64, C order>"}

Top-level manifest (``manifest.json``)::

    {"format": "lmsae.activation_cache", "version": 1,
     "model": ..., "dataset": ..., "description": {...},
     "hook_points": {"<hook>": {"d": 576, "dtype": "float32"}, ...},
     "dtype": "float32", "context_size": 128, "layout": "sequences", "n_shards": 2,
     "totals": {"chunks": ..., "sequences": ..., "tokens": ..., "unmasked_tokens": ..., "bytes": ...},
     "shards": [{"index": 0, "dir": "shard-0000", "finished": true,
                 "n_sequences": ..., "chunks": [<chunk record>, ...]}, ...]}

Crash safety: every file is written to a hidden temporary name in its final directory
(``.<name>.<random>.tmp``), fsynced and renamed (:func:`lmsae.training.state_io.atomic_write_bytes`
for JSON files; chunk files are streamed the same way, hashing as they go); the shard manifest only lists
a chunk once all of its files are renamed, in chunk order. A killed writer therefore leaves at
most temporary files and unlisted chunk files, which readers ignore and the next writer of that
shard deletes. Reopening a shard continues after its listed chunks:
:meth:`ActivationWriter.resume_position` is the number of sequences already stored, which the
generating task skips in its input.

Reading verifies, per chunk and hook, that the file exists, that its size (``verify="size"``)
or SHA-256 (``verify="sha256"``) matches the manifest, that it parses as safetensors, that its
tensors have the recorded shapes and dtypes, and that ``tokens`` are identical across hook
files. Every failure is a :class:`CacheFileError` (a :class:`~lmsae.errors.DataError`) naming
the file and the hook. :func:`check_cache` runs every check on every file and collects all
problems.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

import attrs
import torch
from lmsae.activations.protocol import RESERVED_KEYS
from lmsae.config.base import WriterConfig
from lmsae.config.fields import config_class, non_negative, one_of, option, positive
from lmsae.errors import DataError
from lmsae.records import WriterSpec
from lmsae.safetensors_io import safetensors_parts
from lmsae.training.state_io import atomic_write_bytes
from torch import Tensor

try:  # POSIX advisory locks serialise concurrent top-level manifest rebuilds
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "WRITER_SPEC",
    "ActivationCache",
    "ActivationWriter",
    "ActivationWriterConfig",
    "CacheFileError",
    "CacheProblem",
    "CacheReport",
    "ChunkRef",
    "build_activation_writer",
    "check_cache",
    "describe_cache",
    "rebuild_manifest",
]

log = logging.getLogger("lmsae")

CACHE_FORMAT = "lmsae.activation_cache"
SHARD_FORMAT = "lmsae.activation_cache.shard"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
META_DIR = "meta"
_LOCK_FILE = ".manifest.lock"
_LAYOUT = "sequences"
#: How a user discards existing data, in error messages: the writer is opened by the generate
#: task, whose config has the top-level key ``overwrite``; Python callers pass the argument.
_OVERWRITE = ("set overwrite = true (a top-level key of the generate config: --set overwrite=true; "
              "overwrite=True in Python)")

Verify = Literal["none", "size", "sha256"]
StorageDType = Literal["float32", "float16", "bfloat16"]
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_VERIFY_MODES = ("none", "size", "sha256")
_SHARD_DIR_RE = re.compile(r"^shard-(\d{4,})$")
_CHUNK_FILE_RE = re.compile(r"^chunk-(\d{6,})\.(safetensors|json)$")


def shard_dirname(shard: int) -> str:
    """``shard-0003`` for shard 3."""
    return f"shard-{shard:04d}"


def chunk_filename(index: int) -> str:
    """``chunk-000012.safetensors`` for chunk 12."""
    return f"chunk-{index:06d}.safetensors"


def meta_filename(index: int) -> str:
    """``chunk-000012.json`` for chunk 12."""
    return f"chunk-{index:06d}.json"


def validate_hook_name(name: Any) -> str:
    """Return ``name`` if it can be a directory name of the cache, else raise :class:`DataError`."""
    if not isinstance(name, str) or not name:
        raise DataError(f"hook point names must be non-empty strings, got {name!r}")
    bad = ("/" in name or "\\" in name or ".." in name or name.startswith(".") or "\0" in name
           or name in (META_DIR, MANIFEST) or name in RESERVED_KEYS)
    if bad:
        raise DataError(f"hook point name {name!r} cannot be stored in an activation cache (it is used as a "
                        "directory name: no '/', '\\' or '..', no leading '.', not 'meta', 'manifest.json', "
                        "'tokens' or 'mask')")
    return name


def _sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _tokens_sha256(tokens: Tensor) -> str:
    # Explicit little-endian int64 so the digest does not depend on the machine.
    array = tokens.detach().to("cpu", torch.int64).contiguous().numpy()
    return _sha256_hex(array.astype("<i8", copy=False).tobytes())


_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.bool: "BOOL"}
_TORCH_DTYPES: dict[str, torch.dtype] = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _atomic_write_parts(path: Path, parts: Sequence[bytes | memoryview]) -> tuple[str, int]:
    """Write the concatenation of ``parts`` to ``path`` atomically and return its ``(sha256 hex,
    size)``.

    The same protocol as :func:`lmsae.training.state_io.atomic_write_bytes` (hidden temporary
    file in the same directory, fsync, rename, fsync of the directory), but streaming: chunk
    files are tens of MB, and joining the parts into one bytes object first would copy them
    once more; the checksum is computed on the way."""
    digest = hashlib.sha256()
    size = 0
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
                digest.update(part)
                size += memoryview(part).nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename durable before the manifest that lists the file is written.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return digest.hexdigest(), size


def _parse_safetensors(buf: bytearray) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a safetensors file read into ``buf``; the tensors share
    ``buf``'s memory (no copy). Raises ValueError (or KeyError/TypeError) describing what is
    malformed: every offset and size is checked before a tensor is made."""
    if len(buf) < 8:
        raise ValueError(f"the file has {len(buf)} bytes, fewer than the 8-byte header length")
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8:
        raise ValueError(f"the header length ({n} bytes) exceeds the file size ({len(buf)} bytes)")
    header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    if not isinstance(header, dict):
        raise TypeError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise TypeError("__metadata__ is not a JSON object")
    base, available = 8 + n, len(buf) - 8 - n
    tensors: dict[str, Tensor] = {}
    for name, info in header.items():
        dtype = _TORCH_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if dtype is None:
            raise ValueError(f"tensor {name!r}: unsupported or missing dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(k, int) and k >= 0 for k in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(k, int) for k in offsets)):
            raise ValueError(f"tensor {name!r}: malformed shape or data_offsets")
        begin, end = offsets
        numel = math.prod(shape)
        if not 0 <= begin <= end <= available or end - begin != numel * _itemsize(dtype):
            raise ValueError(f"tensor {name!r}: data_offsets {offsets} do not fit shape {shape} in "
                             f"{available} data bytes")
        flat = (torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=base + begin) if numel
                else torch.empty(0, dtype=torch.uint8))
        if dtype == torch.bool and numel and int(flat.max()) > 1:
            raise ValueError(f"tensor {name!r}: bool data holds values other than 0 and 1")
        tensors[name] = flat.view(dtype).reshape(shape)
    return tensors, metadata


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _json_bytes(obj: Any, *, indent: int | None = None) -> bytes:
    separators = None if indent is not None else (",", ":")
    return (json.dumps(obj, indent=indent, separators=separators, allow_nan=False) + "\n").encode("utf-8")


def _read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; ``None`` when it does not exist; :class:`DataError` when unreadable."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} {path} is unreadable or not valid JSON: {exc}") from exc


@contextlib.contextmanager
def _manifest_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock on ``<directory>/.manifest.lock`` (a no-op where fcntl is missing).

    Two shard writers closing at the same time each rebuild the top-level manifest from all
    shard manifests; without the lock the one that read first could write last and drop the
    other's final chunks."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# =============================================================================================
# Writer


@config_class
class ActivationWriterConfig(WriterConfig):
    """Writes activations as a sharded safetensors cache with manifests and checksums."""

    name: ClassVar[str] = "safetensors"

    chunk_sequences: int = option(
        64, doc="Sequences per chunk file. Incoming batches are re-cut into chunks of exactly this many "
                "sequences; the last chunk of a shard may be smaller.",
        validator=positive())
    dtype: StorageDType = option(
        "float32", doc="Storage dtype of the activations ('float32', 'float16' or 'bfloat16'); readers cast "
                       "back to float32.",
        validator=one_of(*STORAGE_DTYPES))
    write_threads: int = option(
        2, doc="Background threads writing chunk files (0 = write synchronously). At most 2 x write_threads "
               "chunks wait to be written, which bounds memory.",
        validator=non_negative())


@attrs.define
class _Rows:
    """Sequences accepted by the writer but not yet cut into a chunk (CPU tensors we own)."""

    acts: dict[str, Tensor]  # hook -> (n, T, d) in the storage dtype
    tokens: Tensor  # (n, T) int64
    mask: Tensor  # (n, T) bool
    meta: list[Any]
    n: int


def _header_fields(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a (shard or top-level) manifest that must agree within one cache."""
    hooks = manifest.get("hook_points") or {}
    return {
        "hook_points": sorted(hooks),
        "dtype": manifest.get("dtype"),
        "context_size": manifest.get("context_size"),
        "n_shards": manifest.get("n_shards"),
        "model": manifest.get("model"),
        "d": {h: (v or {}).get("d") for h, v in hooks.items()},
    }


def _incompatibility(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """``(field, their value, my value)`` of the first conflicting header field, else None.
    Fields still unknown on either side (``None``) do not conflict."""
    a, b = _header_fields(mine), _header_fields(theirs)
    for key in ("hook_points", "dtype", "context_size", "n_shards", "model"):
        if a[key] is not None and b[key] is not None and a[key] != b[key]:
            return key, b[key], a[key]
    for hook, d in a["d"].items():
        other = b["d"].get(hook)
        if d is not None and other is not None and d != other:
            return f"d of hook {hook!r}", other, d
    return None


class ActivationWriter:
    """Write one shard of an activation cache (see the module docstring for the format).

    Args:
        directory: cache directory (created if missing); several shards share it.
        hook_points: hook points stored; every batch must hold all of them.
        config: chunk size, storage dtype and write threads (defaults when None).
        shard_index: this writer's shard (``0 <= shard_index < n_shards``).
        n_shards: number of shards of the whole cache.
        description: JSON-serialisable description of the run; its ``"model"`` (name) and
            ``"dataset"`` entries are also recorded as top-level manifest fields.
        overwrite: discard this shard's existing data, and every other shard whose header
            (hook points, dtype, context size, shard count, model) conflicts with this run.

    Opening an existing shard continues it: :meth:`resume_position` sequences are already
    stored and the next chunk index follows the stored ones. Without ``overwrite``, a shard
    (this one or another) written with different hook points, dtype, context size, widths,
    shard count or model raises :class:`DataError` naming the field.

    Batches (:meth:`write`) are sequence batches: ``{hook: (B, T, d) float, "tokens": (B, T)
    int, "mask": (B, T) bool, "meta": list of B dicts}`` (tokens, mask and meta optional). They
    are re-cut into chunks of ``config.chunk_sequences`` sequences. :meth:`close` writes the
    last partial chunk, marks the shard finished and rebuilds the top-level manifest. Used as a
    context manager, an exception inside the block calls :meth:`abort` instead, which keeps the
    shard resumable. Errors of background writes are raised by the next :meth:`write` or
    :meth:`close`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        hook_points: Sequence[str],
        config: ActivationWriterConfig | None = None,
        *,
        shard_index: int = 0,
        n_shards: int = 1,
        description: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ):
        self.config = config if config is not None else ActivationWriterConfig()
        hooks = tuple(hook_points)
        if not hooks:
            raise DataError("an activation writer needs at least one hook point")
        for hook in hooks:
            validate_hook_name(hook)
        if len(set(hooks)) != len(hooks):
            raise DataError(f"hook points must be distinct, got {list(hooks)}")
        if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
            raise ValueError(f"n_shards must be an int >= 1, got {n_shards!r}")
        if isinstance(shard_index, bool) or not isinstance(shard_index, int) or not 0 <= shard_index < n_shards:
            raise ValueError(f"shard_index must be an int in [0, {n_shards}), got {shard_index!r}")
        description = dict(description or {})
        try:
            _json_bytes(description)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the cache description must be JSON-serialisable: {exc}") from exc

        self.directory = Path(directory)
        self.hook_points = hooks
        self.shard_index = shard_index
        self.n_shards = n_shards
        self.shard_dir = self.directory / shard_dirname(shard_index)
        self._dtype_name = self.config.dtype
        self._dtype = STORAGE_DTYPES[self.config.dtype]
        self._description = description

        self.directory.mkdir(parents=True, exist_ok=True)
        top = _read_json_or_conflict(self.directory / MANIFEST, "cache manifest", overwrite)
        if top is not None and not overwrite and (not isinstance(top, dict) or top.get("format") != CACHE_FORMAT):
            raise DataError(f"{self.directory} holds a manifest.json that is not an lmsae activation cache; use "
                            f"another directory or {_OVERWRITE} to discard it")

        # Header as far as known now; d and context_size come with the first batch (or the
        # shard being resumed).
        self._dims: dict[str, int | None] = {h: None for h in hooks}
        self._context_size: int | None = None
        own = _read_json_or_conflict(self.shard_dir / MANIFEST, "shard manifest", overwrite)
        if overwrite and self.shard_dir.exists():
            shutil.rmtree(self.shard_dir)
            own = None
        if own is not None:
            self._check_shard_manifest(own, self.shard_dir / MANIFEST)
        others = []
        for path, other in self._other_shard_manifests(overwrite):
            conflict = _incompatibility(self._header(), other)
            if conflict is None:
                others.append(other)
                continue
            if overwrite:
                log.warning("overwrite: removing shard %s of an incompatible earlier run (%s)", path.parent,
                            conflict[0])
                shutil.rmtree(path.parent)
                continue
            self._raise_conflict(conflict, path)
        if overwrite:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / MANIFEST).unlink()

        # Keep the hook order of the data already there, so that a resumed shard's manifests
        # and files are the same as an uninterrupted run's.
        for existing in ([own] if own is not None else []) + others:
            order = [h for h in (existing.get("hook_points") or {}) if h in self._dims]
            if len(order) == len(hooks):
                self.hook_points = tuple(order)
                self._dims = {h: None for h in order}
                break
        # What the first batch must match: this shard's header, else another shard's.
        if own is not None:
            self._adopt_header(own)
        for other in others:
            self._adopt_header(other)
        if own is not None:
            self._chunks: list[dict[str, Any]] = list(own["chunks"])
            self._finished = bool(own.get("finished", False))
        else:
            self._chunks = []
            self._finished = False
        self._chunk_json = [json.dumps(c, separators=(",", ":")) for c in self._chunks]
        self._resume_position = sum(int(c["n_sequences"]) for c in self._chunks)
        self._next_index = len(self._chunks)
        self._next_commit = len(self._chunks)
        self._ready: dict[int, dict[str, Any]] = {}

        for sub in (*hooks, META_DIR):
            (self.shard_dir / sub).mkdir(parents=True, exist_ok=True)
        self._clean_orphans()
        self._lock = threading.Lock()
        self._write_shard_manifest()  # makes the shard (and its header) visible to other writers

        self._pending: list[_Rows] = []
        self._pending_rows = 0
        self._accepted = 0
        self._futures: deque[concurrent.futures.Future] = deque()
        self._executor = (concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.write_threads, thread_name_prefix=f"lmsae-cache-writer-{shard_index}")
            if self.config.write_threads > 0 else None)
        self._error: BaseException | None = None
        self._closed = False

    # ------------------------------------------------------------------ header and reopening

    def _header(self) -> dict[str, Any]:
        return {
            "hook_points": {h: {"d": self._dims[h], "dtype": self._dtype_name} for h in self.hook_points},
            "dtype": self._dtype_name,
            "context_size": self._context_size,
            "n_shards": self.n_shards,
            "model": self._description.get("model"),
        }

    def _raise_conflict(self, conflict: tuple[str, Any, Any], path: Path) -> None:
        field, theirs, mine = conflict
        raise DataError(
            f"activation cache {self.directory}: {field} of this run ({mine!r}) differs from the existing "
            f"data in {path} ({theirs!r}); write to another directory or {_OVERWRITE} to discard it")

    def _check_shard_manifest(self, own: Any, path: Path) -> None:
        if not isinstance(own, dict) or own.get("format") != SHARD_FORMAT or not isinstance(own.get("chunks"), list):
            raise DataError(f"{path} is not an lmsae shard manifest; remove {self.shard_dir} or {_OVERWRITE} to "
                            "discard it")
        if not isinstance(own.get("version"), int) or own["version"] > CACHE_VERSION:
            raise DataError(f"{path} has unsupported version {own.get('version')!r} (this lmsae writes "
                            f"{CACHE_VERSION})")
        conflict = _incompatibility(self._header(), own)
        if conflict is not None:
            self._raise_conflict(conflict, path)
        for position, record in enumerate(own["chunks"]):
            problem = _record_problem(record, position, self.hook_points)
            if problem:
                raise DataError(f"{path} is malformed: chunk {position}: {problem}; remove {self.shard_dir} or "
                                f"{_OVERWRITE} to discard it")

    def _other_shard_manifests(self, overwrite: bool) -> list[tuple[Path, dict[str, Any]]]:
        found = []
        for index, shard_dir in _shard_dirs(self.directory):
            if index == self.shard_index:
                continue
            path = shard_dir / MANIFEST
            manifest = _read_json_or_conflict(path, "shard manifest", overwrite)
            if isinstance(manifest, dict) and manifest.get("format") == SHARD_FORMAT:
                found.append((path, manifest))
            elif overwrite and path.exists():
                # unreadable (None above) or foreign: rebuilding the top-level manifest would fail on it
                log.warning("overwrite: removing shard %s (its manifest is not a readable lmsae shard manifest)",
                            shard_dir)
                shutil.rmtree(shard_dir)
            elif manifest is not None:
                raise DataError(f"{path} is not an lmsae shard manifest; remove it or {_OVERWRITE} to discard it")
        return found

    def _adopt_header(self, manifest: Mapping[str, Any]) -> None:
        for hook, info in (manifest.get("hook_points") or {}).items():
            if hook in self._dims and self._dims[hook] is None and (info or {}).get("d") is not None:
                self._dims[hook] = int(info["d"])
        if self._context_size is None and manifest.get("context_size") is not None:
            self._context_size = int(manifest["context_size"])

    def _clean_orphans(self) -> None:
        """Delete what a killed writer may have left: temporary files and chunk files that the
        manifest does not list (written, but not yet committed when the writer died)."""
        for sub in (*self.hook_points, META_DIR):
            folder = self.shard_dir / sub
            for entry in os.scandir(folder):
                if not entry.is_file():
                    continue
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    os.unlink(entry.path)
                    continue
                match = _CHUNK_FILE_RE.match(entry.name)
                if match and int(match.group(1)) >= len(self._chunks):
                    os.unlink(entry.path)
        for entry in os.scandir(self.shard_dir):
            if entry.is_file() and entry.name.startswith(".") and entry.name.endswith(".tmp"):
                os.unlink(entry.path)

    # ------------------------------------------------------------------ public state

    def resume_position(self) -> int:
        """Sequences this shard already held when the writer was opened (0 for a new shard);
        the generating task skips that many sequences of its input."""
        return self._resume_position

    @property
    def next_chunk_index(self) -> int:
        """Index of the next chunk to be cut."""
        return self._next_index

    @property
    def sequences_written(self) -> int:
        """Sequences stored before this writer opened plus sequences accepted by :meth:`write`."""
        return self._resume_position + self._accepted

    @property
    def finished(self) -> bool:
        """Whether the shard is marked complete (it was closed normally, and nothing was written since)."""
        return self._finished

    # ------------------------------------------------------------------ writing

    def _validate(self, batch: Any) -> _Rows | None:
        if not isinstance(batch, Mapping):
            raise DataError(f"activation writer: expected a batch dict, got {type(batch).__name__}")
        first = None
        acts: dict[str, Tensor] = {}
        for hook in self.hook_points:
            x = batch.get(hook)
            if x is None:
                raise DataError(f"activation writer: the batch has no hook point {hook!r} (keys: "
                                f"{sorted(k for k in batch if isinstance(k, str))})")
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise DataError(f"activation writer: {hook!r} must be a float tensor, got "
                                f"{getattr(x, 'dtype', type(x).__name__)}")
            if x.ndim != 3:
                raise DataError(f"activation writer: {hook!r} has shape {tuple(x.shape)}; the cache stores whole "
                                "sequences (batch, context, d) (use the 'sequences' layout)")
            if first is None:
                first = (hook, x.shape[0], x.shape[1])
            elif tuple(x.shape[:2]) != first[1:]:
                raise DataError(f"activation writer: {hook!r} has shape {tuple(x.shape)} but {first[0]!r} has "
                                f"{first[1]} sequences of {first[2]} tokens")
            acts[hook] = x
        _, n, t = first  # type: ignore[misc]
        tokens = batch.get("tokens")
        mask = batch.get("mask")
        meta = batch.get("meta")
        if tokens is not None and (not isinstance(tokens, Tensor) or tuple(tokens.shape) != (n, t)
                                   or tokens.is_floating_point() or tokens.dtype == torch.bool):
            raise DataError(f"activation writer: 'tokens' must be an integer tensor of shape {(n, t)}, got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != (n, t)
                                 or mask.dtype != torch.bool):
            raise DataError(f"activation writer: 'mask' must be a bool tensor of shape {(n, t)}, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        if meta is not None and (not isinstance(meta, (list, tuple)) or len(meta) != n):
            raise DataError(f"activation writer: 'meta' must be a list of {n} per-sequence entries")
        if n == 0:
            return None

        # Widths and context size are fixed by the first batch (or the cache being continued).
        if self._context_size is None:
            self._context_size = int(t)
        elif t != self._context_size:
            raise DataError(f"activation cache {self.directory}: context_size of this batch ({t}) differs from "
                            f"the cache's ({self._context_size})")
        for hook, x in acts.items():
            d = int(x.shape[2])
            if self._dims[hook] is None:
                self._dims[hook] = d
            elif d != self._dims[hook]:
                raise DataError(f"activation cache {self.directory}: d of hook {hook!r} in this batch ({d}) "
                                f"differs from the cache's ({self._dims[hook]})")

        # Owned CPU copies (cast to the storage dtype once): the caller may reuse its buffers.
        owned = {h: x.detach().to("cpu", self._dtype, copy=True) for h, x in acts.items()}
        if tokens is None:
            tokens_t = torch.full((n, t), -1, dtype=torch.int64)
        else:
            tokens_t = tokens.detach().to("cpu", torch.int64, copy=True)
        mask_t = (torch.ones((n, t), dtype=torch.bool) if mask is None
                  else mask.detach().to("cpu", copy=True))
        meta_list = [{} for _ in range(n)] if meta is None else list(meta)
        try:
            _json_bytes(meta_list)
        except (TypeError, ValueError) as exc:
            raise DataError(f"activation writer: the batch's per-sequence 'meta' is not JSON-serialisable: {exc}") \
                from exc
        return _Rows(owned, tokens_t, mask_t, meta_list, n)

    def write(self, batch: Mapping[str, Any]) -> None:
        """Accept a batch of sequences; every full chunk is written (in the background with
        write threads).

        Raises:
            DataError: the batch is malformed or does not match the cache (context size, widths).
            Exception: the error of an earlier background write (the writer is then unusable).
        """
        if self._closed:
            raise DataError(f"activation writer of {self.shard_dir} is closed")
        self._raise_pending_error()
        rows = self._validate(batch)
        if rows is None:
            return
        self._finished = False  # the manifest says so at the next commit
        self._pending.append(rows)
        self._pending_rows += rows.n
        self._accepted += rows.n
        size = self.config.chunk_sequences
        while self._pending_rows >= size:
            self._submit(self._cut(size))

    def _cut(self, n: int) -> _Rows:
        """Remove the first ``n`` pending sequences and return them as one chunk."""
        taken: list[_Rows] = []
        need = n
        while need > 0:
            head = self._pending[0]
            if head.n <= need:
                taken.append(self._pending.pop(0))
                need -= head.n
            else:
                taken.append(_Rows({h: a[:need] for h, a in head.acts.items()}, head.tokens[:need],
                                   head.mask[:need], head.meta[:need], need))
                self._pending[0] = _Rows({h: a[need:] for h, a in head.acts.items()}, head.tokens[need:],
                                         head.mask[need:], head.meta[need:], head.n - need)
                need = 0
        self._pending_rows -= n
        if len(taken) == 1:
            return taken[0]
        return _Rows({h: torch.cat([r.acts[h] for r in taken]) for h in self.hook_points},
                     torch.cat([r.tokens for r in taken]), torch.cat([r.mask for r in taken]),
                     [m for r in taken for m in r.meta], n)

    def _submit(self, chunk: _Rows) -> None:
        index = self._next_index
        self._next_index += 1
        try:
            meta_bytes = _json_bytes(chunk.meta)  # checked in _validate, cannot fail here
            if self._executor is None:
                self._write_chunk(index, chunk, meta_bytes)
                return
        except BaseException as exc:
            # The chunk's rows are gone from the pending buffer and later chunks could never be
            # committed after the gap: the writer is unusable (the shard stays resumable).
            self._error = exc
            raise
        # Bounded: at most 2 x threads chunks wait, so memory stays bounded when disks are slow.
        while len(self._futures) >= 2 * self.config.write_threads:
            concurrent.futures.wait(list(self._futures), return_when=concurrent.futures.FIRST_COMPLETED)
            self._raise_pending_error()
        self._futures.append(self._executor.submit(self._write_chunk, index, chunk, meta_bytes))

    def _write_chunk(self, index: int, chunk: _Rows, meta_bytes: bytes) -> None:
        """Write every file of chunk ``index`` (any thread), then commit it to the manifest."""
        metadata = {"chunk": str(index), "shard": str(self.shard_index)}
        files: dict[str, dict[str, Any]] = {}
        for hook in self.hook_points:
            parts = safetensors_parts(
                {"activation": chunk.acts[hook], "tokens": chunk.tokens, "mask": chunk.mask},
                metadata={"hook": hook, **metadata}, error=DataError)
            rel = f"{hook}/{chunk_filename(index)}"
            sha, size = _atomic_write_parts(self.shard_dir / rel, parts)
            files[hook] = {"file": rel, "sha256": sha, "bytes": size}
        meta_rel = f"{META_DIR}/{meta_filename(index)}"
        atomic_write_bytes(self.shard_dir / meta_rel, meta_bytes)
        record = {
            "index": index,
            "n_sequences": chunk.n,
            "n_tokens": int(chunk.tokens.numel()),
            "n_unmasked": int(chunk.mask.sum()),
            "files": files,
            "meta_file": meta_rel,
            "meta_sha256": _sha256_hex(meta_bytes),
            "meta_bytes": len(meta_bytes),
            "tokens_sha256": _tokens_sha256(chunk.tokens),
        }
        self._commit(index, record)

    def _commit(self, index: int, record: dict[str, Any]) -> None:
        # Chunks finish out of order with several threads; the manifest only ever lists a
        # contiguous prefix, so "k chunks listed" always means chunks 0..k-1 are complete.
        with self._lock:
            self._ready[index] = record
            advanced = False
            while self._next_commit in self._ready:
                done = self._ready.pop(self._next_commit)
                self._chunks.append(done)
                self._chunk_json.append(json.dumps(done, separators=(",", ":")))
                self._next_commit += 1
                advanced = True
            if advanced:
                self._write_shard_manifest()

    def _write_shard_manifest(self) -> None:
        head = {
            "format": SHARD_FORMAT,
            "version": CACHE_VERSION,
            "shard": self.shard_index,
            "n_shards": self.n_shards,
            "layout": _LAYOUT,
            **self._header(),
            "chunk_sequences": self.config.chunk_sequences,
            "dataset": self._description.get("dataset"),
            "description": self._description,
        }
        # The chunk list grows with every chunk; records are serialised once and spliced in so
        # that each rewrite costs a string join, not a re-encoding of the whole list.
        text = (json.dumps(head, separators=(",", ":"))[:-1] + ',"chunks":[' + ",".join(self._chunk_json)
                + '],"finished":' + ("true" if self._finished else "false") + "}\n")
        atomic_write_bytes(self.shard_dir / MANIFEST, text.encode("utf-8"))

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            raise self._error
        while self._futures and self._futures[0].done():
            exc = self._futures.popleft().exception()
            if exc is not None:
                self._error = exc
                raise exc
        # Later futures may have failed while an earlier one is still running.
        for future in self._futures:
            if future.done() and future.exception() is not None:
                self._error = future.exception()
                raise self._error

    def _drain(self) -> None:
        """Wait for every submitted write; raise the first error."""
        concurrent.futures.wait(list(self._futures))
        self._raise_pending_error()

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Write the last (possibly partial) chunk, wait for every write, mark the shard finished
        and rebuild the top-level manifest. Idempotent (a failed close raises again).

        Raises:
            Exception: a write error (the shard then stays unfinished and resumable).
        """
        if self._closed:
            if self._error is not None:
                raise self._error
            return
        try:
            self._raise_pending_error()
            if self._pending_rows:
                self._submit(self._cut(self._pending_rows))
            self._drain()
        except BaseException:
            self._shutdown()
            raise
        self._shutdown()
        with self._lock:
            self._finished = True
            self._write_shard_manifest()
        rebuild_manifest(self.directory)

    def abort(self) -> None:
        """Stop without finishing: wait for the chunks already submitted (so that the manifest
        lists everything on disk), drop the sequences not yet cut into a chunk, leave the shard
        unfinished and resumable. Write errors are logged, not raised."""
        if self._closed:
            return
        self._pending, self._pending_rows = [], 0
        try:
            self._drain()
        except Exception as exc:  # the caller is already handling an error of its own
            log.warning("activation writer of %s: a chunk write failed while aborting: %s", self.shard_dir, exc,
                        exc_info=True)
        self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.directory)!r}, shard={self.shard_index}/{self.n_shards}, "
                f"chunks={self._next_commit}, finished={self._finished})")


def _read_json_or_conflict(path: Path, what: str, overwrite: bool) -> Any:
    """:func:`_read_json`, except that with ``overwrite`` an unreadable file counts as absent."""
    try:
        return _read_json(path, what)
    except DataError as exc:
        if overwrite:
            return None
        raise DataError(f"{exc}; {_OVERWRITE} to discard the existing data") from exc


def _shard_dirs(directory: Path) -> list[tuple[int, Path]]:
    """``(index, path)`` of every ``shard-XXXX`` directory, by index."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            match = _SHARD_DIR_RE.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def rebuild_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """(Re)build ``<directory>/manifest.json`` from every shard manifest and write it atomically.

    Called by :meth:`ActivationWriter.close`; call it yourself to publish a cache whose writers
    were killed (their completed chunks are listed, the shards marked unfinished).

    Returns:
        The manifest written.

    Raises:
        DataError: no shard manifest exists, one is unreadable, or two shards disagree on hook
            points, dtype, context size, widths, shard count or model.
    """
    directory = Path(directory)
    with _manifest_lock(directory):
        shards: list[dict[str, Any]] = []
        merged: dict[str, Any] | None = None
        merged_from = ""
        for index, shard_dir in _shard_dirs(directory):
            path = shard_dir / MANIFEST
            manifest = _read_json(path, "shard manifest")
            if manifest is None:
                continue
            if not isinstance(manifest, dict) or manifest.get("format") != SHARD_FORMAT:
                raise DataError(f"{path} is not an lmsae shard manifest")
            if merged is None:
                merged, merged_from = manifest, str(path)
            else:
                conflict = _incompatibility(merged, manifest)
                if conflict is not None:
                    field, theirs, mine = conflict
                    raise DataError(f"activation cache {directory}: shards disagree on {field}: {merged_from} has "
                                    f"{mine!r}, {path} has {theirs!r}")
                merged = _merge_headers(merged, manifest)
            chunks = list(manifest.get("chunks") or [])
            shards.append({
                "index": index,
                "dir": shard_dir.name,
                "finished": bool(manifest.get("finished")),
                "n_sequences": sum(int(c["n_sequences"]) for c in chunks),
                "chunks": chunks,
            })
        if merged is None:
            raise DataError(f"{directory} holds no activation-cache shard (no shard-XXXX/manifest.json)")
        all_chunks = [c for s in shards for c in s["chunks"]]
        top = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "model": merged.get("model"),
            "dataset": merged.get("dataset"),
            "description": merged.get("description") or {},
            "hook_points": merged.get("hook_points") or {},
            "dtype": merged.get("dtype"),
            "context_size": merged.get("context_size"),
            "layout": _LAYOUT,
            "n_shards": merged.get("n_shards"),
            "totals": {
                "chunks": len(all_chunks),
                "sequences": sum(int(c["n_sequences"]) for c in all_chunks),
                "tokens": sum(int(c["n_tokens"]) for c in all_chunks),
                "unmasked_tokens": sum(int(c["n_unmasked"]) for c in all_chunks),
                "bytes": sum(int(f["bytes"]) for c in all_chunks for f in c["files"].values())
                + sum(int(c.get("meta_bytes") or 0) for c in all_chunks),
            },
            "shards": shards,
        }
        atomic_write_bytes(directory / MANIFEST, _json_bytes(top, indent=1))
    return top


def _merge_headers(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Header of two compatible shards: known values win over unknown (None) ones."""
    out = dict(a)
    hooks = {h: dict(v or {}) for h, v in (a.get("hook_points") or {}).items()}
    for h, v in (b.get("hook_points") or {}).items():
        if hooks.get(h, {}).get("d") is None and (v or {}).get("d") is not None:
            hooks.setdefault(h, {})["d"] = v["d"]
    out["hook_points"] = hooks
    for key in ("context_size", "model", "dataset"):
        if out.get(key) is None:
            out[key] = b.get(key)
    return out


def build_activation_writer(config: ActivationWriterConfig, directory: str | os.PathLike[str], *,
                            hook_points: Sequence[str], shard_index: int = 0, n_shards: int = 1,
                            description: Mapping[str, Any] | None = None,
                            overwrite: bool = False) -> ActivationWriter:
    """Writer factory registered under ``format = "safetensors"``: ``factory(config, directory, ...)``."""
    return ActivationWriter(directory, hook_points, config, shard_index=shard_index, n_shards=n_shards,
                            description=description, overwrite=overwrite)


WRITER_SPEC = WriterSpec(config_class=ActivationWriterConfig, factory=build_activation_writer,
                         summary="sharded safetensors activation cache with manifests, checksums and resume")


# =============================================================================================
# Reader


class CacheFileError(DataError):
    """A file of the cache is missing, truncated, corrupt or inconsistent.

    ``file`` is its path, ``hook`` the hook point it belongs to (``None`` for meta and
    manifest files) and ``problem`` what is wrong."""

    def __init__(self, file: str | os.PathLike[str], hook: str | None, problem: str):
        self.file = str(file)
        self.hook = hook
        self.problem = problem
        where = f"{self.file} (hook {hook!r})" if hook is not None else self.file
        super().__init__(f"activation cache file {where}: {problem}")


@attrs.frozen
class ChunkRef:
    """One chunk of the cache: its shard, its index in the shard, and its manifest record."""

    shard: int
    index: int
    shard_dir: Path
    record: Mapping[str, Any] = attrs.field(eq=False, repr=False)

    @property
    def n_sequences(self) -> int:
        return int(self.record["n_sequences"])

    def path(self, hook: str) -> Path:
        """Path of this chunk's file for ``hook``."""
        return self.shard_dir / self.record["files"][hook]["file"]

    @property
    def meta_path(self) -> Path:
        return self.shard_dir / self.record["meta_file"]


def _record_problem(record: Any, position: int, hooks: Sequence[str]) -> str | None:
    """Why a chunk record of the manifest is unusable, or None. File names must be exactly the
    ones the writer uses, so a manifest cannot point readers outside the cache."""
    if not isinstance(record, dict):
        return "the record is not an object"
    if record.get("index") != position:
        return f"index is {record.get('index')!r}, expected {position} (chunks must be contiguous)"
    for key in ("n_sequences", "n_tokens", "n_unmasked"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{key} must be an int >= 0, got {value!r}"
    files = record.get("files")
    if not isinstance(files, dict):
        return "'files' is not an object"
    for hook in hooks:
        info = files.get(hook)
        if not isinstance(info, dict):
            return f"no file entry for hook {hook!r}"
        if info.get("file") != f"{hook}/{chunk_filename(position)}":
            return f"file of hook {hook!r} is {info.get('file')!r}, expected {hook}/{chunk_filename(position)}"
        if isinstance(info.get("bytes"), bool) or not isinstance(info.get("bytes"), int):
            return f"bytes of hook {hook!r} must be an int, got {info.get('bytes')!r}"
        if not isinstance(info.get("sha256"), str):
            return f"sha256 of hook {hook!r} must be a string, got {info.get('sha256')!r}"
    if record.get("meta_file") != f"{META_DIR}/{meta_filename(position)}":
        return f"meta_file is {record.get('meta_file')!r}, expected {META_DIR}/{meta_filename(position)}"
    return None


def _check_verify(verify: str) -> None:
    if verify not in _VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(map(repr, _VERIFY_MODES))}, got {verify!r}")


class ActivationCache:
    """An opened cache: the top-level manifest, and reading of verified chunks.

    Raises:
        DataError: the manifest is missing, unreadable, of another format or of a newer version.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        manifest = _read_json(path, "activation cache manifest")
        if manifest is None:
            hint = ""
            if _shard_dirs(self.directory):
                hint = (" (shard directories exist: a writer did not close; finish the generation, or "
                        "publish the chunks written so far with lmsae.activations.cache.rebuild_manifest)")
            elif not self.directory.is_dir():
                hint = " (the directory does not exist)"
            raise DataError(f"activation cache {self.directory}: missing manifest {path}{hint}")
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
            raise DataError(f"{path} is not an lmsae activation cache manifest (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r})")
        version = manifest.get("version")
        if not isinstance(version, int) or version > CACHE_VERSION:
            raise DataError(f"{path} has unsupported version {version!r} (this lmsae reads up to {CACHE_VERSION})")
        try:
            self.hook_points: tuple[str, ...] = tuple(manifest["hook_points"])
            self.dims: dict[str, int | None] = {h: v.get("d") for h, v in manifest["hook_points"].items()}
            self.dtype_name: str = manifest["dtype"]
            self.storage_dtype = STORAGE_DTYPES[self.dtype_name]
            self.context_size: int | None = manifest["context_size"]
            self.n_shards: int = int(manifest["n_shards"])
            self.shards: list[dict[str, Any]] = list(manifest["shards"])
            for shard in self.shards:
                if not isinstance(shard["dir"], str) or not isinstance(shard["chunks"], list):
                    raise TypeError(f"shard entry {shard.get('index')!r} needs a 'dir' string and a 'chunks' list")
                int(shard["index"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{path} is malformed: missing or invalid entry ({exc!r})") from exc
        for shard in self.shards:
            for position, record in enumerate(shard["chunks"]):
                problem = _record_problem(record, position, self.hook_points)
                if problem:
                    raise DataError(f"{path} is malformed: chunk {position} of shard {shard['index']}: {problem}")
        self.manifest = manifest

    @property
    def shard_indices(self) -> list[int]:
        return [int(s["index"]) for s in self.shards]

    def unfinished_shards(self) -> list[int]:
        """Shards listed as not finished (their writer is running, or was killed)."""
        return [int(s["index"]) for s in self.shards if not s.get("finished")]

    def missing_shards(self) -> list[int]:
        """Shard indices below ``n_shards`` that have no data at all."""
        present = set(self.shard_indices)
        return [i for i in range(self.n_shards) if i not in present]

    def chunks(self, shards: Sequence[int] | None = None) -> list[ChunkRef]:
        """The global chunk order: shards by ascending index (all, or those in ``shards``),
        chunks in index order within a shard.

        Raises:
            DataError: a requested shard is not in the cache.
        """
        by_index = {int(s["index"]): s for s in self.shards}
        if shards is None:
            wanted = sorted(by_index)
        else:
            unknown = [i for i in shards if i not in by_index]
            if unknown:
                raise DataError(f"activation cache {self.directory} has no shard(s) {unknown}; it holds "
                                f"{sorted(by_index)}")
            wanted = sorted(set(shards))
        out = []
        for i in wanted:
            shard = by_index[i]
            shard_dir = self.directory / shard["dir"]
            out.extend(ChunkRef(i, int(c["index"]), shard_dir, c) for c in shard["chunks"])
        return out

    def check_hooks(self, hooks: Sequence[str]) -> tuple[str, ...]:
        """``hooks`` (all cached hook points when empty); :class:`DataError` for one not cached."""
        if not hooks:
            return self.hook_points
        missing = [h for h in hooks if h not in self.hook_points]
        if missing:
            raise DataError(f"activation cache {self.directory} has no hook point(s) "
                            f"{', '.join(map(repr, missing))}; it holds {', '.join(map(repr, self.hook_points))}")
        return tuple(hooks)

    # ------------------------------------------------------------------ reading one chunk

    def read_file(self, ref: ChunkRef, hook: str, verify: Verify = "size") -> dict[str, Tensor]:
        """The tensors of ``ref``'s file for ``hook``, verified (storage dtype, not cast).

        Returns ``{"activation": (S, T, d), "tokens": (S, T) int64, "mask": (S, T) bool}``.

        Raises:
            CacheFileError: missing, size or checksum mismatch, unparsable, or tensors that do
                not match the manifest.
        """
        info = ref.record["files"].get(hook)
        if info is None:
            raise CacheFileError(ref.shard_dir / "manifest.json", hook,
                                 f"chunk {ref.index} lists no file for this hook")
        path = ref.shard_dir / info["file"]
        data = _read_verified(path, hook, int(info["bytes"]), info.get("sha256"), verify)
        try:
            tensors, metadata = _parse_safetensors(data)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # JSON/Unicode errors are ValueErrors
            raise CacheFileError(path, hook, f"not a valid safetensors file (corrupt header or data): {exc}") from exc
        expected_meta = {"hook": hook, "chunk": str(ref.index), "shard": str(ref.shard)}
        found_meta = {k: metadata.get(k) for k in expected_meta}
        if found_meta != expected_meta:
            raise CacheFileError(path, hook, f"the file's metadata says {found_meta}, expected {expected_meta} "
                                 "(file copied to the wrong place?)")
        s, t, d = ref.n_sequences, self.context_size, self.dims.get(hook)
        expect = {"activation": ((s, t, d), self.storage_dtype), "tokens": ((s, t), torch.int64),
                  "mask": ((s, t), torch.bool)}
        for key, (shape, dtype) in expect.items():
            x = tensors.get(key)
            if x is None:
                raise CacheFileError(path, hook, f"has no tensor {key!r} (tensors: {sorted(tensors)})")
            if tuple(x.shape) != shape or x.dtype != dtype:
                raise CacheFileError(path, hook, f"tensor {key!r} is {str(x.dtype).removeprefix('torch.')} "
                                     f"{tuple(x.shape)}, the manifest expects {str(dtype).removeprefix('torch.')} "
                                     f"{shape}")
        return tensors

    def read_meta(self, ref: ChunkRef, verify: Verify = "size") -> list[Any]:
        """The per-sequence meta list of ``ref`` (verified like the tensor files)."""
        path = ref.meta_path
        data = _read_verified(path, None, ref.record.get("meta_bytes"), ref.record.get("meta_sha256"), verify)
        try:
            meta = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CacheFileError(path, None, f"not valid JSON: {exc}") from exc
        if not isinstance(meta, list) or len(meta) != ref.n_sequences:
            n = len(meta) if isinstance(meta, list) else type(meta).__name__
            raise CacheFileError(path, None, f"expected a list of {ref.n_sequences} per-sequence entries, got {n}")
        return meta

    def read_chunk(self, ref: ChunkRef, hooks: Sequence[str], verify: Verify = "size") -> dict[str, Any]:
        """Chunk ``ref`` as a batch: ``{hook: (S, T, d) float32, "tokens": (S, T) int64,
        "mask": (S, T) bool, "meta": list of S}``.

        Raises:
            CacheFileError: any check of :meth:`read_file` or :meth:`read_meta` fails, or the
                hook files disagree on tokens or mask.
        """
        _check_verify(verify)
        out: dict[str, Any] = {}
        first: tuple[str, dict[str, Tensor]] | None = None
        for hook in hooks:
            tensors = self.read_file(ref, hook, verify)
            if first is None:
                first = (hook, tensors)
            else:
                _compare_tokens(ref, first, (hook, tensors))
            out[hook] = tensors["activation"].to(torch.float32)
        if first is None:
            raise ValueError("read_chunk needs at least one hook point")
        base = first[1]
        if verify == "sha256" and ref.record.get("tokens_sha256") not in (None, _tokens_sha256(base["tokens"])):
            raise CacheFileError(ref.path(first[0]), first[0], "tokens do not match the manifest's tokens_sha256")
        out["tokens"] = base["tokens"]
        out["mask"] = base["mask"]
        out["meta"] = self.read_meta(ref, verify)
        return out


def _read_verified(path: Path, hook: str | None, expected_bytes: int | None, expected_sha: str | None,
                   verify: str) -> bytearray:
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if verify != "none" and expected_bytes is not None and size != int(expected_bytes):
                raise CacheFileError(path, hook, f"size mismatch: the manifest records {int(expected_bytes)} bytes, "
                                     f"the file has {size} (truncated or overwritten)")
            # Straight into a writable buffer that the tensors then share (no second copy).
            data = bytearray(size)
            view, got = memoryview(data), 0
            while got < size:
                k = f.readinto(view[got:])
                if not k:
                    raise CacheFileError(path, hook, f"the file shrank to {got} bytes while being read")
                got += k
    except FileNotFoundError:
        raise CacheFileError(path, hook, "missing file") from None
    except IsADirectoryError:
        raise CacheFileError(path, hook, "is a directory, expected a file") from None
    except OSError as exc:
        raise CacheFileError(path, hook, f"unreadable: {exc}") from exc
    if verify == "sha256" and expected_sha is not None:
        digest = _sha256_hex(data)
        if digest != expected_sha:
            raise CacheFileError(path, hook, f"checksum mismatch: sha256 {digest[:16]}..., the manifest records "
                                 f"{str(expected_sha)[:16]}... (corrupted file)")
    return data


def _compare_tokens(ref: ChunkRef, a: tuple[str, dict[str, Tensor]], b: tuple[str, dict[str, Tensor]]) -> None:
    for key in ("tokens", "mask"):
        if not torch.equal(a[1][key], b[1][key]):
            raise CacheFileError(
                ref.path(b[0]), b[0],
                f"{key} differ from those of hook {a[0]!r} in {ref.path(a[0])} (chunk {ref.index} of shard "
                f"{ref.shard}); the hook files of one chunk must hold the same sequences")


# =============================================================================================
# Checks and description


@attrs.frozen
class CacheProblem:
    """One problem found by :func:`check_cache`: the file, its hook (None for meta/manifest), what."""

    file: str
    hook: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file} (hook {self.hook!r})" if self.hook is not None else self.file
        return f"{where}: {self.message}"


@attrs.define
class CacheReport:
    """The result of :func:`check_cache`. The counts cover the chunks listed in the manifest."""

    directory: str
    verify: str
    n_shards: int = 0
    n_chunks: int = 0
    n_sequences: int = 0
    n_tokens: int = 0
    n_unmasked: int = 0
    n_bytes: int = 0
    problems: list[CacheProblem] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: counts and the number of problems."""
        status = "ok" if self.ok else f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        return (f"{self.directory}: {self.n_shards} shard(s), {self.n_chunks} chunks, {self.n_sequences} sequences, "
                f"{self.n_tokens} tokens ({self.n_unmasked} unmasked), {self.n_bytes / 1e6:.1f} MB, "
                f"verify={self.verify}: {status}")


def check_cache(directory: str | os.PathLike[str], *, verify: Verify = "sha256", progress: bool = True) -> CacheReport:
    """Run every check on every chunk and hook file of the cache and collect all problems.

    Checks: the manifest (present, readable, this format); shards (all ``n_shards`` present and
    finished); per chunk and hook: the file exists, its size and (``verify="sha256"``) checksum
    match, it parses, its tensors have the recorded shapes/dtypes and metadata, tokens and mask
    agree across hooks and with ``tokens_sha256``, the record's token counts are right; the meta
    file; the manifest totals.

    Returns:
        A :class:`CacheReport`; ``report.ok`` when no problem was found. Nothing is raised for
        problems in the cache itself.
    """
    _check_verify(verify)
    from tqdm.auto import tqdm

    directory = Path(directory)
    report = CacheReport(directory=str(directory), verify=verify)
    problems = report.problems
    try:
        cache = ActivationCache(directory)
    except DataError as exc:
        problems.append(CacheProblem(str(directory / MANIFEST), None, str(exc)))
        return report
    report.n_shards = len(cache.shards)
    manifest_path = str(directory / MANIFEST)
    for i in cache.missing_shards():
        problems.append(CacheProblem(str(directory / shard_dirname(i)), None,
                                     f"shard {i} of {cache.n_shards} is missing (never written)"))
    for i in cache.unfinished_shards():
        problems.append(CacheProblem(str(directory / shard_dirname(i)), None,
                                     f"shard {i} is not finished (writer still running, or killed: rerun it to "
                                     "resume)"))
    try:
        refs = cache.chunks()
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(CacheProblem(manifest_path, None, f"malformed chunk list: {exc!r}"))
        return report

    bar = tqdm(refs, desc="checking chunks", unit="chunk", disable=not progress, dynamic_ncols=True)
    for ref in bar:
        try:
            _check_chunk(cache, ref, verify, report)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            problems.append(CacheProblem(str(ref.shard_dir / MANIFEST), None,
                                         f"malformed record of chunk {ref.index}: {exc!r}"))
    bar.close()

    totals = cache.manifest.get("totals") or {}
    counted = {"chunks": report.n_chunks, "sequences": report.n_sequences, "tokens": report.n_tokens,
               "unmasked_tokens": report.n_unmasked}
    for key, value in counted.items():
        if totals.get(key) != value:
            problems.append(CacheProblem(manifest_path, None, f"totals.{key} is {totals.get(key)!r} but the chunk "
                                         f"records add up to {value}"))
    return report


def _check_chunk(cache: ActivationCache, ref: ChunkRef, verify: Verify, report: CacheReport) -> None:
    problems = report.problems
    record = ref.record
    report.n_chunks += 1
    report.n_sequences += int(record["n_sequences"])
    report.n_tokens += int(record["n_tokens"])
    report.n_unmasked += int(record["n_unmasked"])
    report.n_bytes += sum(int(f["bytes"]) for f in record["files"].values()) + int(record.get("meta_bytes") or 0)
    loaded: list[tuple[str, dict[str, Tensor]]] = []
    for hook in cache.hook_points:
        try:
            loaded.append((hook, cache.read_file(ref, hook, verify)))
        except CacheFileError as exc:
            problems.append(CacheProblem(exc.file, exc.hook, exc.problem))
    for other in loaded[1:]:
        try:
            _compare_tokens(ref, loaded[0], other)
        except CacheFileError as exc:
            problems.append(CacheProblem(exc.file, exc.hook, exc.problem))
    if loaded:
        hook, tensors = loaded[0]
        path = str(ref.path(hook))
        if verify == "sha256" and record.get("tokens_sha256") not in (None, _tokens_sha256(tensors["tokens"])):
            problems.append(CacheProblem(path, hook, "tokens do not match the manifest's tokens_sha256"))
        if int(record["n_tokens"]) != tensors["tokens"].numel():
            problems.append(CacheProblem(path, hook, f"the manifest records n_tokens={record['n_tokens']}, the file "
                                         f"holds {tensors['tokens'].numel()}"))
        if int(record["n_unmasked"]) != int(tensors["mask"].sum()):
            problems.append(CacheProblem(path, hook, f"the manifest records n_unmasked={record['n_unmasked']}, "
                                         f"the mask has {int(tensors['mask'].sum())}"))
    try:
        cache.read_meta(ref, verify)
    except CacheFileError as exc:
        problems.append(CacheProblem(exc.file, exc.hook, exc.problem))


def describe_cache(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary of the cache for printing (no file is read besides the manifest).

    Keys: ``path``, ``format``, ``version``, ``model``, ``dataset``, ``layout``, ``context_size``,
    ``dtype``, ``hook_points`` ({hook: {d, dtype}}), ``n_shards``, ``shards`` (indices present),
    ``unfinished_shards``, ``missing_shards``, ``chunks``, ``sequences``, ``tokens``,
    ``unmasked_tokens``, ``bytes``.

    Raises:
        DataError: the manifest is missing or invalid.
    """
    cache = ActivationCache(directory)
    m = cache.manifest
    totals = m.get("totals") or {}
    return {
        "path": str(cache.directory),
        "format": m["format"],
        "version": m["version"],
        "model": m.get("model"),
        "dataset": m.get("dataset"),
        "layout": m.get("layout", _LAYOUT),
        "context_size": cache.context_size,
        "dtype": cache.dtype_name,
        "hook_points": {h: dict(v) for h, v in m["hook_points"].items()},
        "n_shards": cache.n_shards,
        "shards": cache.shard_indices,
        "unfinished_shards": cache.unfinished_shards(),
        "missing_shards": cache.missing_shards(),
        "chunks": totals.get("chunks"),
        "sequences": totals.get("sequences"),
        "tokens": totals.get("tokens"),
        "unmasked_tokens": totals.get("unmasked_tokens"),
        "bytes": totals.get("bytes"),
    }
