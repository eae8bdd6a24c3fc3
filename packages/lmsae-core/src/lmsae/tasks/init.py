"""``task = "init"``: build a freshly initialised dictionary from its config and save it.

Useful to check a config (shapes, parameter count) and as the starting point of experiments that
edit weights by hand before training.
"""

from __future__ import annotations

import pathlib
from typing import ClassVar

import torch

from lmsae.config import DictionaryConfig, RunConfig, config_class, option
from lmsae.dictionary.io import save_dictionary
from lmsae.errors import LmsaeError
from lmsae.records import TaskSpec
from lmsae.runtime import RunContext


@config_class
class InitRunConfig(RunConfig):
    """Initialise a dictionary and save it, untrained."""

    name: ClassVar[str] = "init"

    dictionary: DictionaryConfig = option(doc="The dictionary to build (its [dictionary] table).")
    output_dir: pathlib.Path = option(doc="Directory to write config.json and sae_weights.safetensors to.")
    seed: int = option(0, doc="Seed of the parameter initialisation.")
    overwrite: bool = option(False, doc="Replace output_dir if it already holds a dictionary.")


def run(config: InitRunConfig, context: RunContext) -> pathlib.Path:
    out = config.output_dir
    if (out / "config.json").exists() and not config.overwrite:
        raise LmsaeError(f"{out} already holds a dictionary; set overwrite = true to replace it")
    spec = context.registry.architecture(config.dictionary.name)
    model = spec.model_class(config.dictionary)
    model.reset_parameters(generator=torch.Generator().manual_seed(config.seed))
    path = save_dictionary(model, out, context.registry)
    context.echo(f"initialised {config.dictionary.name!r} dictionary: {config.dictionary.n_features} features, "
                 f"{model.parameter_count():,} parameters -> {path}")
    return path


def example(registry, architecture: str | None = None) -> InitRunConfig:
    names = registry.names("architecture")
    if not names:
        raise LmsaeError("no architecture is installed; install lmsae-core with its built-ins or a plugin")
    arch = architecture or ("sae" if "sae" in names else names[0])
    return InitRunConfig(dictionary=registry.architecture(arch).example_config(),
                         output_dir=pathlib.Path("runs/init"))


SPEC = TaskSpec(config_class=InitRunConfig, factory=run, example=example,
                summary="build a freshly initialised dictionary and save it")
