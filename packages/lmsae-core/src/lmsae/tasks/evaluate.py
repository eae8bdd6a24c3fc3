"""``task = "evaluate"``: measure a saved dictionary, on activations and inside the language model.

Steps:

1. load the dictionary (``[pretrained]``);
2. reconstruction metrics over ``n_tokens`` tokens of ``[activations]`` (any source);
3. the feature-density histogram over the same tokens;
4. with a ``[splice]`` table: next-token cross-entropy and KL with the dictionary spliced into
   the language model (``[model]``), on ``splice.n_tokens`` positions of text;
5. write ``output_dir/evaluation.json`` (atomically), record the dictionary and the evaluation
   in the store, log the metrics under ``eval/...`` and print a summary.

Definitions (printed once with the summary):

- reconstruction (masked tokens excluded; the dictionary's normalised space, which is the raw
  activation space for a dictionary saved with folded normalisation):

  - ``explained_variance = 1 - sum_t ||y_hat_t - y_t||^2 / sum_t ||y_t - mean(y)||^2`` with
    ``mean(y)`` over all evaluated tokens;
  - ``mse``: mean over tokens of ``||y_hat_t - y_t||^2``;
  - ``l2_ratio``: mean over tokens (label != 0) of ``||y_hat_t|| / ||y_t||`` (below 1: shrinkage);
  - ``l0``: mean number of active (> 0) features per token;
  - ``dead_fraction``: fraction of features never active on the evaluated tokens;

- feature density: fraction of evaluated tokens on which a feature is active. The histogram has
  ``density_bins`` equal-width bins of ``log10(density)`` from -7 (1e-7) to 0 (1); densities in
  (0, 1e-7) go to the first bin; features that never fired are counted in ``never_fired``
  instead, so ``sum(histogram) + never_fired = number of features`` (each element of the feature
  axes for a dictionary with several, as in ``dead_fraction``);

- splicing (:mod:`lmsae.evaluation.splice`; position t predicts token t+1; averaged over
  positions t that the activation source trains on, with a real token at t+1):

  - ``ce_clean``, ``ce_spliced``, ``ce_ablated``: mean cross-entropy in nats of the unchanged
    model, of the model with every output hook point replaced by the dictionary's prediction
    (closed loop: computed from the spliced run's own inputs), and with them replaced by zeros;
    replacements apply only where the source's mask is True (never at BOS/padding);
  - ``ce_loss_recovered = (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)``: 1 is perfect, 0 is
    no better than zero ablation (the reference system reported the inverse of this);
  - ``ce_loss_increase = ce_spliced - ce_clean``;
  - ``kl_div``: mean ``KL(p_clean || p_spliced)`` over the vocabulary; ``kl_div_ablated``: the same
    for zero ablation; ``kl_div_score = (kl_div_ablated - kl_div) / kl_div_ablated``.
"""

from __future__ import annotations

import logging
import math
import pathlib
import time
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from lmsae.activations.factory import ActivationsConfig
from lmsae.config import (
    Config,
    LanguageModelConfig,
    LoggerConfig,
    RunConfig,
    SourceConfig,
    StoreConfig,
    config_class,
    option,
)
from lmsae.config.fields import FieldValueError, non_empty, one_of, positive
from lmsae.dictionary.base import SparseDictionary
from lmsae.dictionary.io import PretrainedConfig, read_dictionary_config
from lmsae.errors import LmsaeError
from lmsae.evaluation.splice import SpliceAccumulator, splice_losses
from lmsae.logging.loggers import ConsoleLoggerConfig, JsonlLoggerConfig, LoggerContext, MultiLogger
from lmsae.records import TaskSpec
from lmsae.runtime import RunContext
from lmsae.tasks.common import model_loader, resolve_device, stream_builder
from lmsae.training.evaluation import DENSITY_LOW, density_histogram, reconstruction_statistics
from lmsae.training.state_io import atomic_write_json

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"

#: the definitions printed once with the summary (and written to evaluation.json)
DEFINITIONS: dict[str, str] = {
    "explained_variance": "1 - sum_t ||y_hat_t - y_t||^2 / sum_t ||y_t - mean(y)||^2, mean over all evaluated tokens",
    "mse": "mean over tokens of ||y_hat_t - y_t||^2 (dictionary space: raw when normalisation is folded)",
    "l2_ratio": "mean over tokens (label != 0) of ||y_hat_t|| / ||y_t|| (< 1: shrinkage)",
    "l0": "mean number of active (> 0) features per token",
    "dead_fraction": "fraction of features never active on the evaluated tokens",
    "density_histogram": "features per equal-width bin of log10(fraction of tokens a feature is active on), "
                         "1e-7 .. 1; never-fired features counted apart",
    "ce_clean / ce_spliced / ce_ablated": "mean next-token cross-entropy (nats) of the unchanged model / with the "
                                          "dictionary's predictions spliced in at its output hooks (closed loop) / "
                                          "with those hooks zeroed; only at positions the source trains on",
    "ce_loss_recovered": "(ce_ablated - ce_spliced) / (ce_ablated - ce_clean); 1 = perfect, 0 = as bad as zeros",
    "ce_loss_increase": "ce_spliced - ce_clean",
    "kl_div / kl_div_ablated": "mean KL(p_clean || p_spliced) / KL(p_clean || p_ablated) over the vocabulary (nats)",
    "kl_div_score": "(kl_div_ablated - kl_div) / kl_div_ablated",
}

_SPARK = "▁▂▃▄▅▆▇█"


def _default_loggers() -> list[LoggerConfig]:
    return [ConsoleLoggerConfig(), JsonlLoggerConfig()]


@config_class
class SpliceConfig(Config):
    """Where the text for splicing comes from, and how much of it ([splice] table)."""

    sources: list[SourceConfig] = option(
        doc="Text sources ([[splice.sources]] tables, usually type = \"text\"); read as whole sequences. Use "
            "held-out text.",
        validator=non_empty())
    batch_size: int = option(8, doc="Sequences per language-model forward pass.", validator=positive())
    n_tokens: int = option(32_768, doc="Stop after this many evaluated positions (whole batches).",
                           validator=positive())
    mode: Literal["all", "per_hook"] = option(
        "all", doc="'all': splice every output hook point at once (closed loop); 'per_hook': also splice one "
                   "output hook point at a time, the others clean (for dictionaries with several outputs, or "
                   "whose inputs come after their outputs in the forward pass).",
        validator=one_of("all", "per_hook"))


@config_class
class EvaluateRunConfig(RunConfig):
    """Evaluate a saved dictionary: reconstruction, feature density and (optionally) spliced CE/KL."""

    name: ClassVar[str] = "evaluate"

    pretrained: PretrainedConfig = option(doc="The saved dictionary ([pretrained] table).")
    dictionary_name: str | None = option(
        None, doc="Name of the dictionary in the store (default: the name of pretrained.path's directory).",
        validator=non_empty())
    series: str = option("default", doc="Series of the dictionary in the store.", validator=non_empty())
    evaluation_name: str = option("default", doc="Name of this evaluation in the store (a later evaluation with "
                                                 "the same name replaces it).", validator=non_empty())
    activations: ActivationsConfig = option(
        doc="Activations for the reconstruction metrics and feature density ([activations] table; any source).")
    model: LanguageModelConfig | None = option(
        None, doc="The language model ([model] table): needed by text sources and by [splice].")
    splice: SpliceConfig | None = option(
        None, doc="Splice the dictionary into the language model and measure CE loss recovered and KL "
                  "([splice] table; unset: reconstruction metrics only).")
    n_tokens: int = option(100_000, doc="Tokens for the reconstruction metrics and feature density (whole batches).",
                           validator=positive())
    density_bins: int = option(50, doc="Bins of the log10 feature-density histogram (1e-7 to 1).",
                               validator=positive())
    store: StoreConfig | None = option(
        None, doc="Where the dictionary record and the results go ([store] table; unset: the local store).")
    loggers: list[LoggerConfig] = option(factory=_default_loggers,
                                         doc="Metric loggers ([[loggers]] tables); metrics are logged as eval/<name>.")
    output_dir: pathlib.Path = option(pathlib.Path("runs/evaluate"),
                                      doc="Where evaluation.json (and the loggers' files) are written.")
    device: str = option("auto", doc="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1', ... for the "
                                     "dictionary during the reconstruction metrics.")

    def __attrs_post_init__(self) -> None:
        if self.splice is not None and self.model is None:
            raise FieldValueError("splice", "splicing needs the language model: add a [model] table")


# --- the run -----------------------------------------------------------------------------------


def _checked(stream: Any, model: SparseDictionary) -> Iterator[dict[str, Any]]:
    first = True
    for batch in stream:
        if first:
            model.check_batch(batch)  # a clear error naming the hook point instead of a matmul error
            first = False
        yield batch


def _attention_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """A right-padding attention mask: real up to the last position the source trains on.

    Text-source chunks carry only the training mask (False at padding, at the prepended BOS and
    at ignored ids); positions after the last True one are padding or, at worst, masked tokens at
    the end of a window, which then do not count as prediction targets."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1, keepdim=True).values
    return (positions[None, :] <= last).long()


def _token_batches(cfg: SpliceConfig, context: RunContext, lm: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(tokens, mask)`` batches of ``cfg.batch_size`` sequences, the sources read one after the other.

    The sources run without hook points (token-only chunks: the language model runs only inside
    :func:`splice_losses`); a batch never mixes context sizes."""
    from lmsae.activations.protocol import SourceContext

    source_context = SourceContext(hook_points=(), layout="sequences", seed=0, registry=context.registry,
                                   progress=False, language_model=lambda: lm)
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    rows = 0

    def flush() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal held, rows
        tokens = torch.cat([t for t, _ in held])
        mask = torch.cat([m for _, m in held])
        held, rows = [], 0
        return tokens, mask

    for source_config in cfg.sources:
        source = context.registry.get("source", source_config.name).factory(source_config, source_context)
        for chunk in source:
            tokens = chunk["tokens"]
            mask = chunk.get("mask")
            mask = torch.ones(tokens.shape, dtype=torch.bool) if mask is None else mask.bool()
            if held and held[0][0].shape[1] != tokens.shape[1]:
                yield flush()
            start = 0
            while start < tokens.shape[0]:
                take = min(cfg.batch_size - rows, tokens.shape[0] - start)
                held.append((tokens[start:start + take], mask[start:start + take]))
                rows += take
                start += take
                if rows == cfg.batch_size:
                    yield flush()
    if held:
        yield flush()


def _splice_metrics(cfg: EvaluateRunConfig, context: RunContext, lm: Any, model: SparseDictionary) -> dict[str, float]:
    splice = cfg.splice
    model = model.to(lm.device)
    acc = SpliceAccumulator()
    bar = None
    if context.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=splice.n_tokens, unit="tok", desc="splice", dynamic_ncols=True)
    try:
        for tokens, mask in _token_batches(splice, context, lm):
            n = acc.update(splice_losses(lm, model, tokens, _attention_from_mask(mask), mask, mode=splice.mode))
            if bar is not None:
                bar.update(n)
            if acc.n_tokens >= splice.n_tokens:
                break
    finally:
        if bar is not None:
            bar.close()
    if acc.n_tokens == 0:
        raise LmsaeError("the [splice] sources produced no evaluated position (empty dataset, or every position "
                         "masked)")
    return acc.metrics()


def run(cfg: EvaluateRunConfig, context: RunContext) -> dict[str, Any]:
    registry = context.registry
    start = time.monotonic()
    device = resolve_device(cfg.device)
    model = cfg.pretrained.load(registry, device=device)
    stored_config = registry.unstructure(read_dictionary_config(cfg.pretrained.path, registry))
    name = cfg.dictionary_name or cfg.pretrained.path.resolve().name
    hooks = tuple(model.config.hook_points)
    lm_loader = model_loader(registry, cfg.model)

    make_stream = stream_builder(registry, cfg.activations, hooks, progress=context.progress,
                                 language_model=lm_loader)
    stats = reconstruction_statistics(model, _checked(make_stream(), model), cfg.n_tokens, device=device)
    if stats.n_tokens == 0:
        raise LmsaeError("the [activations] stream produced no token to evaluate on")
    hist = density_histogram(stats.fire_counts, stats.n_tokens, bins=cfg.density_bins, low=DENSITY_LOW)
    metrics: dict[str, float] = {k: float(v) for k, v in stats.metrics.items()}
    metrics["never_fired"] = float(hist.never_fired)

    splice_metrics: dict[str, float] = {}
    if cfg.splice is not None:
        splice_metrics = _splice_metrics(cfg, context, lm_loader(), model)
        metrics.update({("splice_n_tokens" if k == "n_tokens" else k): v for k, v in splice_metrics.items()})

    model_name = None
    if cfg.model is not None:
        # the loaded model's name when it ran; the configured one otherwise (cached activations)
        model_name = lm_loader().name if cfg.splice is not None else getattr(cfg.model, "model", None)
    plain = registry.unstructure(cfg)
    result: dict[str, Any] = {
        "dictionary": name,
        "series": cfg.series,
        "evaluation": cfg.evaluation_name,
        "path": str(cfg.pretrained.path.resolve()),
        "model_name": model_name,
        "metrics": metrics,
        # MSE is measured where the dictionary works: raw activations once normalisation is folded
        "metric_space": "raw" if model.config.normalization == "none" else "normalised",
        "density_histogram": {"counts": hist.counts.tolist(), "log10_edges": hist.edges.tolist(),
                              "never_fired": hist.never_fired, "n_features": hist.n_features},
        "definitions": DEFINITIONS,
        "seconds": round(time.monotonic() - start, 2),
        "config": plain,
    }
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / EVALUATION_FILE, _json_safe(result))

    _record_in_store(cfg, context, name, stored_config, model_name, metrics, hist, plain)

    logger_ctx = LoggerContext(output_dir=out, run_name=f"{name}/{cfg.evaluation_name}", config=plain)
    loggers = MultiLogger([registry.get("logger", lc.name).factory(lc, logger_ctx) for lc in cfg.loggers])
    try:
        logged = {f"eval/{k}": v for k, v in metrics.items()}
        loggers.log(0, logged)
        loggers.log_summary(logged)
    finally:
        loggers.close()
    _print_summary(context, result, hist, out)
    return result


def _json_safe(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _record_in_store(cfg: EvaluateRunConfig, context: RunContext, name: str, stored_config: dict[str, Any],
                     model_name: str | None, metrics: dict[str, float], hist: Any, plain: dict[str, Any]) -> None:
    from lmsae.stores.base import DictionaryRecord, EvaluationRecord
    from lmsae.stores.configs import open_store

    now = time.time()
    store = open_store(context.registry, cfg.store)
    try:
        store.put_dictionary(DictionaryRecord(name=name, series=cfg.series, path=str(cfg.pretrained.path.resolve()),
                                              config=stored_config, model_name=model_name, created_at=now))
        if model_name is not None and cfg.model is not None:
            from lmsae.tasks.analyze import record_language_model

            record_language_model(store, context.registry, model_name, cfg.model)
        store.put_evaluation(name, cfg.series, EvaluationRecord(
            name=cfg.evaluation_name, metrics=dict(metrics),
            arrays={"density_histogram": np.asarray(hist.counts, dtype=np.int64),
                    "density_edges": np.asarray(hist.edges, dtype=np.float64)},
            config=plain, created_at=now))
    finally:
        store.close()


# --- printing ------------------------------------------------------------------------------------


def sparkline(counts: Any) -> str:
    """One character per bin: blank for 0, else ▁..█ in proportion to the largest count."""
    values = [int(c) for c in counts]
    top = max(values, default=0)
    if top == 0:
        return " " * len(values)
    return "".join(" " if v == 0 else _SPARK[min(len(_SPARK) - 1, math.ceil(v / top * len(_SPARK)) - 1)]
                   for v in values)


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _print_summary(context: RunContext, result: dict[str, Any], hist: Any, out: pathlib.Path) -> None:
    m = result["metrics"]
    echo = context.echo
    echo("")
    echo(f"evaluation {result['evaluation']!r} of dictionary {result['dictionary']!r} (series {result['series']!r}) "
         f"on {int(m['n_tokens']):,} tokens:")
    echo(f"  explained variance  {_fmt(m['explained_variance'], '.4f')}")
    echo(f"  MSE                 {_fmt(m['mse'], '.4g')}   ({result['metric_space']} activation space)")
    echo(f"  L2 ratio            {_fmt(m['l2_ratio'], '.4f')}")
    echo(f"  L0                  {_fmt(m['l0'], '.2f')}")
    echo(f"  dead fraction       {_fmt(m['dead_fraction'], '.2%')}")
    width = (hist.edges[1] - hist.edges[0]) if len(hist.edges) > 1 else float("nan")
    echo(f"  feature density     1e-7 |{sparkline(hist.counts)}| 1   (log10 bins of {width:.3g}; "
         f"{hist.never_fired:,} of {hist.n_features:,} features never fired)")
    if "ce_clean" in m:
        echo(f"spliced into the language model ({int(m['splice_n_tokens']):,} positions):")
        if "ce_spliced" in m:
            echo(f"  CE clean / spliced / ablated  {_fmt(m['ce_clean'], '.4f')} / {_fmt(m['ce_spliced'], '.4f')} / "
                 f"{_fmt(m['ce_ablated'], '.4f')} nats")
            echo(f"  CE loss recovered   {_fmt(m['ce_loss_recovered'], '.4f')}   (CE increase "
                 f"{_fmt(m['ce_loss_increase'], '.4f')} nats)")
            echo(f"  KL spliced / ablated  {_fmt(m['kl_div'], '.4g')} / {_fmt(m['kl_div_ablated'], '.4g')} nats   "
                 f"(KL score {_fmt(m['kl_div_score'], '.4f')})")
        else:
            echo(f"  CE clean            {_fmt(m['ce_clean'], '.4f')} nats")
        hooks = sorted(k[len("ce_spliced/"):] for k in m if k.startswith("ce_spliced/"))
        if len(hooks) == 1 and "ce_spliced" in m:
            hooks = []  # one output hook: its numbers are the joint ones printed above
        for hook in hooks:
            echo(f"  {hook}: CE spliced {_fmt(m['ce_spliced/' + hook], '.4f')}, loss recovered "
                 f"{_fmt(m['ce_loss_recovered/' + hook], '.4f')}, KL {_fmt(m['kl_div/' + hook], '.4g')}")
    echo("definitions:")
    for key, text in DEFINITIONS.items():
        if key.startswith(("ce_", "kl_")) and "ce_clean" not in m:
            continue
        echo(f"  {key}: {text}")
    echo(f"wrote {out / EVALUATION_FILE}")


# --- example -------------------------------------------------------------------------------------


def example(registry: Any, architecture: str | None = None) -> EvaluateRunConfig:
    """Evaluate the quickstart dictionary (runs/quickstart) on held-out text, spliced into SmolLM2."""
    from lmsae.data.datasets import DatasetConfig
    from lmsae.models.transformer_lens import TransformerLensConfig
    from lmsae.sources.text_source import TextSourceConfig

    if architecture is not None:
        raise LmsaeError("the evaluate task reads the architecture from the saved dictionary; "
                         "it does not take one")
    held_out = DatasetConfig(path="builtin:python-docs", split="train[90%:]")
    return EvaluateRunConfig(
        pretrained=PretrainedConfig(path=pathlib.Path("runs/quickstart")),
        model=TransformerLensConfig(model="smollm2-135m"),
        activations=ActivationsConfig(sources=[TextSourceConfig(dataset=held_out, context_size=128,
                                                                model_batch_size=16)],
                                      batch_size=2048, prefetch=0),
        splice=SpliceConfig(sources=[TextSourceConfig(dataset=held_out, context_size=128, model_batch_size=8)],
                            batch_size=8, n_tokens=16_384),
        n_tokens=65_536,
        output_dir=pathlib.Path("runs/quickstart-eval"),
    )


SPEC = TaskSpec(config_class=EvaluateRunConfig, factory=run, example=example,
                summary="evaluate a saved dictionary: reconstruction, feature density, spliced CE loss and KL")
