"""``task = "analyze"``: per-feature statistics and example contexts of a saved dictionary.

Steps: load the dictionary; stream whole sequences (``layout = "sequences"``) of its hook points;
encode them and analyse every feature (:class:`lmsae.analysis.FeatureAnalyzer`: counts, maximum,
histogram, top-activating contexts and samples by quantile of the final maximum); add the
architecture's per-feature extras (``ArchitectureSpec.analysis_extras``); record the dictionary
and the analyses in the store under ``(name, series)`` and ``analysis_name``; print a summary.
"""

from __future__ import annotations

import itertools
import pathlib
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from lmsae.activations.factory import ActivationsConfig
from lmsae.analysis.features import TOP_SAMPLING, analyze_stream, attach_extras
from lmsae.config import LanguageModelConfig, RunConfig, StoreConfig, config_class, option
from lmsae.config.fields import FieldValueError, non_empty, non_negative, positive
from lmsae.dictionary.io import PretrainedConfig, read_dictionary_config
from lmsae.errors import ConfigError, DataError, LmsaeError
from lmsae.records import TaskSpec
from lmsae.runtime import RunContext
from lmsae.stores.base import DictionaryRecord, FeatureAnalysis, Store
from lmsae.stores.configs import open_store
from lmsae.tasks.common import hook_points_of, model_loader, resolve_device, stream_builder


def _quantile_edges(_instance: Any, attribute: Any, value: list[float]) -> None:
    if (len(value) < 2 or any(not 0.0 <= e <= 1.0 for e in value) or value[-1] != 1.0
            or any(b <= a for a, b in itertools.pairwise(value))):
        raise FieldValueError(attribute.name, f"must be increasing fractions in [0, 1] ending with 1.0, got {value}")


@config_class
class AnalyzeRunConfig(RunConfig):
    """Analyse the features of a saved dictionary on a stream of sequences and store the results."""

    name: ClassVar[str] = "analyze"

    pretrained: PretrainedConfig = option(doc="The dictionary to analyse ([pretrained] table).")
    dictionary_name: str | None = option(
        None, doc="Name of the dictionary in the store (default: the name of the pretrained directory).",
        validator=non_empty())
    series: str = option("default", doc="Series (group of dictionaries) the dictionary is stored under.",
                         validator=non_empty())
    analysis_name: str = option("default", doc="Name of this analysis (a dictionary may have several).",
                                validator=non_empty())
    model: LanguageModelConfig | None = option(
        None, doc="The language model ([model] table): required by text sources, and used to decode contexts "
                  "in the summary and to record the model's name.")
    activations: ActivationsConfig = option(
        doc="Sequences to analyse ([activations] table with layout = \"sequences\"; batch_size counts sequences).")
    n_tokens: int = option(200_000, doc="Token positions to analyse (masked ones included); the last batch is "
                                        "cut to whole sequences.", validator=positive())
    n_top: int = option(16, doc="Top-activating contexts kept per feature.", validator=positive())
    n_per_quantile: int = option(8, doc="Contexts sampled per quantile band of each feature's final maximum "
                                        "(0: none).", validator=non_negative())
    quantile_edges: list[float] = option(
        factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        doc="Band edges as fractions of each feature's final maximum; band i holds contexts whose peak lies in "
            "(edges[i] * max, edges[i + 1] * max].", validator=_quantile_edges)
    histogram_bins: int = option(64, doc="Log-spaced bins (1e-4 to 1e4) of the activation histogram.",
                                 validator=positive())
    store: StoreConfig | None = option(None, doc="Where results are recorded ([store] table; default: the local "
                                                 "store).")
    device: str = option("auto", doc="Device of the dictionary and of the analysis: 'auto' (CUDA if available), "
                                     "'cpu', 'cuda', ...")
    seed: int = option(0, doc="Seed of the quantile sampling.", validator=non_negative())

    def __attrs_post_init__(self) -> None:
        if self.activations.layout != "sequences":
            problem = (f"$.activations.layout: must be \"sequences\" for feature analysis (contexts are whole "
                       f"sequences), got {self.activations.layout!r}")
            raise ConfigError([problem])


# --- shared with the other tasks that record results about a dictionary -----------------------


def dictionary_name(pretrained: PretrainedConfig, name: str | None) -> str:
    """The store name of a dictionary: ``name``, else its directory's name."""
    return name or pretrained.path.resolve().name


def record_dictionary(store: Store, registry: Any, pretrained: PretrainedConfig, name: str, series: str,
                      model_name: str | None) -> DictionaryRecord:
    """Add (or refresh) the dictionary's record: its path, its stored config.json and the model's name.

    The creation time of an existing record is kept."""
    path = pretrained.path.resolve()
    config = registry.unstructure(read_dictionary_config(path, registry))
    existing = store.get_dictionary(name, series)
    if model_name is None and existing is not None:
        model_name = existing.model_name
    record = DictionaryRecord(name=name, series=series, path=str(path), config=config, model_name=model_name,
                              created_at=existing.created_at if existing is not None else time.time())
    store.put_dictionary(record)
    return record


def record_language_model(store: Store, registry: Any, name: str, config: Any) -> None:
    """Record the language model's config under ``name`` (the dictionary records' ``model_name``),
    so later tasks (auto-interp needs its tokenizer) can rebuild it without a [model] table."""
    from lmsae.stores.base import NamedConfigRecord

    store.put_language_model(NamedConfigRecord(name=name, config=registry.unstructure(config)))


# --- the task ------------------------------------------------------------------------------------


def run(cfg: AnalyzeRunConfig, context: RunContext) -> dict[str, Any]:
    registry = context.registry
    device = resolve_device(cfg.device)
    model = cfg.pretrained.load(registry, device=device)
    name = dictionary_name(cfg.pretrained, cfg.dictionary_name)
    lm_loader = model_loader(registry, cfg.model)
    # the analysis shows its own progress bar (in tokens); the sources' bars would duplicate it
    make_stream = stream_builder(registry, cfg.activations, hook_points_of(model), progress=False,
                                 language_model=lm_loader)
    start = time.monotonic()
    stream = make_stream()
    try:
        analyses = analyze_stream(
            model, stream, n_tokens=cfg.n_tokens, device=device, progress=context.progress,
            analyzer_kwargs={"n_top": cfg.n_top, "n_per_quantile": cfg.n_per_quantile,
                             "quantile_edges": tuple(cfg.quantile_edges), "histogram_bins": cfg.histogram_bins,
                             "seed": cfg.seed})
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    seconds = time.monotonic() - start
    if not analyses or analyses[0].n_tokens == 0:
        raise DataError("the activation stream held no (unmasked) tokens to analyse")
    spec = registry.architecture(model.config.name)
    analyses = attach_extras(analyses, spec.analysis_extras, model)
    lm = lm_loader() if lm_loader is not None else None

    with open_store(registry, cfg.store) as store:
        record_dictionary(store, registry, cfg.pretrained, name, cfg.series, lm.name if lm is not None else None)
        if lm is not None and cfg.model is not None:
            record_language_model(store, registry, lm.name, cfg.model)
        store.put_feature_analyses(name, cfg.series, cfg.analysis_name, analyses)

    alive = sum(1 for a in analyses if a.act_count > 0)
    summary = {"name": name, "series": cfg.series, "analysis": cfg.analysis_name, "features": len(analyses),
               "alive": alive, "alive_fraction": alive / len(analyses), "tokens": analyses[0].n_tokens,
               "seconds": round(seconds, 2)}
    _print_summary(context, summary, analyses, getattr(lm, "tokenizer", None))
    return summary


def context_snippet(tokens: Sequence[int], activations: np.ndarray, tokenizer: Any, width: int = 12) -> str:
    """Text around the peak of ``activations`` with the peak token in «»; token ids without a tokenizer."""
    acts = np.asarray(activations)
    peak = int(acts.argmax()) if acts.size else 0
    lo, hi = max(0, peak - width), min(len(tokens), peak + width // 2 + 1)
    ids = [int(t) for t in tokens]

    def show(part: list[int]) -> str:
        if tokenizer is None:
            return " ".join(map(str, part)) + (" " if part else "")
        return tokenizer.decode(part)

    if tokenizer is None:
        text = f"{show(ids[lo:peak])}«{ids[peak]}» {show(ids[peak + 1:hi])}".strip()
    else:
        text = f"{show(ids[lo:peak])}«{show([ids[peak]])}»{show(ids[peak + 1:hi])}"
    return text.replace("\r", "").replace("\n", "↵")


def _print_summary(context: RunContext, s: dict[str, Any], analyses: list[FeatureAnalysis], tokenizer: Any) -> None:
    context.echo("")
    context.echo(f"analysed {s['features']:,} features of {s['name']!r} (series {s['series']!r}) on "
                 f"{s['tokens']:,} tokens in {s['seconds']:.1f}s")
    context.echo(f"alive: {s['alive']:,} of {s['features']:,} ({s['alive_fraction']:.1%}); stored as analysis "
                 f"{s['analysis']!r}")
    top = sorted((a for a in analyses if a.act_count > 0), key=lambda a: (-a.act_count, a.index))[:5]
    if top:
        context.echo("most frequent features:")
    for a in top:
        sampling = next((x for x in a.samplings if x.name == TOP_SAMPLING), None)
        snippet = ""
        if sampling is not None and sampling.samples:
            sample = sampling.samples[0]
            snippet = "  " + context_snippet(sample.tokens, sample.activations, tokenizer)
        context.echo(f"  #{a.index:<6} density {a.density:.2%}  max {a.max_activation:.3g}{snippet}")


def example(registry: Any, architecture: str | None = None) -> AnalyzeRunConfig:
    """Analyse the quickstart dictionary (runs/quickstart) on SmolLM2 over the built-in corpus."""
    from lmsae.data.datasets import DatasetConfig
    from lmsae.models.transformer_lens import TransformerLensConfig
    from lmsae.sources.text_source import TextSourceConfig

    if architecture is not None:
        raise LmsaeError("the analyze task reads the architecture from the saved dictionary; "
                         "it takes no architecture")
    source = TextSourceConfig(dataset=DatasetConfig(path="builtin:python-docs"), context_size=128,
                              model_batch_size=16)
    return AnalyzeRunConfig(pretrained=PretrainedConfig(path=pathlib.Path("runs/quickstart")),
                            model=TransformerLensConfig(model="smollm2-135m"),
                            activations=ActivationsConfig(sources=[source], batch_size=16, layout="sequences"),
                            n_tokens=200_000)


SPEC = TaskSpec(config_class=AnalyzeRunConfig, factory=run, example=example,
                summary="analyse the features of a saved dictionary (statistics, top and quantile contexts)")
