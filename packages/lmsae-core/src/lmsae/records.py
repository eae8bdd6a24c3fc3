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
    - ``shard_config(config, counts)`` or ``shard_config(config, counts, index=...)``: optional;
      the config of ONE shard when the mesh axes in ``counts`` (``{axis: number of shards}``, only
      the axes that split, e.g. ``{"model": 2}``) split the dictionary as the sharding rules say
      (e.g. ``d_sae // 2`` features). When the function declares a parameter named ``index``, it
      is also given ``index={axis: this shard's position along it}`` for the same axes, for shards
      that differ in more than their sizes (a crosscoder's head shard holds other hook points);
      otherwise it is called with two arguments (see
      :func:`lmsae.distributed.models.shard_config_for`). The shard is built as
      ``model_class(shard_config(...))`` and loads the sliced state dict. It raises
      :class:`lmsae.errors.ShardingError` when a size does not divide. None: the architecture
      supports data parallelism only.
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
    """An activation source: ``factory(config, context) -> ActivationSource``, where ``context`` is
    a :class:`lmsae.activations.protocol.SourceContext` (hook points, layout, seed, shard, ...)."""


@attrs.frozen
class LanguageModelSpec(ComponentSpec):
    """A language-model backend: ``factory(config) -> LanguageModel``."""


@attrs.frozen
class TrainerSpec(ComponentSpec):
    """A trainer. The train and sweep tasks build it as::

        factory(config, model, device=device, loggers=loggers, hooks=registry.hook,
                output_dir=output_dir, registry=registry, eval_fn=eval_fn, progress=progress)

    and the train task of a distributed run (``torchrun`` with a ``[distributed]`` table, any
    axis) also passes ``mesh=``, ``sharding_rules=`` and ``full_config=``:

    - ``config``: an instance of ``config_class``; ``model``: the dictionary to train (under a
      mesh, this process's shard);
    - ``device``: a :class:`torch.device`; ``loggers``: a
      :class:`lmsae.logging.loggers.MultiLogger` (empty except on the primary process);
      ``hooks``: the registry's pluggy hook relay, through which the trainer calls the behaviour
      hooks; ``output_dir``: the run directory (checkpoints); ``registry``: the
      :class:`lmsae.registry.Registry`; ``eval_fn``: ``eval_fn(model) -> {name: float}`` or None;
      ``progress``: show a progress bar (the sweep passes False);
    - ``mesh``: the :class:`lmsae.distributed.mesh.Mesh`; ``sharding_rules``: the architecture's
      rules for the whole dictionary; ``full_config``: the whole dictionary's config.

    The train task then calls ``fit(stream, resumed=..., stream_state=...)``, ``load_state_dict``
    when resuming and ``gather_model()`` under a mesh; the sweep task drives ``setup`` and
    ``train_step`` itself. :class:`lmsae.training.trainer.Trainer` has the whole interface.
    """


@attrs.frozen
class WriterSpec(ComponentSpec):
    """An activation writer (cache format). The generate task builds it as::

        factory(config, directory, hook_points=hook_points, shard_index=shard_index,
                n_shards=n_shards, description=description, overwrite=overwrite)

    - ``directory``: the output directory (a :class:`pathlib.Path`; several shards share it);
    - ``hook_points``: tuple of the hook points every batch holds;
    - ``shard_index``, ``n_shards``: this writer's shard, ``0 <= shard_index < n_shards``;
    - ``description``: JSON-serialisable dict with ``"model"`` (name), ``"dataset"`` (the
      sources as plain data) and ``"model_config"``;
    - ``overwrite``: discard existing data instead of resuming it.

    The writer is used as a context manager; the task calls ``resume_position() -> int`` (the
    sequences already stored) and ``write(batch)`` with sequence batches. See
    :class:`lmsae.activations.cache.ActivationWriter`.
    """


@attrs.frozen
class LoggerSpec(ComponentSpec):
    """A metric logger: ``factory(config, context) -> MetricLogger``, where ``context`` is a
    :class:`lmsae.logging.loggers.LoggerContext`."""


@attrs.frozen
class StoreSpec(ComponentSpec):
    """A store for dictionaries and analyses: ``factory(config) -> Store``."""


@attrs.frozen
class TaskSpec(ComponentSpec):
    """A task run by ``lmsae run``: ``factory(config, context) -> result``, where ``context`` is a
    :class:`lmsae.runtime.RunContext` (the result is ignored by the CLI).

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
