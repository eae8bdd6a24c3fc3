"""Built-in text corpora that need no download.

``builtin:python-docs`` is Python's own documentation: every topic of the language reference
shipped in ``pydoc_data.topics`` followed by the docstrings of the standard library (one
document per module docstring, per class with its methods, and per function), several MB of
English technical prose.

The corpus is built once per Python version and cached as JSONL (one ``{"text", "source"}``
object per line) in the lmsae cache directory (``$LMSAE_CACHE_DIR``, else ``~/.cache/lmsae``);
later loads only read the file. The build runs in a separate, isolated interpreter
(``python -S -s -P``, fixed hash seed, no site-packages) because importing the whole standard
library has side effects (printing, registering handlers, deprecation warnings) that must not
leak into the caller, and because isolation makes the content depend only on the Python
installation, so it is the same on every build.

This module imports only the standard library at top level: the isolated builder loads it by
file path, without lmsae on its ``sys.path``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

__all__ = [
    "BUILTIN_CORPORA",
    "builtin_corpus_document_count",
    "builtin_corpus_path",
    "cache_dir",
    "read_corpus",
]

#: names accepted after ``builtin:`` in ``DatasetConfig.path``
BUILTIN_CORPORA = ("python-docs",)

# Bump when the document layout changes, so stale caches are not reused.
_FORMAT_VERSION = 1

# Top-level modules never imported: side effects on import (antigravity opens a browser, this
# prints, lib2to3 writes grammar caches), GUI toolkits, the test suite, or modules that are
# deprecated shims whose content depends on site-packages (distutils vs setuptools' copy).
_SKIP_TOP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "distutils", "ensurepip", "readline", "pydoc_data", "encodings", "msilib", "winreg",
    "winsound", "msvcrt", "nt", "xxsubtype", "xxlimited", "xxlimited_35",
})
# Submodule names never imported (test packages, entry points that run on import).
_SKIP_SUB = frozenset({"test", "tests", "idle_test", "__main__"})

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# Special methods kept in class documents (other dunders carry boilerplate slot docstrings).
_KEPT_DUNDERS = frozenset({"__init__", "__new__", "__call__"})

_BUILD_TIMEOUT_S = 1800
# Default values longer than this are shown as "..." in signatures.
_MAX_DEFAULT_CHARS = 60
# (the interpreter's own directory too: in a virtual environment it lies outside sys.prefix under -S)
_INSTALL_PREFIXES = tuple(sorted({p for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                              os.path.dirname(os.path.dirname(sys.executable or ""))) if p}))


def cache_dir() -> pathlib.Path:
    """The lmsae cache directory: ``$LMSAE_CACHE_DIR`` or ``~/.cache/lmsae`` (not created)."""
    env = os.environ.get("LMSAE_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "lmsae"


def _corpus_file_name() -> str:
    v = sys.version_info
    return f"python-docs-{sys.implementation.name}{v.major}.{v.minor}.{v.micro}-v{_FORMAT_VERSION}.jsonl"


def builtin_corpus_path(cache: str | os.PathLike[str] | None = None, *, rebuild: bool = False) -> pathlib.Path:
    """Path of the ``builtin:python-docs`` JSONL file, building it first if it is not cached.

    Args:
        cache: cache directory (default :func:`cache_dir`); the file goes to ``<cache>/corpora/``.
        rebuild: build again even if a cached file exists.

    Raises:
        DataError: the isolated build failed (its error output is included).
    """
    directory = pathlib.Path(cache).expanduser() if cache is not None else cache_dir()
    directory = directory / "corpora"
    path = directory / _corpus_file_name()
    if path.is_file() and not rebuild:
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from lmsae.errors import DataError

        raise DataError(f"cannot create the corpus cache directory {str(directory)!r} ({e}); "
                        "set LMSAE_CACHE_DIR to a writable directory") from e
    # Several processes (data-parallel ranks) may ask at once: the first builds, the others wait
    # on the lock and then find the file.
    with _file_lock(directory / (path.name + ".lock")):
        if path.is_file() and not rebuild:
            return path
        _build_isolated(path)
    return path


def builtin_corpus_document_count(cache: str | os.PathLike[str] | None = None) -> int:
    """Number of documents in ``builtin:python-docs`` (builds it if needed)."""
    path = builtin_corpus_path(cache)
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def read_corpus(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Columns ``{"text": [...], "source": [...]}`` of a corpus JSONL file."""
    texts: list[str] = []
    sources: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            texts.append(record["text"])
            sources.append(record["source"])
    return {"text": texts, "source": sources}


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): concurrent builds are still safe, just wasteful
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_BUILDER = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_lmsae_corpus_builder', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module._write_corpus(sys.argv[2])\n"
)


def _build_isolated(path: pathlib.Path) -> None:
    """Build the corpus in a fresh interpreter and move it into place atomically."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # A bare environment: some defaults are read from it at import time (cgi's environ=os.environ),
    # and neither the machine's variables nor its secrets may end up in the corpus.
    env = {"PYTHONHASHSEED": "0", "PATH": os.defpath}  # fixed hash seed: some docstrings come from sets
    if "SYSTEMROOT" in os.environ:  # Windows needs it to start an interpreter
        env["SYSTEMROOT"] = os.environ["SYSTEMROOT"]
    from lmsae.errors import DataError

    try:
        with tempfile.TemporaryDirectory() as cwd:  # nothing in the working directory can shadow a module
            proc = subprocess.run(
                [sys.executable, "-S", "-s", "-P", "-X", "utf8", "-c", _BUILDER, os.path.abspath(__file__), tmp],
                check=False, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=_BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise DataError(f"building the built-in corpus 'python-docs' failed (exit {proc.returncode}): {tail}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except subprocess.TimeoutExpired as e:
        raise DataError(f"building the built-in corpus 'python-docs' took more than {_BUILD_TIMEOUT_S} s") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- the build (runs inside the isolated interpreter) ---------------------------------------


def _write_corpus(out: str) -> None:
    """Write every document as one JSON line to ``out`` (fsynced)."""
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        for source, text in _documents():
            f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _documents() -> Iterator[tuple[str, str]]:
    """``(source, text)`` of every document, in a fixed order, without duplicates or empty texts."""
    seen: set[str] = set()

    def fresh(key: str) -> bool:
        if not key or key in seen:
            return False
        seen.add(key)
        return True

    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = _clean(topics[name])
        if text and fresh(text):
            yield f"topic:{name}", text

    for modname, module in _stdlib_modules():
        for source, text, key in _module_documents(modname, module):
            if fresh(key):
                yield source, text


def _clean(doc: Any) -> str | None:
    """A docstring dedented and stripped, without memory addresses; None if empty or not text."""
    if not isinstance(doc, str):
        return None
    text = _ADDRESS.sub("", inspect.cleandoc(doc)).strip()
    # a few docstrings hold lone surrogates, which JSON-in-UTF-8 cannot carry
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text or None


def _private(name: str) -> bool:
    return name.startswith("_")


def _private_module(name: str) -> bool:
    return any(part.startswith("_") for part in name.split("."))


def _safe_import(name: str) -> Any:
    """Import ``name`` with warnings and output silenced; None if it fails in any way."""
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit):  # platform-specific or broken optional modules
        return None


def _stdlib_modules() -> Iterator[tuple[str, Any]]:
    """Public standard-library modules and their public submodules, depth first, sorted by name."""
    for name in sorted(sys.stdlib_module_names):
        if _private(name) or name in _SKIP_TOP:
            continue
        module = _safe_import(name)
        if module is not None:
            yield from _walk(name, module)


def _walk(name: str, module: Any) -> Iterator[tuple[str, Any]]:
    yield name, module
    path = getattr(module, "__path__", None)
    if not path:
        return
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if _private(info.name) or info.name in _SKIP_SUB or info.name.startswith("test_"):
            continue
        full = f"{name}.{info.name}"
        sub = _safe_import(full)
        if sub is not None:
            yield from _walk(full, sub)


class _Elided:
    def __repr__(self) -> str:
        return "..."


def _signature(obj: Any) -> str:
    """``(a, b=1, c=...)``: long or multi-line default values (objects, module state) are elided."""
    try:
        sig = inspect.signature(obj)
        params = []
        for p in sig.parameters.values():
            if p.default is not p.empty:
                text = repr(p.default)
                # installation paths (pydoc's basedir) would make the text differ between machines
                local = isinstance(p.default, str) and p.default.startswith(_INSTALL_PREFIXES)
                if local or len(text) > _MAX_DEFAULT_CHARS or "\n" in text or " at 0x" in text:
                    p = p.replace(default=_Elided())
            params.append(p)
        text = str(sig.replace(parameters=params))
    except Exception:  # no signature, or a text signature naming things that do not exist
        return ""
    return _ADDRESS.sub("", text)


def _module_documents(modname: str, module: Any) -> Iterator[tuple[str, str, str]]:
    """``(source, text, dedupe key)`` of a module's docstring and its own classes and functions."""
    doc = _clean(getattr(module, "__doc__", None))
    if doc:
        yield f"module:{modname}", f"Module {modname}\n\n{doc}", doc
    try:
        members = sorted(vars(module).items())
    except TypeError:
        return
    for name, obj in members:
        # Objects defined here, or in a private module (C accelerators such as _io or _functools)
        # whose public face this is; other re-exports are documented where they are defined.
        owner = getattr(obj, "__module__", None)
        if _private(name) or not isinstance(owner, str) or (owner != modname and not _private_module(owner)):
            continue
        if inspect.isclass(obj):
            item = _class_document(modname, name, obj)
        elif inspect.isroutine(obj):
            item = _function_document(modname, name, obj)
        else:
            continue
        if item is not None:
            yield item


def _function_document(modname: str, name: str, obj: Any) -> tuple[str, str, str] | None:
    doc = _clean(getattr(obj, "__doc__", None))
    if not doc:
        return None
    return f"function:{modname}.{name}", f"{modname}.{name}{_signature(obj)}\n\n{doc}", doc


def _class_document(modname: str, name: str, cls: type) -> tuple[str, str, str] | None:
    parts: list[str] = []
    class_doc = _clean(cls.__dict__.get("__doc__"))
    if class_doc:
        parts.append(class_doc)
    for attr, raw in sorted(cls.__dict__.items()):
        is_dunder = attr.startswith("__") and attr.endswith("__")
        if (is_dunder and attr not in _KEPT_DUNDERS) or (not is_dunder and _private(attr)):
            continue
        target = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        if not (inspect.isroutine(target) or isinstance(target, property)):
            continue
        doc = _clean(getattr(target, "__doc__", None))
        if not doc:
            continue
        # slot wrappers inherit boilerplate such as "Initialize self.  See help(type(self))..."
        if doc == _clean(getattr(getattr(object, attr, None), "__doc__", None)):
            continue
        sig = "" if isinstance(target, property) else _signature(target)
        parts.append(f"{name}.{attr}{sig}\n" + "\n".join(f"    {line}" if line else "" for line in doc.splitlines()))
    if not parts:
        return None
    body = "\n\n".join(parts)
    bases = ", ".join(b.__qualname__ for b in cls.__bases__ if b is not object)
    head = f"class {modname}.{name}" + (f"({bases})" if bases else "")
    return f"class:{modname}.{name}", f"{head}\n\n{body}", body
