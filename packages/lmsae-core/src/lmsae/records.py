"""Frozen records that registration hooks return, and the table of component kinds.

Every record names its config class; the config class's ``name`` class variable is the name
users write in configuration files, so it is written once. ``KINDS`` ties each kind to its
registration hook, its base config class and the key that carries the tag in a file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from lmsae.config.base import (
    Config,
    DictionaryConfig,
    LanguageModelConfig,
    LoggerConfig,
    RunConfig,
    SourceConfig,
    StoreConfig,
    TrainerConfig,
    WriterConfig,
)

#: parameter name -> {mesh axis name -> tensor dim}; ``{}`` means replicated.
ShardingRules = Mapping[str, Mapping[str, int]]


@attrs.frozen
class ComponentSpec:
    """A named, configurable component provided by a plugin.

    ``config_class`` is a subclass of the kind's base config with a non-empty ``name``;
    ``factory`` builds the component (its signature depends on the kind, see the hookspecs).
    """

    config_class: type[Config]
    factory: Callable[..., Any]
    summary: str = ""

    @property
    def name(self) -> str:
        return self.config_class.name


@attrs.frozen
class ArchitectureSpec:
    """A sparse-dictionary architecture.

    - ``config_class``: a :class:`DictionaryConfig` subclass; its ``name`` is the architecture tag.
    - ``model_class``: a :class:`lmsae.dictionary.SparseDictionary` subclass built as
      ``model_class(config)``.
    - ``sharding_rules(config)``: parameter name -> {mesh axis -> tensor dim} for every parameter.
    - ``example_config()``: the smallest valid config (used by ``lmsae config example`` and the
      contract tests).
    - ``analysis_extras(model, feature_indices)``: optional per-feature extras for analysis.
    - ``shard_config(config, counts)``: optional; the config of ONE shard when the mesh axes in
      ``counts`` (e.g. ``{"model": 2}``) split the dictionary as the sharding rules say (e.g.
      ``d_sae // 2`` features). The shard is built as ``model_class(shard_config(...))`` and loads
      the sliced state dict. None: the architecture supports data parallelism only.
    """

    config_class: type[DictionaryConfig]
    model_class: type
    sharding_rules: Callable[[DictionaryConfig], ShardingRules]
    example_config: Callable[[], DictionaryConfig]
    summary: str = ""
    analysis_extras: Callable[..., Any] | None = None
    shard_config: Callable[[DictionaryConfig, Mapping[str, int]], DictionaryConfig] | None = None

    @property
    def name(self) -> str:
        return self.config_class.name

    @property
    def factory(self) -> Callable[..., Any]:
        return self.model_class


@attrs.frozen
class SourceSpec(ComponentSpec):
    """An activation source: ``factory(config, context) -> ActivationSource``."""


@attrs.frozen
class LanguageModelSpec(ComponentSpec):
    """A language-model backend: ``factory(config) -> LanguageModel``."""


@attrs.frozen
class TrainerSpec(ComponentSpec):
    """A trainer: ``factory(config, context) -> Trainer``."""


@attrs.frozen
class WriterSpec(ComponentSpec):
    """An activation writer (cache format): ``factory(config, directory) -> Writer``."""


@attrs.frozen
class LoggerSpec(ComponentSpec):
    """A metric logger: ``factory(config, context) -> MetricLogger``."""


@attrs.frozen
class StoreSpec(ComponentSpec):
    """A store for dictionaries and analyses: ``factory(config) -> Store``."""


@attrs.frozen
class TaskSpec(ComponentSpec):
    """A task run by ``lmsae run``: ``factory(config, context) -> result``.

    ``config_class`` is the task's :class:`RunConfig`; ``example(registry)`` optionally returns a
    complete example run config for ``lmsae config example``.
    """

    example: Callable[..., RunConfig] | None = None


@attrs.frozen
class Kind:
    """One kind of pluggable component."""

    name: str
    hook: str
    record: type
    base: type[Config]
    tag: str
    default_tag: str | None = None
    plural: str = ""


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("architecture", "lmsae_register_architectures", ArchitectureSpec, DictionaryConfig, "architecture",
             plural="architectures"),
        Kind("source", "lmsae_register_sources", SourceSpec, SourceConfig, "type", plural="activation sources"),
        Kind("language_model", "lmsae_register_language_models", LanguageModelSpec, LanguageModelConfig, "backend",
             default_tag="transformer_lens", plural="language-model backends"),
        Kind("trainer", "lmsae_register_trainers", TrainerSpec, TrainerConfig, "type", default_tag="standard",
             plural="trainers"),
        Kind("writer", "lmsae_register_writers", WriterSpec, WriterConfig, "format", default_tag="safetensors",
             plural="activation writers"),
        Kind("logger", "lmsae_register_loggers", LoggerSpec, LoggerConfig, "type", plural="loggers"),
        Kind("store", "lmsae_register_stores", StoreSpec, StoreConfig, "type", default_tag="local", plural="stores"),
        Kind("task", "lmsae_register_tasks", TaskSpec, RunConfig, "task", plural="tasks"),
    )
}

KIND_BY_BASE: dict[type, Kind] = {k.base: k for k in KINDS.values()}
