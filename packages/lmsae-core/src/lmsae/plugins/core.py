"""Built-in components of lmsae-core, registered like any plugin."""

from __future__ import annotations

from lmsae.hookspecs import hookimpl


@hookimpl
def lmsae_register_architectures():
    from lmsae.dictionary.sae import SAE_SPEC

    return [SAE_SPEC]


@hookimpl
def lmsae_register_sources():
    from lmsae.records import SourceSpec
    from lmsae.sources.synthetic_source import SyntheticSourceConfig, build_synthetic_source

    return [SourceSpec(config_class=SyntheticSourceConfig, factory=build_synthetic_source,
                       summary="seeded synthetic activations with known ground-truth features")]


@hookimpl
def lmsae_register_trainers():
    from lmsae.records import TrainerSpec
    from lmsae.training.trainer import StandardTrainerConfig, Trainer

    return [TrainerSpec(config_class=StandardTrainerConfig, factory=Trainer,
                        summary="Adam/SparseAdam trainer with schedules, AuxK, checkpoints and exact resume")]


@hookimpl
def lmsae_register_loggers():
    from lmsae.logging.loggers import LOGGER_SPECS

    return list(LOGGER_SPECS)


@hookimpl
def lmsae_register_tasks():
    from lmsae.tasks import init as init_task
    from lmsae.tasks import train as train_task

    return [init_task.SPEC, train_task.SPEC]


@hookimpl
def lmsae_register_commands(cli):
    from lmsae.interop.commands import register

    register(cli)
