"""``task = "lorsa_init"``: a Lorsa initialised from the language model's attention layer, saved
for ``[pretrained]`` to continue training.

Steps: load the language model; read calibration batches of sequences from ``[activations]``
(estimating dataset norms, as the train task does); run the core initializer
(``[initializer]``); copy the layer's QK heads and build the OV features
(:func:`lmsae_lorsa.init.init_from_attention`) on the first ``init_tokens`` tokens; report the
explained variance on them; save ``config.json`` + ``sae_weights.safetensors`` (normalisation
not folded, so training continues in the same normalised space).

The train task can do the same initialisation itself (``[initializer] from_language_model =
true``, as ``examples/lorsa.toml``); this task is for saving the initialised Lorsa alone (to
inspect it, or to start several train runs from it with ``[pretrained]``).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, ClassVar

import attrs
import torch
from lmsae.activations.factory import ActivationsConfig
from lmsae.config import DictionaryConfig, LanguageModelConfig, RunConfig, config_class, option
from lmsae.config.fields import FieldValueError, non_negative, positive
from lmsae.dictionary.io import save_dictionary
from lmsae.errors import ConfigError, DataError, LmsaeError
from lmsae.records import TaskSpec
from lmsae.runtime import RunContext
from lmsae.tasks.common import estimate_dataset_norms, model_loader, resolve_device, stream_builder, take
from lmsae.training.initializer import InitializerConfig, initialize

from lmsae_lorsa.config import LorsaConfig
from lmsae_lorsa.init import init_from_attention, layer_of

__all__ = ["LORSA_INIT_SPEC", "LorsaInitRunConfig", "initialize_from_model", "run"]

log = logging.getLogger(__name__)


@config_class
class LorsaInitRunConfig(RunConfig):
    """Initialise a Lorsa from the language model's own attention layer and save it."""

    name: ClassVar[str] = "lorsa_init"

    dictionary: DictionaryConfig = option(doc="The Lorsa to build ([dictionary] table, architecture = \"lorsa\").")
    model: LanguageModelConfig = option(doc="The language model whose attention layer is copied ([model] table, "
                                            "backend = \"transformer_lens\").")
    activations: ActivationsConfig = option(
        doc="Sequences for the dataset norms and the data-dependent steps ([activations] table, layout = "
            "\"sequences\"): usually the training run's.")
    initializer: InitializerConfig = option(
        factory=InitializerConfig, doc="Core initialisation run first ([initializer] table); the weights copied "
                                       "from the model then replace the QK and OV weights and b_D.")
    layer: int | None = option(None, doc="Attention layer to copy (default: from hook_point_out "
                                         "'blocks.<L>.hook_attn_out').", validator=non_negative())
    output_dir: pathlib.Path = option(pathlib.Path("runs/lorsa-init"),
                                      doc="Where config.json and sae_weights.safetensors are written.")
    overwrite: bool = option(False, doc="Replace a dictionary already in output_dir.")
    calibration_batches: int = option(8, doc="Batches read to estimate dataset-wise normalisation norms.",
                                      validator=positive())
    init_tokens: int = option(4096, doc="Tokens (whole sequences from the first batches) used for the heads' "
                                        "active subspaces and the output-scale fit.", validator=positive())
    active_subspace_dim: int | None = option(
        None, doc="Dimension of each head's active subspace, where its features' value directions are drawn "
                  "(the top right-singular vectors of the head's value vectors). Unset: d_head.",
        validator=positive())
    fit_output_scale: bool = option(True, doc="Fit each QK group's output scale and b_D by least squares on the "
                                              "initialisation tokens.")
    seed: int = option(0, doc="Seed of the features' random value directions (the core initializer has its own "
                              "[initializer] seed).", validator=non_negative())
    device: str = option("auto", doc="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', ...")

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.dictionary, LorsaConfig):
            raise FieldValueError("dictionary", f"must be a Lorsa (architecture = \"lorsa\"), got "
                                                f"{self.dictionary.name!r}")
        # the rule is LorsaConfig.needs_sequences, the flag the train task checks (same message)
        if self.dictionary.needs_sequences and self.activations.layout != "sequences":
            raise ConfigError([(f"$.activations.layout: architecture {self.dictionary.name!r} reads whole "
                                f"sequences (got layout = {self.activations.layout!r}): set layout = \"sequences\"")])


def _concat(batches: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """The first batches, cut to whole sequences holding at least ``tokens`` token positions."""
    keys = [k for k, v in batches[0].items() if isinstance(v, torch.Tensor)]
    out = {k: torch.cat([b[k] for b in batches], dim=0) for k in keys}
    T = out[keys[0]].shape[1]
    n = max(1, -(-tokens // T))
    return {k: v[:n] for k, v in out.items()}


def initialize_from_model(registry: Any, config: LorsaInitRunConfig, context: RunContext | None = None
                          ) -> tuple[Any, dict[str, Any]]:
    """Build, normalise, initialise and copy a Lorsa as ``config`` says; returns ``(model, report)``."""
    echo = context.echo if context is not None else log.info
    progress = context.progress if context is not None else False
    device = resolve_device(config.device)
    dict_config: LorsaConfig = config.dictionary  # type: ignore[assignment]
    layer = layer_of(dict_config) if config.layer is None else config.layer
    loader = model_loader(registry, config.model)
    hooks = tuple(dict_config.hook_points)
    make_stream = stream_builder(registry, config.activations, hooks, progress=progress, language_model=loader)
    model = registry.architecture(dict_config.name).model_class(dict_config)
    need_norms = model.config.normalization == "dataset" and not model.config.dataset_norms
    stream = make_stream()
    try:
        # one iterator: the extra batches for init_tokens follow the calibration ones
        it = iter(stream)
        batches = take(it, config.calibration_batches if need_norms else 1)
        seen = sum(int(b[hooks[0]].shape[0] * b[hooks[0]].shape[1]) for b in batches)
        while batches and seen < config.init_tokens:
            more = next(it, None)
            if more is None:
                break
            batches.append(more)
            seen += int(more[hooks[0]].shape[0] * more[hooks[0]].shape[1])
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    if not batches:
        raise DataError("the activation stream is empty")
    model.check_batch(batches[0])
    if need_norms:
        norms, n_tokens = estimate_dataset_norms(batches[: config.calibration_batches], hooks)
        model.config = attrs.evolve(model.config, dataset_norms=norms)
        echo(f"dataset norms from {n_tokens:,} tokens: " + ", ".join(f"{h}: {v:.4g}" for h, v in norms.items()))
    model.to(device)
    batch = {k: v.to(device) for k, v in _concat(batches, config.init_tokens).items()}
    initialize(model, config.initializer, batch)
    report = init_from_attention(model, loader(), layer, batch, generator=torch.Generator().manual_seed(config.seed),
                                 subspace_dim=config.active_subspace_dim, fit_output_scale=config.fit_output_scale)
    return model.cpu(), report


def run(config: LorsaInitRunConfig, context: RunContext) -> pathlib.Path:
    out = config.output_dir
    if (out / "config.json").exists() and not config.overwrite:
        raise LmsaeError(f"{out} already holds a dictionary; set overwrite = true to replace it")
    model, report = initialize_from_model(context.registry, config, context)
    lm_name = getattr(config.model, "model", config.model.name)
    path = save_dictionary(model, out, context.registry,
                           metadata={"initialized_from": f"{lm_name} attention layer {report['layer']}"})
    heads = report["source_heads"]
    context.echo(f"copied attention layer {report['layer']} of {lm_name}: {len(heads)} QK heads from model heads "
                 f"{heads}, {model.config.ov_group_size} rank-1 OV features each (active subspace of dimension "
                 f"{report['subspace_dim']})")
    if "explained_variance" in report:
        context.echo(f"explained variance of {model.config.hook_point_out} on the initialisation tokens: "
                     f"{report['explained_variance']:.4f}")
    context.echo(f"saved the initialised Lorsa to {path}; continue training it with [pretrained] path = \"{out}\"")
    return path


def example(registry: Any, architecture: str | None = None) -> LorsaInitRunConfig:
    """Initialise a Lorsa on attention layer 3 of SmolLM2 (the examples/lorsa_init.toml settings)."""
    from lmsae.data.datasets import DatasetConfig
    from lmsae.models.transformer_lens import TransformerLensConfig
    from lmsae.sources.text_source import TextSourceConfig

    if architecture not in (None, "lorsa"):
        raise LmsaeError("the lorsa_init task builds Lorsa dictionaries only")
    dictionary = LorsaConfig(hook_point_in="blocks.3.ln1.hook_normalized", hook_point_out="blocks.3.hook_attn_out",
                             d_model=576, n_qk_heads=9, d_qk_head=64, d_sae=4608, n_ctx=128, rotary_base=100_000.0,
                             rotary_style="neox", act_fn="topk", top_k=64)
    source = TextSourceConfig(dataset=DatasetConfig(path="builtin:python-docs", split="train[:90%]"),
                              context_size=128, model_batch_size=16)
    return LorsaInitRunConfig(dictionary=dictionary, model=TransformerLensConfig(model="smollm2-135m"),
                              activations=ActivationsConfig(sources=[source], batch_size=16, layout="sequences",
                                                            prefetch=0),
                              initializer=InitializerConfig(encoder_from_decoder=False))


LORSA_INIT_SPEC = TaskSpec(config_class=LorsaInitRunConfig, factory=run, example=example,
                           summary="initialise a Lorsa from the language model's attention layer (lmsae-lorsa)")
