"""``task = "sweep"``: train several dictionaries in lockstep on one activation stream.

A sweep reads its activations once: every batch of ``[activations]`` (one language-model pass) is
handed to every item's trainer in turn, so N dictionaries cost one stream instead of N. Typical
use: a learning-rate or ``top_k`` sweep on one hook point, or dictionaries of several hook points
of one model (the stream reads the union of the items' hook points; the language model stops
after the deepest one).

Config layout::

    task = "sweep"
    output_dir = "runs/sweep"        # item NAME writes output_dir/NAME/ (what a train run writes)

    [model] ...                      # shared: the language model
    [activations] ...                # shared: the one stream (layout, batch size, shuffling, seed)
    [eval_activations] ...           # optional, shared: held-out evaluation (read once, cached)
    [trainer] ...                    # shared trainer settings (every key of a train run's [trainer])
    [initializer] ...                # optional, shared initialisation settings

    [[items]]
    name = "k32"                     # a safe directory name, unique in the sweep
    trainer = { lr = 1e-3 }          # optional: keys overriding the shared [trainer] for this item
    initializer = { seed = 1 }       # optional: keys overriding the shared [initializer]
    [items.dictionary]               # the item's full dictionary table (any installed architecture)
    architecture = "sae"
    ...

    [distributed]
    sweep = 2                        # optional: items i with i % 2 == rank train on that rank

Per-item settings: ``[trainer]`` and ``[initializer]`` are shared; an item's ``trainer`` and
``initializer`` tables override single keys of them (checked like the shared table, errors name
``$.items[i].trainer.KEY``). The trainer ``type`` is shared by every item. Each item's dictionary
is its own full table.

What every item gets is exactly what ``task = "train"`` would give it with the same
``[activations]``: the same batches in the same order, the same calibration batches and dataset
norms (estimated once per hook point from one pass over the start of the stream and shared; items
asking for different ``calibration_batches`` get one estimate per distinct count), the same
initialisation batch and seeds, its own random-number state — so an item's saved weights are
bit-identical to a separate train run of :func:`item_train_config` (written to
``output_dir/NAME/run_config.json``: ``lmsae run`` on it reproduces the item alone).

Items may train for different ``total_training_tokens``: an item that is done is evaluated and
saved at once (its memory is freed) and stops being stepped while the others continue; the stream
ends when every item is done. If the stream runs out first, each unfinished item follows its own
``on_stream_end`` ('finish' saves what was learnt; 'error' makes the sweep fail at the end, after
the other items were saved). Each batch goes to the items in their order; ``[eval_activations]``
is read once as well: its batches are kept in memory (up to the largest ``eval_tokens``) and
replayed to every evaluation.

Output: ``output_dir/NAME/`` holds config.json + weights, training_summary.json, metrics.jsonl /
summary.json (its loggers) and run_config.json; ``output_dir/run_config.json`` is the sweep config
and ``output_dir/sweep_summary.json`` gathers every item's summary and the stream's throughput.
Console lines are prefixed with the item's name and go where the task reports (stdout under the CLI); one
progress bar counts the stream's batches.

Distribution: ``[distributed] sweep = N`` (launch with ``torchrun --nproc-per-node N``) splits the
items over N processes (item i on sweep rank ``i % N``); every rank builds the same stream (same
batches in the same order, with the hook points of its own items) and trains its share. The other axes (data, model, head)
must be 1 in a sweep. Not supported (yet): resumable checkpoints (``n_checkpoints``), ``resume``,
``[pretrained]`` items and ``[after_training]``.
"""

from __future__ import annotations

import copy
import logging
import pathlib
import re
import shutil
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import attrs
import torch
from tqdm.auto import tqdm

from lmsae.activations.factory import ActivationsConfig
from lmsae.config import (
    DictionaryConfig,
    LanguageModelConfig,
    LoggerConfig,
    RunConfig,
    TrainerConfig,
    config_class,
    option,
)
from lmsae.config.fields import FieldValueError
from lmsae.dictionary.base import SparseDictionary
from lmsae.dictionary.io import save_dictionary
from lmsae.distributed.mesh import DistributedConfig, Mesh, build_mesh
from lmsae.errors import ConfigError, DataError, LmsaeError
from lmsae.logging.loggers import (
    ConsoleLogger,
    ConsoleLoggerConfig,
    JsonlLoggerConfig,
    LoggerContext,
    MetricLogger,
    MultiLogger,
)
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
from lmsae.training.trainer import TrainResult, _to_device, list_checkpoints

log = logging.getLogger(__name__)

__all__ = ["SPEC", "SweepItemConfig", "SweepRunConfig", "item_train_config", "run"]

#: item names: a letter or digit, then letters, digits, '.', '_' or '-' (at most 100 characters)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
#: files of the sweep itself in output_dir
SWEEP_SUMMARY = "sweep_summary.json"
SWEEP_CONFIG = "run_config.json"


def _default_loggers() -> list[LoggerConfig]:
    return [ConsoleLoggerConfig(), JsonlLoggerConfig()]


@config_class
class SweepItemConfig:
    """One dictionary of a sweep (an ``[[items]]`` table)."""

    name: str = option(doc="Name of the item: its directory under output_dir and the prefix of its console lines. "
                           "Letters, digits, '.', '_' and '-', starting with a letter or digit; unique in the "
                           "sweep (ignoring case).")
    dictionary: DictionaryConfig = option(doc="The item's dictionary ([items.dictionary] table with its architecture).")
    trainer: dict[str, Any] = option(
        factory=dict, doc="Keys overriding the shared [trainer] table for this item (e.g. { lr = 1e-3 }); the "
                          "trainer type is shared.")
    initializer: dict[str, Any] = option(
        factory=dict, doc="Keys overriding the shared [initializer] table for this item (e.g. { seed = 1 }).")


@config_class
class SweepRunConfig(RunConfig):
    """Train several dictionaries in lockstep on one activation stream (one language-model pass per batch)."""

    name: ClassVar[str] = "sweep"

    items: list[SweepItemConfig] = option(
        doc="The dictionaries to train ([[items]] tables: name, dictionary, optional trainer / initializer "
            "overrides). Every item gets every batch of [activations], in the same order.")
    activations: ActivationsConfig = option(
        doc="The one activation stream of the sweep ([activations] table); it provides the union of the items' "
            "hook points.")
    trainer: TrainerConfig = option(
        doc="Trainer settings shared by the items ([trainer] table; items override single keys).")
    initializer: InitializerConfig = option(
        factory=InitializerConfig, doc="Initialisation shared by the items ([initializer] table; items override "
                                       "single keys).")
    model: LanguageModelConfig | None = option(
        None, doc="The language model ([model] table) that text sources run, loaded once.")
    eval_activations: ActivationsConfig | None = option(
        None, doc="Held-out activations for periodic and final evaluation, read once and shared by the items "
                  "(None: each item's final report uses its last training window).")
    loggers: list[LoggerConfig] = option(
        factory=_default_loggers, doc="Metric loggers of every item ([[loggers]] tables; files go to "
                                      "output_dir/NAME/, console lines start with [NAME]).")
    output_dir: pathlib.Path = option(pathlib.Path("runs/sweep"),
                                      doc="Item NAME writes to output_dir/NAME/; the sweep's summary goes here.")
    run_name: str | None = option(None, doc="Name of the sweep; item runs are called RUN_NAME/NAME (default: each "
                                            "item's directory name).")
    overwrite: bool = option(False, doc="Allow replacing previous results in the items' directories.")
    device: str = option("auto", doc="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "float64"] = option("float32", doc="Parameter dtype of every item.")
    fold_normalization: bool = option(True, doc="Fold dataset-wise normalisation into each saved dictionary.")
    distributed: DistributedConfig = option(
        factory=DistributedConfig, doc="Process mesh ([distributed] table): sweep = N splits the items over N "
                                       "processes (item i on sweep rank i % N); the other axes must be 1.")

    def __attrs_post_init__(self) -> None:
        problems = _validate(self)
        if problems:
            raise ConfigError(problems)

    def item_trainer(self, index: int) -> TrainerConfig:
        """The trainer config of item ``index``: [trainer] with the item's overrides."""
        return _merge(self.trainer, self.items[index].trainer, f"$.items[{index}].trainer")

    def item_initializer(self, index: int) -> InitializerConfig:
        """The initializer config of item ``index``: [initializer] with the item's overrides."""
        return _merge(self.initializer, self.items[index].initializer, f"$.items[{index}].initializer")


# --- validation -----------------------------------------------------------------------------

_PLAIN: list[Any] = []


def _plain_converter() -> Any:
    """A strict converter for plain config classes (the trainer and initializer tables): the same
    scalar rules as a run config, without the registry (these tables hold no tagged sub-tables)."""
    if not _PLAIN:
        from lmsae.config.converter import make_converter

        _PLAIN.append(make_converter(None))  # type: ignore[arg-type]
    return _PLAIN[0]


def _merge(shared: Any, overrides: Mapping[str, Any], path: str) -> Any:
    """``shared`` with the keys of ``overrides`` replaced, structured (and validated) again.

    Raises :class:`ConfigError` with problems located under ``path``.
    """
    if not overrides:
        return shared
    from lmsae.config.converter import structure

    problems = []
    overrides = dict(overrides)
    if isinstance(shared, TrainerConfig) and "type" in overrides:
        problems.append(f"{path}.type: the trainer type is shared by every item of a sweep; set it in the "
                        "[trainer] table")
        del overrides["type"]
    conv = _plain_converter()
    data = conv.unstructure(shared, unstructure_as=type(shared))
    data.update(overrides)
    try:
        merged = structure(types.SimpleNamespace(converter=conv), data, type(shared))
    except ConfigError as exc:
        problems += [path + p[1:] if p.startswith("$") else f"{path}: {p}" for p in exc.problems]
    if problems:
        raise ConfigError(problems)
    return merged


def _validate(cfg: SweepRunConfig) -> list[str]:
    problems: list[str] = []
    if not cfg.items:
        return ["$.items: a sweep needs at least one item ([[items]] tables with a name and a [items.dictionary])"]
    seen: dict[str, int] = {}
    for i, item in enumerate(cfg.items):
        where = f"$.items[{i}]"
        if not _NAME.match(item.name) or item.name.lower().endswith(".json"):
            problems.append(f"{where}.name: {item.name!r} is not a safe directory name (use letters, digits, '.', "
                            "'_' and '-', starting with a letter or digit, at most 100 characters, not ending in "
                            "'.json')")
        key = item.name.lower()
        if key in seen:
            problems.append(f"{where}.name: duplicate item name {item.name!r} (also $.items[{seen[key]}].name; names "
                            "are directories and must differ ignoring case)")
        else:
            seen[key] = i
        merged = True
        for what in ("trainer", "initializer"):
            try:
                getattr(cfg, f"item_{what}")(i)
            except ConfigError as exc:
                problems.extend(exc.problems)
                merged = False
        if merged:
            try:
                trainer = cfg.item_trainer(i)
                if getattr(trainer, "n_checkpoints", 0):
                    at = f"{where}.trainer" if "n_checkpoints" in item.trainer else "$.trainer"
                    problems.append(f"{at}.n_checkpoints: the sweep task writes no resumable checkpoints; set it "
                                    "to 0 (train an item alone with task = 'train' for checkpoints)")
                item_train_config(cfg, i)
            except FieldValueError as exc:
                problems.append(f"{where}.{exc.field}: {exc.message}")
            except ConfigError as exc:
                problems.extend(exc.problems)
    dist_cfg = cfg.distributed
    for axis in ("data", "model", "head"):
        if getattr(dist_cfg, axis) != 1:
            problems.append(f"$.distributed.{axis}: a sweep splits its items over the 'sweep' axis only; set "
                            f"{axis} = 1 (or train the item alone with task = 'train')")
    if dist_cfg.sweep > len(cfg.items):
        problems.append(f"$.distributed.sweep: {dist_cfg.sweep} sweep processes for {len(cfg.items)} item(s) would "
                        "leave a process without an item; use at most the number of items")
    # a problem of a shared table ($.trainer, $.activations...) is found once per item: report it once
    return list(dict.fromkeys(problems))


def item_train_config(cfg: SweepRunConfig, index: int) -> Any:
    """The ``task = "train"`` config that trains item ``index`` alone, exactly as the sweep does."""
    from lmsae.tasks.train import TrainRunConfig

    item = cfg.items[index]
    return TrainRunConfig(
        dictionary=item.dictionary, activations=cfg.activations, trainer=cfg.item_trainer(index),
        initializer=cfg.item_initializer(index), model=cfg.model, eval_activations=cfg.eval_activations,
        loggers=list(cfg.loggers), output_dir=cfg.output_dir / item.name,
        run_name=f"{cfg.run_name}/{item.name}" if cfg.run_name else None, overwrite=cfg.overwrite,
        device=cfg.device, dtype=cfg.dtype, fold_normalization=cfg.fold_normalization)


def _check_against_registry(cfg: SweepRunConfig, registry: Any) -> None:
    """Checks that need the installed plugins: layouts, hook widths, capabilities (every item, every rank)."""
    problems: list[str] = []
    layout = cfg.activations.layout
    widths: dict[str, tuple[int, int]] = {}
    for i, item in enumerate(cfg.items):
        where = f"$.items[{i}].dictionary"
        spec = registry.architecture(item.dictionary.name)
        if getattr(spec.model_class, "needs_sequences", False) and layout != "sequences":
            problems.append(f"{where}.architecture: architecture {item.dictionary.name!r} needs whole sequences but "
                            f"the sweep's stream has layout = {layout!r}; every item trains on the same batches, so "
                            "set [activations] layout = 'sequences' (other items train on sequences too) or move "
                            "this item to another sweep")
        if cfg.item_initializer(i).from_language_model and not callable(
                getattr(spec.model_class, "initialize_from_language_model", None)):
            problems.append(f"$.items[{i}].initializer.from_language_model: architecture {item.dictionary.name!r} "
                            "cannot initialise from a language model (it has no initialize_from_language_model)")
        try:
            with torch.device("meta"):
                dims = spec.model_class(item.dictionary).hook_dims()
        except Exception:  # an architecture that cannot be built on the meta device: its batch check still runs
            log.debug("sweep item %s: hook widths not checked before the run", item.name, exc_info=True)
            continue
        for hook, d in dims.items():
            if hook in widths and widths[hook][0] != d:
                d0, j = widths[hook]
                problems.append(f"{where}: hook point {hook!r} is {d} wide here but {d0} wide in $.items[{j}] "
                                f"({cfg.items[j].name!r}); both read the same stream")
            widths.setdefault(hook, (d, i))
        trainer = cfg.item_trainer(i)
        trainer_spec = registry.get("trainer", trainer.name)
        cls = getattr(trainer_spec, "factory", None)
        if isinstance(cls, type) and not all(callable(getattr(cls, m, None)) for m in ("setup", "train_step")):
            problems.append(f"$.trainer.type: trainer {trainer.name!r} cannot train in lockstep (it has no "
                            "setup()/train_step() methods)")
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index))


def _check_outputs(cfg: SweepRunConfig) -> None:
    for item in cfg.items:
        out = cfg.output_dir / item.name
        previous = (out / "config.json").exists() or bool(list_checkpoints(out))
        if previous and not cfg.overwrite:
            raise LmsaeError(f"{out} already holds results of a run; set overwrite = true to replace them")


# --- loggers ----------------------------------------------------------------------------------


class _ItemConsoleLogger(ConsoleLogger):
    """The console logger with the item's name in front of every line."""

    def __init__(self, config: ConsoleLoggerConfig, prefix: str, stream: Any = None):
        super().__init__(config, stream=stream)
        self.prefix = prefix

    def format_line(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        line = super().format_line(step, metrics)
        return None if line is None else f"[{self.prefix}] {line}"


def _item_loggers(registry: Any, cfg: SweepRunConfig, name: str, out: pathlib.Path, plain: dict[str, Any],
                  run_name: str, stream: Any = None) -> MultiLogger:
    ctx = LoggerContext(output_dir=out, run_name=run_name, config=plain, resume=False, rank=0)
    loggers: list[MetricLogger] = []
    for lc in cfg.loggers:
        if type(lc) is ConsoleLoggerConfig:
            loggers.append(_ItemConsoleLogger(lc, name, stream))
        else:
            loggers.append(registry.get("logger", lc.name).factory(lc, ctx))
    return MultiLogger(loggers)


# --- the shared held-out stream -------------------------------------------------------------


class _SharedBatches:
    """Batches of one stream, read once on demand and replayed to every reader.

    Each iteration starts from the first batch; batches not read yet are pulled from the stream
    (built on first use) and kept. Readers stop when they have enough tokens, so the cache holds
    what the most demanding reader needed (for evaluation: the largest eval_tokens).
    """

    def __init__(self, make: Callable[[], Any]):
        self._make = make
        self._stream: Any = None
        self._it: Iterator[Any] | None = None
        self._batches: list[Any] = []
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        i = 0
        while True:
            if i < len(self._batches):
                yield self._batches[i]
                i += 1
                continue
            if self._done:
                return
            if self._it is None:
                self._stream = self._make()
                self._it = iter(self._stream)
            nxt = next(self._it, None)
            if nxt is None:
                self._done = True
                self.close()
                return
            self._batches.append(nxt)

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if callable(close):
            close()


# --- one item ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Item:
    index: int
    name: str
    out: pathlib.Path
    model: SparseDictionary
    trainer_config: Any
    trainer: Any = None
    loggers: MultiLogger | None = None
    rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None
    ctx: dict[str, Any] | None = None
    stop_reason: str | None = None
    result: TrainResult | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None

    def setting(self, key: str, default: Any) -> Any:
        return getattr(self.trainer_config, key, default)


def _batch_rows(batch: Mapping[str, Any]) -> int:
    """Token positions of a batch, counted the way the trainer counts tokens_per_batch."""
    mask = batch.get("mask")
    if mask is not None:
        return int(mask.numel())
    return int(next(v for v in batch.values() if isinstance(v, torch.Tensor) and v.is_floating_point()).shape[0])


# --- the task ---------------------------------------------------------------------------------


def run(cfg: SweepRunConfig, context: RunContext) -> dict[str, Any]:
    """Train the sweep's items on this process; returns the sweep summary (every item, every rank)."""
    registry = context.registry
    start = time.monotonic()
    _check_against_registry(cfg, registry)
    _check_outputs(cfg)
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    mesh = build_mesh(cfg.distributed, device)
    n_sweep, coord = mesh.size("sweep"), mesh.coord("sweep")
    mine = [i for i in range(len(cfg.items)) if i % n_sweep == coord]
    say = context.echo if mesh.is_primary else (lambda *_a, **_k: None)
    if mesh.is_distributed:
        say(f"sweep over {mesh.describe()}: {len(cfg.items)} items, {len(mine)} on this rank")

    hooks: dict[str, None] = {}
    for i in mine:
        for h in cfg.items[i].dictionary.hook_points:
            hooks.setdefault(h, None)
    hook_points = tuple(hooks)
    lm = model_loader(registry, cfg.model)
    make_stream = stream_builder(registry, cfg.activations, hook_points, progress=context.progress and mesh.is_primary,
                                 language_model=lm)
    shared_eval = (_SharedBatches(stream_builder(registry, cfg.eval_activations, hook_points, progress=False,
                                                 language_model=lm))
                   if cfg.eval_activations is not None else None)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    if mesh.is_primary:
        atomic_write_json(cfg.output_dir / SWEEP_CONFIG, registry.unstructure(cfg))

    from lmsae.tasks.train import build_model

    items: list[_Item] = []
    for i in mine:
        item = cfg.items[i]
        out = cfg.output_dir / item.name
        if cfg.overwrite:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        items.append(_Item(index=i, name=item.name, out=out, model=build_model(context, item.dictionary, dtype),
                           trainer_config=cfg.item_trainer(i)))

    try:
        _calibrate_and_initialize(cfg, items, make_stream, hook_points, lm, dtype, say)
        for it in items:
            _build_trainer(cfg, registry, it, device, shared_eval, context)
        stream_stats = _train(cfg, registry, items, make_stream, device, dtype, shared_eval, start, context, mesh)
    finally:
        for it in items:
            if it.loggers is not None:
                it.loggers.close()
        if shared_eval is not None:
            shared_eval.close()

    seconds = time.monotonic() - start
    mine_rows = [{"name": it.name, "index": it.index, "rank": mesh.rank, "output_dir": str(it.out),
                  **(it.summary or {"reason": "error", "message": it.error or "not trained"})} for it in items]
    rows = _gather(mesh, mine_rows)
    rows.sort(key=lambda r: r["index"])
    trained = sum(int(r.get("tokens", 0)) for r in rows)
    summary = {"items": rows, "mesh": mesh.describe(), "seconds": round(seconds, 2),
               "stream": {**stream_stats, "tokens_per_second": stream_stats["tokens"] / max(seconds, 1e-9)},
               "dictionary_tokens": trained, "dictionary_tokens_per_second": trained / max(seconds, 1e-9)}
    if mesh.is_primary:
        atomic_write_json(cfg.output_dir / SWEEP_SUMMARY, summary)
        _print_table(say, summary, cfg.output_dir)
    failed = [it for it in items if it.error is not None]
    if failed:
        raise DataError("; ".join(f"item {it.name!r}: {it.error}" for it in failed))
    return summary


def _calibrate_and_initialize(cfg: SweepRunConfig, items: Sequence[_Item], make_stream: Callable[[], Any],
                              hook_points: tuple[str, ...], lm: Any, dtype: torch.dtype, say: Callable) -> None:
    """Dataset norms from one calibration pass (once per hook point and batch count), then each item's init."""
    need: dict[int, list[_Item]] = {}
    wanted = 1
    for it in items:
        if it.model.config.normalization == "dataset" and not it.model.config.dataset_norms:
            n = int(it.setting("calibration_batches", 8))
            need.setdefault(n, []).append(it)
            wanted = max(wanted, n)
    stream = make_stream()
    try:
        calibration = take(stream, wanted)
    finally:
        close = getattr(stream, "close", None)
        if callable(close):
            close()
    if not calibration:
        raise LmsaeError("the activation stream is empty")
    for it in items:
        try:
            it.model.check_batch(calibration[0])
        except DataError as exc:
            raise DataError(f"sweep item {it.name!r}: {exc}") from None
    for n, group in sorted(need.items()):
        hooks = tuple(dict.fromkeys(h for it in group for h in it.model.config.hook_points))
        norms, n_tokens = estimate_dataset_norms(calibration[:n], hooks)
        for it in group:
            it.model.config = attrs.evolve(it.model.config,
                                           dataset_norms={h: norms[h] for h in it.model.config.hook_points})
        shown = ", ".join(f"{h}: {v:.4g}" for h, v in norms.items())
        say(f"dataset norms estimated from {n} batches ({n_tokens:,} tokens, a separate pass over the start of the "
            f"stream; training still sees them), shared by {len(group)} item(s): {shown}")
    raw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in calibration[0].items()}
    for it in items:
        init_cfg = cfg.item_initializer(it.index)
        report = initialize(it.model, init_cfg, raw)
        if report:
            log.info("sweep item %s: initialisation: %s", it.name, report)
        if init_cfg.from_language_model:
            generator = torch.Generator().manual_seed(init_cfg.seed)
            it.model.initialize_from_language_model(lm(), raw, generator)
            say(f"[{it.name}] initialised from the language model")


def _build_trainer(cfg: SweepRunConfig, registry: Any, it: _Item, device: torch.device,
                   shared_eval: _SharedBatches | None, context: RunContext) -> None:
    train_cfg = item_train_config(cfg, it.index)
    plain = registry.unstructure(train_cfg)
    atomic_write_json(it.out / "run_config.json", plain)
    it.loggers = _item_loggers(registry, cfg, it.name, it.out, plain, train_cfg.run_name or it.out.resolve().name,
                               stream=context.out)
    eval_tokens = it.setting("eval_tokens", 100_000)
    eval_fn = ((lambda m: evaluate_reconstruction(m, shared_eval, eval_tokens, device=device))
               if shared_eval is not None else None)
    spec = registry.get("trainer", it.trainer_config.name)
    it.trainer = spec.factory(it.trainer_config, it.model, device=device, loggers=it.loggers, hooks=registry.hook,
                              output_dir=it.out, registry=registry, eval_fn=eval_fn, progress=False)
    original = it.trainer.request_stop

    def request_stop(reason: str = "stopped by a hook", _it: _Item = it, _orig: Any = original) -> None:
        _it.stop_reason = reason
        _orig(reason)

    it.trainer.request_stop = request_stop  # hooks stop one item; the sweep sees it after the step


def _train(cfg: SweepRunConfig, registry: Any, items: list[_Item], make_stream: Callable[[], Any],
           device: torch.device, dtype: torch.dtype, shared_eval: _SharedBatches | None, start: float,
           context: RunContext, mesh: Mesh) -> dict[str, Any]:
    """The lockstep loop: each batch once, to every item still training, in item order."""
    hooks = registry.hook
    stream = make_stream()
    batches = tokens = 0
    try:
        it_stream = iter(stream)
        first = next(it_stream, None)
        if first is None:
            raise DataError("the activation stream is empty")
        batch: dict[str, Any] | None = _to_device(first, device, dtype)
        per_batch = _batch_rows(batch)
        for it in items:
            it.model.check_batch(batch)
            it.trainer.setup(per_batch)
            torch.manual_seed(int(it.setting("seed", 0)))
            _save_rng(it, device)
            hooks.lmsae_before_training(trainer=it.trainer, dictionary=it.model)
        active = [it for it in items if it.trainer.step < it.trainer.total_steps]
        for it in items:
            if it not in active:
                _finish(cfg, registry, it, "completed", shared_eval, device, start, context)
        total = max((it.trainer.total_steps for it in items), default=0)
        bar = tqdm(total=total, desc="sweep", unit="step", disable=not (context.progress and mesh.is_primary),
                   dynamic_ncols=True, leave=True)
        try:
            while active:
                if batch is None:
                    nxt = next(it_stream, None)
                    if nxt is None:
                        for it in active:
                            _finish(cfg, registry, it, "stream_exhausted", shared_eval, device, start, context)
                        active = []
                        break
                    batch = _to_device(nxt, device, dtype)
                batches += 1
                mask = batch.get("mask")
                tokens += int(mask.sum()) if mask is not None else _batch_rows(batch)
                done = []
                for it in active:
                    _step(it, batch, hooks, device)
                    if it.stop_reason is not None:
                        done.append((it, "stopped"))
                    elif it.trainer.step >= it.trainer.total_steps:
                        done.append((it, "completed"))
                batch = None
                bar.update(1)
                for it, reason in done:
                    active.remove(it)
                    _finish(cfg, registry, it, reason, shared_eval, device, start, context)
                bar.set_postfix(training=f"{len(active)}/{len(items)}", refresh=False)
        finally:
            bar.close()
    finally:
        close = getattr(stream, "close", None)
        if callable(close):
            close()
    return {"batches": batches, "tokens": tokens}


def _save_rng(it: _Item, device: torch.device) -> None:
    it.rng = torch.get_rng_state()
    if device.type == "cuda":
        it.cuda_rng = torch.cuda.get_rng_state(device)


def _restore_rng(it: _Item, device: torch.device) -> None:
    torch.set_rng_state(it.rng)
    if it.cuda_rng is not None:
        torch.cuda.set_rng_state(it.cuda_rng, device)


def _step(it: _Item, batch: Mapping[str, Any], hooks: Any, device: torch.device) -> None:
    """One step of one item, with the logging / evaluation / hook calls of Trainer.fit."""
    trainer = it.trainer
    _restore_rng(it, device)  # each item draws from its own random stream, as in its own train run
    ctx = trainer.train_step(batch)
    it.ctx = ctx
    step = trainer.step
    metrics = None
    if step % int(it.setting("log_every", 100)) == 0 or step == trainer.total_steps:
        metrics = trainer.window_metrics(ctx)
        trainer.window.reset()
        eval_every = int(it.setting("eval_every", 0))
        if trainer.eval_fn is not None and eval_every and step % eval_every == 0:
            with trainer.averaged():
                metrics.update({f"eval/{k}": v for k, v in trainer.eval_fn(trainer.model).items()})
        trainer.last_metrics = metrics
        if trainer.loggers is not None:
            trainer.loggers.log(step, metrics)
    hooks.lmsae_after_step(trainer=trainer, dictionary=it.model, step=step, metrics=metrics)
    _save_rng(it, device)


def _finish(cfg: SweepRunConfig, registry: Any, it: _Item, reason: str, shared_eval: _SharedBatches | None,
            device: torch.device, start: float, context: RunContext) -> None:
    """End one item as Trainer.fit + the train task would: last window, result, evaluation, save."""
    trainer = it.trainer
    if it.ctx is not None and trainer.window.n_batches:
        trainer.last_metrics = trainer.window_metrics(it.ctx)
        trainer.window.reset()
        if trainer.loggers is not None:
            trainer.loggers.log(trainer.step, trainer.last_metrics)
    total_tokens = int(it.setting("total_training_tokens", 0))
    message = {"completed": f"trained {trainer.step} steps ({trainer.tokens:,} tokens)",
               "stopped": f"stopped at step {trainer.step}/{trainer.total_steps}: {it.stop_reason}",
               "stream_exhausted": f"the activation stream ended after {trainer.step} of {trainer.total_steps} steps "
                                   f"({trainer.tokens:,} of {total_tokens:,} tokens)"}[reason]
    if reason == "stream_exhausted":
        if it.setting("on_stream_end", "finish") == "error":
            it.error = message + " (trainer.on_stream_end = 'error')"
            _echo_item(context, f"[{it.name}] {it.error}; not saved")
            it.loggers.close()
            it.trainer = it.ctx = None
            return
        log.warning("sweep item %s: %s; keeping what was learnt", it.name, message)
    trainer.finish_training()  # the optimizer's evaluation point (schedule-free's average) is what is saved
    result = TrainResult(reason=reason, steps=trainer.step, tokens=trainer.tokens, total_steps=trainer.total_steps,
                         metrics=dict(trainer.last_metrics), message=message)
    registry.hook.lmsae_after_training(trainer=trainer, dictionary=it.model, result=result)
    final = (evaluate_reconstruction(it.model, shared_eval, int(it.setting("eval_tokens", 100_000)), device=device)
             if shared_eval is not None else {})
    summary = training_summary(result, final, time.monotonic() - start)
    it.loggers.log_summary(summary)
    saved = copy.deepcopy(it.model).cpu()
    if cfg.fold_normalization and saved.config.normalization == "dataset":
        saved.fold_normalization()
    save_dictionary(saved, it.out, registry, metadata={"training": result.reason})
    atomic_write_json(it.out / "training_summary.json", summary)
    it.loggers.close()
    it.result, it.summary = result, summary
    _echo_item(context, f"[{it.name}] {message}: ev {summary['explained_variance']:.4f}, L0 {summary['l0']:.2f}, "
                        f"dead {summary['dead_fraction']:.2%} ({summary['metrics_source']}) -> {it.out}")
    # free the optimiser state and the batch context; the model stays for the summary only on the CPU copy
    it.trainer = it.ctx = None
    it.model = saved


def _echo_item(context: RunContext, line: str) -> None:
    """A report line while the progress bar runs (tqdm clears and redraws the bar around it)."""
    tqdm.write(line, file=context.out)
    context.out.flush()


def _gather(mesh: Mesh, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's item rows on every rank (a no-op in one process)."""
    group = mesh.group("sweep")
    if group is None:
        return list(rows)
    import torch.distributed as dist

    gathered: list[Any] = [None] * mesh.size("sweep")
    dist.all_gather_object(gathered, rows, group=group)
    return [r for part in gathered for r in part]


def _print_table(say: Callable, summary: Mapping[str, Any], out: pathlib.Path) -> None:
    rows = summary["items"]
    width = max(len("item"), *(len(r["name"]) for r in rows))
    say("")
    say(f"sweep of {len(rows)} items in {summary['seconds']:.1f}s: stream {summary['stream']['tokens']:,} tokens "
        f"({summary['stream']['tokens_per_second']:,.0f} tokens/s), dictionaries "
        f"{summary['dictionary_tokens_per_second']:,.0f} tokens/s in total")
    say(f"  {'item':<{width}}  {'steps':>7}  {'tokens':>11}  {'EV':>7}  {'L0':>7}  {'dead':>6}  reason")
    for r in rows:
        if "steps" not in r:
            say(f"  {r['name']:<{width}}  {r['message']}")
            continue
        say(f"  {r['name']:<{width}}  {r['steps']:>7}  {r['tokens']:>11,}  {r['explained_variance']:>7.4f}  "
            f"{r['l0']:>7.2f}  {r['dead_fraction']:>6.1%}  {r['reason']}")
    say(f"saved every item to {out}/NAME/ (config.json + weights); summary in {out / SWEEP_SUMMARY}")


def example(registry: Any) -> SweepRunConfig:
    """Three TopK SAEs differing in top_k, on the synthetic source."""
    from lmsae.sources.synthetic_source import SyntheticSourceConfig
    from lmsae.training.trainer import StandardTrainerConfig

    base = registry.architecture("sae").example_config()
    hook = base.hook_points[0]
    width = registry.architecture("sae").model_class(base).hook_dims()[hook]
    source = SyntheticSourceConfig(d_model=width, n_features=4 * width, mean_active=4.0, hook_point=hook)
    items = [SweepItemConfig(name=f"k{k}", dictionary=attrs.evolve(base, top_k=k)) for k in (2, 4, 8)]
    return SweepRunConfig(items=items, activations=ActivationsConfig(sources=[source], batch_size=1024),
                          trainer=StandardTrainerConfig(total_training_tokens=1_000_000),
                          output_dir=pathlib.Path("runs/sweep"))


SPEC = TaskSpec(config_class=SweepRunConfig, factory=run, example=example,
                summary="train several dictionaries in lockstep on one activation stream")
