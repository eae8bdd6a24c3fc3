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
                        summary="sign-SGD schedule-free / Adam / SparseAdam trainer with schedules, AuxK, checkpoints and exact resume")]


@hookimpl
def lmsae_register_loggers():
    from lmsae.logging.loggers import LOGGER_SPECS

    return list(LOGGER_SPECS)


@hookimpl
def lmsae_register_stores():
    from lmsae.stores.specs import STORE_SPECS

    return list(STORE_SPECS)


@hookimpl
def lmsae_register_tasks():
    from lmsae.tasks import analyze, attribute_logits, autointerp, evaluate, generate, init, sweep, train

    return [analyze.SPEC, attribute_logits.SPEC, autointerp.SPEC, evaluate.SPEC, generate.SPEC, init.SPEC,
            sweep.SPEC, train.SPEC]


@hookimpl
def lmsae_register_commands(cli):
    from lmsae.activations.commands import register as register_activations
    from lmsae.interop.commands import register as register_saelens
    from lmsae.report.commands import register as register_report
    from lmsae.stores.commands import register as register_store

    register_activations(cli)
    register_saelens(cli)
    register_store(cli)
    register_report(cli)
