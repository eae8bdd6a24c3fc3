"""``task = "train"``: train one dictionary from a stream of activations.

Steps: estimate dataset-wise normalisation from a separate pass over the start of the stream
(counted and reported), initialise the dictionary, train, evaluate, fold the normalisation into
the weights and save ``config.json`` + ``sae_weights.safetensors`` to ``output_dir``.
``resume = true`` continues from the newest checkpoint in ``output_dir/checkpoints``.
"""

from __future__ import annotations

import copy
import io
import logging
import pathlib
import shutil
import time
from typing import Any, ClassVar, Literal

import attrs
import torch

from lmsae.activations.factory import ActivationsConfig
from lmsae.config import (
    DictionaryConfig,
    StoreConfig,
    LanguageModelConfig,
    LoggerConfig,
    RunConfig,
    TrainerConfig,
    config_class,
    option,
)
from lmsae.dictionary.base import SparseDictionary
from lmsae.config.fields import FieldValueError, non_negative, positive
from lmsae.dictionary.io import PretrainedConfig, save_dictionary
from lmsae.distributed.mesh import DistributedConfig, build_mesh
from lmsae.errors import ConfigError, LmsaeError
from lmsae.logging.loggers import ConsoleLoggerConfig, JsonlLoggerConfig, LoggerContext, MultiLogger
from lmsae.records import TaskSpec
from lmsae.runtime import RunContext
from lmsae.tasks.common import (
    DTYPES,
    estimate_dataset_norms,
    model_loader,
    resolve_device,
    stream_builder,
    take,
    training_summary,
)
from lmsae.training.evaluation import evaluate_reconstruction
from lmsae.training.initializer import InitializerConfig, initialize
from lmsae.training.state_io import atomic_write_json
from lmsae.training.trainer import StandardTrainerConfig, TrainResult, list_checkpoints, read_checkpoint_state

log = logging.getLogger(__name__)


@config_class
class AfterTrainingConfig:
    """What to do with the trained dictionary once it is saved ([after_training] table).

    The follow-up tasks read held-out text from ``[eval_activations]`` (its text sources) with the
    run's ``[model]``; results go to the store under ``dictionary_name``.
    """

    evaluate: bool = option(False, doc="Run the evaluate task (reconstruction metrics, density, and CE loss "
                                       "recovered / KL when splice_tokens > 0).")
    evaluate_tokens: int = option(65_536, doc="Tokens for the reconstruction metrics.", validator=positive())
    splice_tokens: int = option(16_384, doc="Positions for CE loss recovered and KL (0: skip splicing).",
                                validator=non_negative())
    splice_mode: Literal["all", "per_hook"] = option(
        "all", doc="'all' splices every output at once; 'per_hook' also one output at a time (crosscoders...).")
    analyze: bool = option(False, doc="Run the analyze task (top contexts, quantile samples, histograms).")
    analyze_tokens: int = option(65_536, doc="Token positions to analyse.", validator=positive())
    attribute_logits: bool = option(False, doc="Run direct logit attribution (needs decoder directions).")
    dictionary_name: str | None = option(None, doc="Name in the store (default: the output directory's name).")
    store: StoreConfig | None = option(None, doc="Where results go ([after_training.store]; default: local store).")


def _default_loggers() -> list[LoggerConfig]:
    return [ConsoleLoggerConfig(), JsonlLoggerConfig()]


@config_class
class TrainRunConfig(RunConfig):
    """Train a sparse dictionary."""

    name: ClassVar[str] = "train"

    dictionary: DictionaryConfig | None = option(
        None, doc="The dictionary to train ([dictionary] table with its architecture). Exactly one of "
                  "dictionary and pretrained must be set.")
    pretrained: PretrainedConfig | None = option(
        None, doc="Continue training a saved dictionary instead ([pretrained] table); initialisation is skipped.")
    activations: ActivationsConfig = option(doc="Where training activations come from ([activations] table).")
    trainer: TrainerConfig = option(doc="Optimisation settings ([trainer] table; type defaults to 'standard').")
    initializer: InitializerConfig = option(factory=InitializerConfig, doc="Initialisation ([initializer] table).")
    model: LanguageModelConfig | None = option(
        None, doc="The language model ([model] table) that text sources run, loaded once on first use.")
    eval_activations: ActivationsConfig | None = option(
        None, doc="Held-out activations for periodic and final evaluation (None: the final report uses the last "
                  "training window).")
    loggers: list[LoggerConfig] = option(factory=_default_loggers,
                                         doc="Metric loggers ([[loggers]] tables: console, jsonl, wandb).")
    output_dir: pathlib.Path = option(pathlib.Path("runs/train"), doc="Where the dictionary, checkpoints and metrics go.")
    run_name: str | None = option(None, doc="Name of the run (default: the output directory's name).")
    resume: bool = option(False, doc="Continue from the newest checkpoint in output_dir/checkpoints.")
    overwrite: bool = option(False, doc="Allow replacing a previous run's results in output_dir.")
    device: str = option("auto", doc="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "float64"] = option("float32", doc="Parameter dtype.")
    fold_normalization: bool = option(True, doc="Fold dataset-wise normalisation into the saved weights, so the "
                                                "saved dictionary takes raw activations.")
    after_training: AfterTrainingConfig | None = option(
        None, doc="Evaluate / analyse / attribute logits of the saved dictionary ([after_training] table).")
    distributed: DistributedConfig = option(
        factory=DistributedConfig, doc="Process mesh ([distributed] table: data, model, head sizes); launch with "
                                       "torchrun. activations.batch_size is the global batch, split over data ranks.")

    def __attrs_post_init__(self) -> None:
        if (self.dictionary is None) == (self.pretrained is None):
            raise FieldValueError("dictionary", "set exactly one of [dictionary] (a new dictionary) and "
                                                "[pretrained] (continue a saved one)")
        after = self.after_training
        if after is not None and (after.evaluate or after.analyze or after.attribute_logits):
            if self.eval_activations is None and (after.evaluate or after.analyze):
                raise FieldValueError("after_training", "evaluate/analyze after training read held-out text from "
                                                        "[eval_activations]: add it")
            if self.model is None and (after.analyze or after.attribute_logits or after.splice_tokens):
                raise FieldValueError("after_training", "analysis, logit attribution and splicing need the "
                                                        "language model: add a [model] table")

        data = self.distributed.data
        if data > 1 and self.activations.batch_size % data:
            raise FieldValueError("activations", f"batch_size = {self.activations.batch_size} (the global batch) "
                                                 f"does not split over [distributed] data = {data} ranks")
        if self.dictionary is not None and getattr(self.dictionary, "needs_sequences", False):
            # an architecture config can say so (ClassVar needs_sequences, as Lorsa's does), so that a
            # 'tokens' stream fails here rather than after the dataset norms are estimated
            for key in ("activations", "eval_activations"):
                stream = getattr(self, key)
                if stream is not None and stream.layout != "sequences":
                    raise ConfigError([(f"$.{key}.layout: architecture {self.dictionary.name!r} reads whole "
                                        f"sequences (got layout = {stream.layout!r}): set layout = \"sequences\"")])
        if self.initializer.from_language_model:
            if self.pretrained is not None:
                raise FieldValueError("initializer", "from_language_model = true initialises a new dictionary; "
                                                     "a [pretrained] one keeps its weights (remove one of them)")
            if self.model is None:
                raise FieldValueError("initializer", "from_language_model = true needs the language model: "
                                                     "add a [model] table")

    def dictionary_config(self, registry: Any) -> DictionaryConfig:
        """The architecture config: the [dictionary] table, or the one stored with the pretrained dictionary."""
        if self.dictionary is not None:
            return self.dictionary
        from lmsae.dictionary.io import read_dictionary_config

        return read_dictionary_config(self.pretrained.path, registry)


def _check_output_dir(cfg: TrainRunConfig) -> pathlib.Path | None:
    out = cfg.output_dir
    if cfg.resume:
        ckpts = list_checkpoints(out)
        if not ckpts:
            raise LmsaeError(f"resume = true but {out / 'checkpoints'} holds no checkpoint")
        return ckpts[-1]
    previous = (out / "config.json").exists() or bool(list_checkpoints(out))
    if previous and not cfg.overwrite:
        raise LmsaeError(f"{out} already holds results of a run; set resume = true to continue it or "
                         f"overwrite = true to replace it")
    if previous:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return None


def build_model(context: RunContext, config: DictionaryConfig, dtype: torch.dtype) -> SparseDictionary:
    spec = context.registry.architecture(config.name)
    model = spec.model_class(config)
    return model.to(dtype=dtype)


def run(cfg: TrainRunConfig, context: RunContext) -> TrainResult:
    registry = context.registry
    start = time.monotonic()
    checkpoint = _check_output_dir(cfg)
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    # the [trainer] type chooses the trainer, even when its config subclasses the standard one
    trainer_spec = registry.get("trainer", cfg.trainer.name)
    dict_config = cfg.dictionary_config(registry)
    hooks = tuple(dict_config.hook_points)
    mesh = build_mesh(cfg.distributed, device)
    if mesh.is_distributed:
        context.echo(f"process mesh: {mesh.describe()}")
    primary = mesh.is_primary
    if not primary:  # one voice: the other processes report nothing
        context = attrs.evolve(context, out=io.StringIO(), progress=False)
        logging.getLogger("lmsae").setLevel(logging.WARNING)
    progress = context.progress and primary
    lm = model_loader(registry, cfg.model)
    n_data = mesh.size("data")
    local_activations = (attrs.evolve(cfg.activations, batch_size=cfg.activations.batch_size // n_data)
                         if n_data > 1 else cfg.activations)
    # calibration (norms, initialisation) reads the start of the whole stream, identically everywhere
    make_calibration = stream_builder(registry, cfg.activations, hooks, progress=progress, language_model=lm)
    make_stream = stream_builder(registry, local_activations, hooks, progress=progress, language_model=lm,
                                 shard=(mesh.coord("data"), n_data))
    make_eval = (stream_builder(registry, cfg.eval_activations, hooks, progress=False, language_model=lm)
                 if cfg.eval_activations is not None else None)
    out = cfg.output_dir
    if primary:
        out.mkdir(parents=True, exist_ok=True)

    if checkpoint is not None:
        # canonical whatever layout wrote it; shard_model below takes this process's part
        model, trainer_state, stream_state = read_checkpoint_state(checkpoint, registry, mesh.coord("data"), n_data)
        model = model.to(dtype=dtype)
        context.echo(f"resuming from {checkpoint} (step {trainer_state['step']})")
    else:
        if cfg.pretrained is not None:
            model = cfg.pretrained.load(registry).to(dtype=dtype)
            context.echo(f"continuing from the pretrained dictionary {cfg.pretrained.path}")
        else:
            model = build_model(context, dict_config, dtype)
            if cfg.initializer.from_language_model and not callable(
                    getattr(model, "initialize_from_language_model", None)):
                raise ConfigError([f"$.initializer.from_language_model: architecture {dict_config.name!r} cannot "
                                   "initialise from a language model (it has no initialize_from_language_model)"])
        trainer_state = stream_state = None
        need_norms = model.config.normalization == "dataset" and not model.config.dataset_norms
        n_calib = getattr(cfg.trainer, "calibration_batches", 8)
        calibration = take(make_calibration(), n_calib if need_norms else 1)
        if not calibration:
            raise LmsaeError("the activation stream is empty")
        model.check_batch(calibration[0])
        if need_norms:
            norms, n_tokens = estimate_dataset_norms(calibration, hooks)
            model.config = attrs.evolve(model.config, dataset_norms=norms)
            shown = ", ".join(f"{h}: {v:.4g}" for h, v in norms.items())
            context.echo(f"dataset norms estimated from {len(calibration)} batches ({n_tokens:,} tokens, a separate "
                         f"pass over the start of the stream; training still sees them): {shown}")
        if cfg.pretrained is None:
            report = initialize(model, cfg.initializer, {k: (v.to(dtype) if isinstance(v, torch.Tensor) and
                                                             v.is_floating_point() else v)
                                                         for k, v in calibration[0].items()})
            if report:
                log.info("initialisation: %s", report)
            if cfg.initializer.from_language_model:
                raw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                       for k, v in calibration[0].items()}
                generator = torch.Generator().manual_seed(cfg.initializer.seed)
                lm_report = model.initialize_from_language_model(lm(), raw, generator) or {}
                shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in lm_report.items() if isinstance(v, (int, float, str)))
                context.echo(f"initialised from the language model{': ' + shown if shown else ''}")

    run_name = cfg.run_name or out.resolve().name
    plain = registry.unstructure(cfg)
    logger_ctx = LoggerContext(output_dir=out, run_name=run_name, config=plain, resume=checkpoint is not None)
    # only the first process logs and writes files
    loggers = MultiLogger([registry.get("logger", lc.name).factory(lc, logger_ctx) for lc in cfg.loggers]
                          if primary else [])
    if primary:
        atomic_write_json(out / "run_config.json", plain)

    full_config = model.config
    spec = registry.architecture(full_config.name)
    extra_kwargs: dict[str, Any] = {}
    if mesh.is_distributed:
        from lmsae.distributed.models import shard_model

        model = shard_model(model, spec, mesh)
        extra_kwargs = {"mesh": mesh, "sharding_rules": spec.sharding_rules(full_config), "full_config": full_config}
    eval_tokens = getattr(cfg.trainer, "eval_tokens", 100_000)
    eval_fn = None
    if make_eval is not None:
        def eval_fn(m: Any) -> dict[str, float]:
            # under a mesh every process gathers the whole dictionary and evaluates it (same numbers)
            whole = trainer.gather_model() if mesh.is_distributed else m
            return evaluate_reconstruction(whole, make_eval(), eval_tokens, device=device)
    trainer = trainer_spec.factory(cfg.trainer, model, device=device, loggers=loggers, hooks=registry.hook,
                                   output_dir=out, registry=registry, eval_fn=eval_fn, progress=progress,
                                   **extra_kwargs)
    stream = make_stream()
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state)
        stream.load_state_dict(stream_state)
    tokens_before = int(trainer_state["tokens"]) if trainer_state is not None else 0
    try:
        try:
            result = trainer.fit(stream, resumed=trainer_state is not None, stream_state=stream.state_dict)
        finally:
            close = getattr(stream, "close", None)
            if callable(close):
                close()  # stop a prefetching thread before the model is used for evaluation
        whole = trainer.gather_model() if mesh.is_distributed else model
        if not primary:
            return result
        final = evaluate_reconstruction(whole, make_eval(), eval_tokens, device=device) if make_eval else {}
        summary = training_summary(result, final, time.monotonic() - start, tokens_before=tokens_before)
        loggers.log_summary(summary)
        saved = copy.deepcopy(whole).cpu()
        if cfg.fold_normalization and saved.config.normalization == "dataset":
            saved.fold_normalization()
        save_dictionary(saved, out, registry, metadata={"training": result.reason})
        atomic_write_json(out / "training_summary.json", summary)
    finally:
        loggers.close()
    _print_summary(context, summary, out)
    if cfg.after_training is not None:
        run_after_training(cfg, context)
    return result


def run_after_training(cfg: TrainRunConfig, context: RunContext) -> None:
    """The follow-up tasks of ``[after_training]`` on the dictionary just saved in ``output_dir``."""
    from lmsae.tasks import analyze, attribute_logits, evaluate

    after = cfg.after_training
    pretrained = PretrainedConfig(path=cfg.output_dir)
    name = after.dictionary_name or cfg.output_dir.resolve().name
    held_out = cfg.eval_activations
    text_sources = [s for s in held_out.sources if s.name == "text"] if held_out is not None else []
    if after.evaluate:
        splice = None
        if after.splice_tokens and text_sources:
            splice = evaluate.SpliceConfig(sources=text_sources, n_tokens=after.splice_tokens, mode=after.splice_mode)
        context.echo(f"\nafter training: evaluate ({'with' if splice else 'without'} splicing)")
        evaluate.run(evaluate.EvaluateRunConfig(
            pretrained=pretrained, dictionary_name=name, activations=held_out, model=cfg.model, splice=splice,
            n_tokens=after.evaluate_tokens, store=after.store, loggers=[],
            output_dir=cfg.output_dir / "evaluation", device=cfg.device), context)
    if after.analyze:
        context.echo("\nafter training: analyze")
        sequences = attrs.evolve(held_out, layout="sequences", batch_size=16, shuffle_buffer=0)
        analyze.run(analyze.AnalyzeRunConfig(
            pretrained=pretrained, dictionary_name=name, model=cfg.model, activations=sequences,
            n_tokens=after.analyze_tokens, store=after.store, device=cfg.device), context)
    if after.attribute_logits:
        context.echo("\nafter training: attribute logits")
        attribute_logits.run(attribute_logits.AttributeLogitsRunConfig(
            pretrained=pretrained, dictionary_name=name, model=cfg.model, store=after.store,
            device=cfg.device), context)


def _print_summary(context: RunContext, s: dict[str, Any], out: pathlib.Path) -> None:
    context.echo("")
    context.echo(f"{s['message']} in {s['seconds']:.1f}s ({s['tokens_per_second']:,.0f} tokens/s)")
    context.echo(f"final metrics ({s['metrics_source']}):")
    context.echo(f"  explained variance  {s['explained_variance']:.4f}")
    context.echo(f"  L0                  {s['l0']:.2f}")
    context.echo(f"  dead fraction       {s['dead_fraction']:.2%}")
    context.echo(f"  MSE (normalised)    {s['mse']:.4g}")
    context.echo(f"saved dictionary to {out} (config.json + sae_weights.safetensors)")


#: The language model of ``lmsae config example`` for architectures that read more hook points than
#: the synthetic source provides (one input, one output): SmolLM2-135M, the model of the other
#: examples, whose residual-stream hook points (resid, ln*.hook_normalized, attn_out, mlp_out) are
#: all 576 wide (lmsae.models.smollm2).
_EXAMPLE_MODEL, _EXAMPLE_MODEL_WIDTH = "smollm2-135m", 576


def example(registry: Any, architecture: str | None = None) -> TrainRunConfig:
    """A small, complete training config for ``architecture`` (default ``sae``).

    The architecture's own ``example_config()`` trains on the synthetic source when that can
    produce its hook points (at most two: inputs, then targets of another width if need be).
    Architectures that read more (a cross-layer transcoder) train on SmolLM2's activations over
    the built-in corpus instead, with the example's ``d_model`` set to the model's width.
    """
    names = registry.names("architecture")
    arch = architecture or "sae"
    if arch not in names:
        raise LmsaeError(registry.unknown_message("architecture", arch))
    spec = registry.architecture(arch)
    dictionary = spec.example_config()
    sequences = bool(getattr(spec.model_class, "needs_sequences", False))
    hooks = dictionary.hook_points
    if len(hooks) <= 2:
        dims = spec.model_class(dictionary).hook_dims()
        return TrainRunConfig(dictionary=dictionary,
                              activations=_synthetic_activations(hooks, dims, sequences),
                              trainer=StandardTrainerConfig(total_training_tokens=1_000_000),
                              output_dir=pathlib.Path(f"runs/{arch}"))

    from lmsae.data.datasets import DatasetConfig
    from lmsae.models.transformer_lens import TransformerLensConfig
    from lmsae.sources.text_source import TextSourceConfig

    if "d_model" in attrs.fields_dict(type(dictionary)):
        dictionary = attrs.evolve(dictionary, d_model=_EXAMPLE_MODEL_WIDTH)
    dims = spec.model_class(dictionary).hook_dims()
    if set(dims.values()) != {_EXAMPLE_MODEL_WIDTH}:
        raise LmsaeError(f"architecture {arch!r} reads {len(hooks)} hook points (the synthetic source provides at "
                         f"most two) and its example config does not fit {_EXAMPLE_MODEL}'s width "
                         f"{_EXAMPLE_MODEL_WIDTH}: write the [dictionary] and [activations] tables by hand")
    text = TextSourceConfig(dataset=DatasetConfig(path="builtin:python-docs"), context_size=128, model_batch_size=16)
    # prefetch = 0: no background thread may run the shared language model while the calibration
    # pass or the trainer's stream uses it (TransformerLens hooks are not thread-safe)
    activations = ActivationsConfig(sources=[text], layout="sequences" if sequences else "tokens",
                                    batch_size=16 if sequences else 1024, prefetch=0)
    return TrainRunConfig(dictionary=dictionary,
                          activations=activations,
                          model=TransformerLensConfig(model=_EXAMPLE_MODEL),
                          trainer=StandardTrainerConfig(total_training_tokens=100_000),
                          output_dir=pathlib.Path(f"runs/{arch}"))


def _synthetic_activations(hooks: tuple[str, ...], dims: dict[str, int], sequences: bool) -> ActivationsConfig:
    """Synthetic activations at one hook point, or at an input and a target hook point (of any widths)."""
    from lmsae.sources.synthetic_source import SyntheticSourceConfig

    width = dims[hooks[0]]
    out = hooks[1] if len(hooks) > 1 else None
    d_out = dims[out] if out is not None and dims[out] != width else None
    source = SyntheticSourceConfig(d_model=width, n_features=4 * width, mean_active=4.0, hook_point=hooks[0],
                                   hook_point_out=out, d_out=d_out, context_size=16 if sequences else None,
                                   batch_size=64 if sequences else 1024)
    if sequences:
        return ActivationsConfig(sources=[source], layout="sequences", batch_size=64)
    return ActivationsConfig(sources=[source], batch_size=1024)


SPEC = TaskSpec(config_class=TrainRunConfig, factory=run, example=example, summary="train a sparse dictionary")
