"""Saving and loading trained dictionaries.

A dictionary is a directory holding ``config.json`` (the architecture config, tag included,
normalisation state included) and ``sae_weights.safetensors``. Both are written into a temporary
sibling directory that then replaces the target, so a reader never sees a config that disagrees
with its weights, and a failed save leaves the previous dictionary intact.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmsae import __version__, safetensors_io
from lmsae.config.base import DictionaryConfig
from lmsae.config.fields import config_class, option
from lmsae.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from lmsae.dictionary.base import SparseDictionary
    from lmsae.registry import Registry

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the persistent state (parameters and persistent buffers)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` and ``metadata`` to the safetensors file ``path``: the same bytes for equal
    inputs (:mod:`lmsae.safetensors_io`; ``safetensors.torch.save_file`` orders the metadata
    differently from call to call)."""
    safetensors_io.write_safetensors(path, tensors, metadata, error=CheckpointError)


def write_directory_atomically(directory: str | os.PathLike, files: dict[str, bytes | Any]) -> pathlib.Path:
    """Write ``files`` (name -> bytes, or name -> callable(path) that writes the file) into
    ``directory``, replacing it as a whole.

    Files already in ``directory`` that are not being written are carried over, so unrelated
    content (e.g. ``checkpoints/``) survives.
    """
    target = pathlib.Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for name, content in files.items():
            path = tmp / name
            if callable(content):
                content(path)
            else:
                path.write_bytes(content)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            for child in target.iterdir():
                if child.name not in files:
                    os.replace(child, tmp / child.name)
            backup = target.with_name(f".{target.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_dictionary(model: SparseDictionary, directory: str | os.PathLike, registry: Registry,
                    *, metadata: dict[str, str] | None = None) -> pathlib.Path:
    """Save ``model`` to ``directory`` (``config.json`` + ``sae_weights.safetensors``), atomically."""
    config_data = registry.unstructure(model.config)
    tensors = state_tensors(model)
    meta = {"format": "lmsae-dictionary", "lmsae_version": __version__, "architecture": model.config.name,
            **(metadata or {})}
    return write_directory_atomically(directory, {
        CONFIG_FILE: (json.dumps(config_data, indent=2) + "\n").encode("utf-8"),
        WEIGHTS_FILE: lambda p: write_safetensors(p, tensors, meta),
    })


def read_dictionary_config(directory: str | os.PathLike, registry: Registry) -> DictionaryConfig:
    """The architecture config stored in a dictionary directory."""
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (is {directory} a saved lmsae dictionary?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    try:
        return registry.structure(data, DictionaryConfig, source=str(path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def load_dictionary(directory: str | os.PathLike, registry: Registry, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, strict: bool = True,
                    fold_normalization: bool = False, config: DictionaryConfig | None = None) -> SparseDictionary:
    """Load a saved dictionary.

    - ``strict``: every tensor of the model must be in the file and vice versa.
    - ``fold_normalization``: fold dataset-wise normalisation into the weights after loading.
    - ``config``: use this config instead of the stored one (e.g. to change k of a TopK).
    """
    directory = pathlib.Path(directory)
    cfg = config if config is not None else read_dictionary_config(directory, registry)
    spec = registry.architecture(cfg.name)
    model = spec.model_class(cfg)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from None
    if dtype is None:
        # keep the stored precision (a float64 dictionary must not come back as float32)
        stored = {v.dtype for v in tensors.values() if v.is_floating_point()}
        if len(stored) == 1:
            model.to(dtype=stored.pop())
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{path}: weights do not match the {cfg.name!r} config: missing {missing}, "
                              f"unexpected {unexpected}")
    for key, value in tensors.items():
        if key in expected and expected[key].shape != value.shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}, the config implies "
                                  f"{tuple(expected[key].shape)}")
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=strict)
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    if fold_normalization:
        model.fold_normalization()
    return model


@config_class
class PretrainedConfig:
    """A saved dictionary to start from (``[pretrained]`` table): continue training, evaluate, analyse."""

    path: pathlib.Path = option(doc="Directory holding config.json and sae_weights.safetensors.")
    fold_normalization: bool = option(False, doc="Fold dataset-wise normalisation into the weights after loading.")
    strict: bool = option(True, doc="Every tensor of the model must be in the file and vice versa.")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] | None = option(
        None, doc="Cast the parameters to this dtype (None: as stored).")

    def load(self, registry: Registry, device: str | torch.device = "cpu") -> SparseDictionary:
        """Load the dictionary this config points at."""
        if not self.path.is_dir():
            raise CheckpointError(f"pretrained.path {self.path} is not a directory")
        dtype = getattr(torch, self.dtype) if self.dtype else None
        return load_dictionary(self.path, registry, device=device, dtype=dtype, strict=self.strict,
                               fold_normalization=self.fold_normalization)
