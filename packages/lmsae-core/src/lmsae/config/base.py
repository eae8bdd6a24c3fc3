"""Base classes of the configuration kinds that plugins extend.

Each kind of pluggable component has one base config class. A concrete config class sets the
class variable ``name``: that string is the tag users write in their files
(``[dictionary] architecture = "sae"``, ``[[sources]] type = "synthetic"``, ``task = "train"``).
The tag is not a field of the class; the converter reads it to pick the class and writes it back
when serialising.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import attrs

from lmsae.config.fields import config_class, option, positive

Normalization = Literal["none", "token", "batch", "dataset"]


@config_class
class Config:
    """Root of every lmsae configuration class."""

    name: ClassVar[str] = ""


@config_class
class DictionaryConfig(Config):
    """Base of architecture configs (tag key ``architecture``).

    Subclasses must provide the properties below; the trainer, evaluator and analyser only use
    these to know what a dictionary reads and predicts.

    Input normalisation is common to every architecture: each hook point's activations are
    multiplied by a factor so that their average L2 norm becomes sqrt(d) (d = the hook's width),
    which makes learning rates and sparsity coefficients transfer across models.
    """

    normalization: Normalization = option(
        "dataset",
        doc="Input normalisation: 'dataset' scales each hook point by sqrt(d)/N where N is its average "
            "activation norm estimated once from calibration batches (foldable into the weights); "
            "'token' scales every token to norm sqrt(d); 'batch' uses the batch's mean norm; 'none' "
            "uses raw activations (what a dictionary is after folding).")
    dataset_norms: dict[str, float] = option(
        factory=dict,
        doc="Average L2 norm of each hook point's activations (hook point -> norm) for "
            "normalization='dataset'. Estimated before training when empty; written to config.json.")

    @property
    def hooks_in(self) -> tuple[str, ...]:
        """Hook points the dictionary reads (in order)."""
        raise NotImplementedError

    @property
    def hooks_out(self) -> tuple[str, ...]:
        """Hook points the dictionary predicts (in order); equal to ``hooks_in`` for an SAE."""
        raise NotImplementedError

    @property
    def hook_points(self) -> tuple[str, ...]:
        """Every hook point needed, inputs first, without duplicates."""
        seen: dict[str, None] = {}
        for h in (*self.hooks_in, *self.hooks_out):
            seen.setdefault(h, None)
        return tuple(seen)

    @property
    def n_features(self) -> int:
        """Number of dictionary features (d_sae)."""
        raise NotImplementedError


@config_class
class SourceConfig(Config):
    """Base of activation-source configs (tag key ``type``)."""

    weight: float = option(
        1.0, doc="Relative sampling weight when several sources are mixed (renormalised over the sources "
                 "that still have data).", validator=positive())


@config_class
class LanguageModelConfig(Config):
    """Base of language-model backend configs (tag key ``backend``)."""


@config_class
class TrainerConfig(Config):
    """Base of trainer configs (tag key ``type``)."""


@config_class
class WriterConfig(Config):
    """Base of activation-writer configs (tag key ``format``)."""


@config_class
class LoggerConfig(Config):
    """Base of metric-logger configs (tag key ``type``)."""


@config_class
class StoreConfig(Config):
    """Base of store configs (tag key ``type``)."""


@config_class
class RunConfig(Config):
    """Base of the top-level run configs, one per task (tag key ``task``)."""


def config_fields(cls: type) -> tuple[attrs.Attribute, ...]:
    """The attrs fields of a config class."""
    return attrs.fields(cls)
