"""Built-in components of lmsae-core, registered like any plugin (imports are deferred so that
``lmsae --help`` stays fast)."""

from __future__ import annotations

from lmsae.hookspecs import hookimpl


@hookimpl
def lmsae_register_architectures():
    from lmsae.dictionary.sae import SAE_SPEC

    return [SAE_SPEC]


@hookimpl
def lmsae_register_sources():
    from lmsae.records import SourceSpec
    from lmsae.sources.cached_source import CACHED_SOURCE_SPEC
    from lmsae.sources.synthetic_source import SyntheticSourceConfig, build_synthetic_source
    from lmsae.sources.text_source import TextSourceConfig, build_text_source

    return [
        SourceSpec(config_class=SyntheticSourceConfig, factory=build_synthetic_source,
                   summary="seeded synthetic activations with known ground-truth features"),
        SourceSpec(config_class=TextSourceConfig, factory=build_text_source,
                   summary="text dataset run through the run's language model"),
        CACHED_SOURCE_SPEC,
    ]


@hookimpl
def lmsae_register_language_models():
    from lmsae.models.transformer_lens import TRANSFORMER_LENS_SPEC

    return [TRANSFORMER_LENS_SPEC]


@hookimpl
def lmsae_register_writers():
    from lmsae.activations.cache import WRITER_SPEC

    return [WRITER_SPEC]


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
    from lmsae.tasks import generate as generate_task
    from lmsae.tasks import init as init_task
    from lmsae.tasks import train as train_task

    return [generate_task.SPEC, init_task.SPEC, train_task.SPEC]


@hookimpl
def lmsae_register_commands(cli):
    from lmsae.activations.commands import register as register_activations
    from lmsae.interop.commands import register as register_saelens

    register_activations(cli)
    register_saelens(cli)
