"""The whole extension surface of lmsae, in one file.

A plugin is a module that implements some of these hooks, marked with :data:`hookimpl`, and is
found through the ``lmsae`` entry-point group::

    # pyproject.toml of a plugin package
    [project.entry-points.lmsae]
    myarch = "my_package.plugin"

The core's own built-ins (the SAE, the synthetic source, the trainer, the loggers, the tasks)
are plugins using these same hooks.

There are two families of hooks:

* **Registration hooks** (``lmsae_register_*``) are pure: they take no arguments (except
  ``lmsae_register_commands``) and return an iterable of frozen records from
  :mod:`lmsae.records`. The registry records which distribution returned each record, and a
  name registered twice is an error naming both distributions.
* **Behaviour hooks** are called during a run (``lmsae_before_training``,
  ``lmsae_after_step``, ``lmsae_after_training``). Every implementation is called; return
  values are ignored.

A module function named like a hook is that hook's implementation even without the marker (the
registry registers it with pluggy all the same); the marker is needed only for pluggy's options
such as ``@hookimpl(tryfirst=True)``. A function named ``lmsae_*`` that is not a hook below is an
error naming the closest hook.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import click

    from lmsae.records import (
        ArchitectureSpec,
        LanguageModelSpec,
        LoggerSpec,
        SourceSpec,
        StoreSpec,
        TaskSpec,
        TrainerSpec,
        WriterSpec,
    )

PROJECT = "lmsae"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration hooks ----------------------------------------------------------------------


@hookspec
def lmsae_register_architectures() -> Iterable[ArchitectureSpec]:
    """Return the sparse-dictionary architectures this plugin provides.

    Example::

        @hookimpl
        def lmsae_register_architectures():
            return [ArchitectureSpec(config_class=MyConfig, model_class=MyDictionary,
                                     sharding_rules=my_rules, example_config=MyConfig.example,
                                     summary="my sparse dictionary")]

    ``MyConfig.name`` (a class variable) is the tag: ``[dictionary] architecture = "mine"``.
    """


@hookspec
def lmsae_register_sources() -> Iterable[SourceSpec]:
    """Return activation sources (``[[activations.sources]] type = "..."``).

    Example::

        @hookimpl
        def lmsae_register_sources():
            return [SourceSpec(config_class=ParquetSourceConfig, factory=ParquetSource,
                               summary="activations stored as parquet")]

    The factory is called as ``factory(config, context)`` and returns an iterable of batch dicts.
    """


@hookspec
def lmsae_register_language_models() -> Iterable[LanguageModelSpec]:
    """Return language-model backends (``[model] backend = "..."``).

    Example::

        @hookimpl
        def lmsae_register_language_models():
            return [LanguageModelSpec(config_class=NNsightConfig, factory=NNsightModel)]
    """


@hookspec
def lmsae_register_trainers() -> Iterable[TrainerSpec]:
    """Return trainers (``[trainer] type = "..."``; the core's is ``standard``).

    Example::

        @hookimpl
        def lmsae_register_trainers():
            return [TrainerSpec(config_class=SignSGDTrainerConfig, factory=SignSGDTrainer)]

    The factory is called as ``factory(config, model, device=..., loggers=..., hooks=...,
    output_dir=..., registry=..., eval_fn=..., progress=...)`` (plus ``mesh``, ``sharding_rules``
    and ``full_config`` in a distributed run); :class:`~lmsae.records.TrainerSpec` says what each is.
    """


@hookspec
def lmsae_register_writers() -> Iterable[WriterSpec]:
    """Return activation writers, i.e. on-disk cache formats (``[writer] format = "..."``).

    Example::

        @hookimpl
        def lmsae_register_writers():
            return [WriterSpec(config_class=ZarrWriterConfig, factory=ZarrWriter)]

    The factory is called as ``factory(config, directory, hook_points=..., shard_index=...,
    n_shards=..., description=..., overwrite=...)``; :class:`~lmsae.records.WriterSpec` says what
    each is and what the writer must provide.
    """


@hookspec
def lmsae_register_loggers() -> Iterable[LoggerSpec]:
    """Return metric loggers (``[[loggers]] type = "..."``: console, jsonl, wandb, ...).

    Example::

        @hookimpl
        def lmsae_register_loggers():
            return [LoggerSpec(config_class=MLflowLoggerConfig, factory=MLflowLogger)]
    """


@hookspec
def lmsae_register_stores() -> Iterable[StoreSpec]:
    """Return stores for dictionaries, analyses and interpretations (``[store] type = "..."``).

    Example::

        @hookimpl
        def lmsae_register_stores():
            return [StoreSpec(config_class=PostgresStoreConfig, factory=PostgresStore)]
    """


@hookspec
def lmsae_register_tasks() -> Iterable[TaskSpec]:
    """Return tasks that ``lmsae run`` can execute (``task = "..."`` at the top of a config).

    Example::

        @hookimpl
        def lmsae_register_tasks():
            return [TaskSpec(config_class=PruneRunConfig, factory=run_prune,
                             summary="prune dead features")]
    """


@hookspec
def lmsae_register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``lmsae`` command line.

    Example::

        @hookimpl
        def lmsae_register_commands(cli):
            @cli.command()
            def hello():
                click.echo("hello from my plugin")
    """


# --- behaviour hooks -------------------------------------------------------------------------


@hookspec
def lmsae_before_training(trainer: Any, dictionary: Any) -> None:
    """Called once before the first training step (after initialisation or resume).

    Example::

        @hookimpl
        def lmsae_before_training(trainer, dictionary):
            print("training", type(dictionary).__name__, "for", trainer.total_steps, "steps")
    """


@hookspec
def lmsae_after_step(trainer: Any, dictionary: Any, step: int, metrics: Mapping[str, float] | None) -> None:
    """Called after every optimiser step; ``metrics`` is set on logging steps, else ``None``.

    ``step`` counts completed steps (1 after the first). Example::

        @hookimpl
        def lmsae_after_step(trainer, dictionary, step, metrics):
            if metrics and metrics["metrics/explained_variance"] > 0.99:
                trainer.request_stop("good enough")
    """


@hookspec
def lmsae_after_training(trainer: Any, dictionary: Any, result: Any) -> None:
    """Called once when training ends, with the trainer's result (why it stopped, final metrics).

    Example::

        @hookimpl
        def lmsae_after_training(trainer, dictionary, result):
            notify_slack(f"done: {result.reason}")
    """
