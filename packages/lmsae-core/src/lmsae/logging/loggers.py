"""Metric loggers: where training and evaluation metrics go (console, JSON lines, W&B).

A :class:`MetricLogger` receives ``log(step, metrics)`` calls during a run, one
``log_summary(summary)`` call (or a few) with end-of-run values, and ``close()``. Metric names
are stable, slash-separated strings such as ``losses/overall_loss``,
``metrics/explained_variance``, ``metrics/l0``, ``sparsity/above_1e-2`` or
``details/current_learning_rate``.

Each built-in logger is a config class (its ``name`` is the tag users write as
``[[loggers]] type = "jsonl"``) plus a factory ``factory(config, context) -> MetricLogger``,
listed in :data:`LOGGER_SPECS`. The :class:`LoggerContext` tells the factory where the run
writes, what it is called, its plain config, whether it resumes, and the process rank: only
rank 0 logs, every factory returns a :class:`NullLogger` on the other ranks.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any, ClassVar, Literal, TextIO

import attrs
from tqdm import tqdm

from lmsae.config.base import LoggerConfig
from lmsae.config.fields import FieldValueError, config_class, in_range, non_empty, option
from lmsae.errors import DataError, LmsaeError
from lmsae.records import LoggerSpec
from lmsae.training.state_io import atomic_write_bytes, atomic_write_json

__all__ = [
    "DEFAULT_CONSOLE_KEYS",
    "LOGGER_SPECS",
    "ConsoleLogger",
    "ConsoleLoggerConfig",
    "JsonlLogger",
    "JsonlLoggerConfig",
    "LoggerContext",
    "MetricLogger",
    "MultiLogger",
    "NullLogger",
    "SUMMARY_FILE",
    "WANDB_RUN_ID_FILE",
    "WandbLogger",
    "WandbLoggerConfig",
    "format_console_value",
    "make_console_logger",
    "make_jsonl_logger",
    "make_wandb_logger",
    "read_jsonl_metrics",
]

#: Metrics the console logger prints when its ``keys`` option is not set.
DEFAULT_CONSOLE_KEYS: tuple[str, ...] = (
    "losses/overall_loss",
    "metrics/explained_variance",
    "metrics/l0",
    "metrics/dead_fraction",
    "details/current_learning_rate",
)

#: Short console labels of well-known metrics; other metrics use the last part of their name.
_CONSOLE_LABELS: dict[str, str] = {
    "losses/overall_loss": "loss",
    "metrics/explained_variance": "ev",
    "metrics/l0": "l0",
    "metrics/dead_fraction": "dead",
    "details/current_learning_rate": "lr",
}

#: File, next to ``output_dir/wandb``, that remembers the W&B run id for resumption.
WANDB_RUN_ID_FILE = "wandb_run_id.json"
#: Summary file written by the JSON-lines logger next to its metrics file.
SUMMARY_FILE = "summary.json"


# --------------------------------------------------------------------------------------------
# Protocol, context and combinators


@attrs.frozen
class LoggerContext:
    """What a logger factory needs to know about the run.

    - ``output_dir``: the run's output directory (None when the run writes no files; the JSON-lines
      logger then needs an absolute path, the W&B logger uses wandb's default directory).
    - ``run_name``: human-readable name of the run.
    - ``config``: the run configuration as plain data (sent to W&B as the run config).
    - ``resume``: the run continues from a checkpoint: append to existing metric files (dropping
      steps that are logged again) and resume the W&B run.
    - ``rank``: rank of this process in a distributed run; only rank 0 logs.
    """

    output_dir: pathlib.Path | None = attrs.field(
        converter=attrs.converters.optional(pathlib.Path))
    run_name: str = ""
    config: dict[str, Any] = attrs.field(factory=dict)
    resume: bool = False
    rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that logs (rank 0)."""
        return self.rank == 0


class MetricLogger:
    """Base class of metric loggers; usable as a context manager (``close()`` on exit).

    Subclasses implement :meth:`log` and usually :meth:`log_summary` and :meth:`close`
    (both do nothing by default). ``close()`` must be safe to call more than once.
    """

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record the metrics of one training step (names like ``losses/overall_loss``)."""
        raise NotImplementedError

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Record end-of-run values (final metrics, totals); later calls update earlier ones."""

    def close(self) -> None:
        """Flush and release everything the logger holds."""

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()


class NullLogger(MetricLogger):
    """A logger that drops everything (used on ranks other than 0, or when none is configured)."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Do nothing."""


class MultiLogger(MetricLogger):
    """Send every call to several loggers, in order.

    Every logger gets every call even if an earlier one raises; the first error is then raised
    again (with the others attached as notes). ``close()`` closes all loggers the same way.
    Leaving a ``with`` block calls each logger's own ``__exit__`` so that, e.g., W&B marks the
    run as failed when the block raised.
    """

    def __init__(self, loggers: Iterable[MetricLogger]):
        self.loggers: list[MetricLogger] = list(loggers)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log to every logger."""
        self._each(lambda lg: lg.log(step, metrics), "log")

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Send the summary to every logger."""
        self._each(lambda lg: lg.log_summary(summary), "log_summary")

    def close(self) -> None:
        """Close every logger, even when closing one of them fails."""
        self._each(lambda lg: lg.close(), "close")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        def leave(lg: MetricLogger) -> None:
            exit_ = getattr(lg, "__exit__", None)
            if exit_ is None:
                lg.close()
            else:
                exit_(exc_type, exc, tb)

        self._each(leave, "close")

    def _each(self, call: Any, what: str) -> None:
        errors: list[tuple[MetricLogger, Exception]] = []
        for lg in self.loggers:
            try:
                call(lg)
            except Exception as exc:  # every logger must get the call; the first error is re-raised
                errors.append((lg, exc))
        if not errors:
            return
        first = errors[0][1]
        for lg, exc in errors[1:]:
            first.add_note(f"{type(lg).__name__}.{what} also failed: {type(exc).__name__}: {exc}")
        raise first


# --------------------------------------------------------------------------------------------
# Value helpers


def _scalar(value: Any) -> Any:
    """A plain Python value for numpy scalars and zero-dimensional tensors; others unchanged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            plain = tolist()
        except Exception:  # an object whose tolist() fails is shown as it is
            return value
        if not isinstance(plain, list):
            return plain
    return value


def _to_json(value: Any, where: str) -> Any:
    """``value`` as strict JSON data: non-finite floats become None (JSON has no NaN/Infinity).

    Accepts None, bools, numbers (including numpy scalars and tensors, via ``tolist``), strings,
    paths, mappings and sequences. Raises :class:`TypeError` naming ``where`` otherwise.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _to_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # numpy scalars and arrays, torch tensors
        return _to_json(tolist(), where)
    raise TypeError(f"{where}: cannot write a value of type {type(value).__name__} as JSON")


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened into ``a/b`` keys."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------
# Console


def _check_keys(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    for key in value or ():
        if not isinstance(key, str) or not key.strip():
            raise FieldValueError(attribute.name, f"metric names must be non-empty strings, got {key!r}")


@config_class
class ConsoleLoggerConfig(LoggerConfig):
    """Print one compact line per logging step (and a table of final values at the end)."""

    name: ClassVar[str] = "console"

    keys: list[str] | None = option(
        None,
        doc="Metrics to print, in order (e.g. ['losses/overall_loss', 'metrics/l0']). Unset: loss, "
            "explained variance, L0, dead fraction and learning rate. Metrics missing from a step "
            "are skipped; a step with none of them prints nothing.",
        validator=[non_empty(), _check_keys])
    precision: int = option(
        4,
        doc="Decimal places of ordinary values such as losses and explained variance (very small or "
            "large ones switch to scientific notation). Learning rates are always shown like "
            "4.0e-04, fractions (names ending in '_fraction') as percentages, L0 with one decimal.",
        validator=in_range(0, 12))
    summary: bool = option(
        False,
        doc="Also print a table of every end-of-run value (tasks already print a short summary of "
            "the headline numbers).")


def _console_label(key: str) -> str:
    return _CONSOLE_LABELS.get(key, key.rsplit("/", 1)[-1])


def format_console_value(key: str, value: Any, precision: int = 4) -> str:
    """How the console logger shows ``value`` of metric ``key``."""
    value = _scalar(value)
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, Real):
        return str(value)
    if isinstance(value, Integral):
        return str(int(value))
    v = float(value)
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    last = key.rsplit("/", 1)[-1]
    if "learning_rate" in last or last == "lr":
        return f"{v:.1e}"
    if last.endswith("_fraction"):
        return f"{100.0 * v:.1f}%"
    if last == "l0":
        return f"{v:.1f}"
    if v == 0.0 or 1e-2 <= abs(v) < 1e6:
        return f"{v:.{precision}f}"
    return f"{v:.{max(precision - 1, 0)}e}"


class ConsoleLogger(MetricLogger):
    """Print ``step 1200 | loss 0.1234 | ev 0.8123 | l0 48.2 | dead 0.0% | lr 4.0e-04`` lines.

    Lines go through :func:`tqdm.tqdm.write`, so a progress bar on the same stream is cleared
    and redrawn instead of being broken. ``stream`` defaults to ``sys.stdout`` (looked up at each
    write, so redirections made later are honoured).
    """

    def __init__(self, config: ConsoleLoggerConfig | None = None, *, stream: TextIO | None = None):
        self.config = config or ConsoleLoggerConfig()
        self.keys: tuple[str, ...] = tuple(self.config.keys) if self.config.keys else DEFAULT_CONSOLE_KEYS
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        """The stream lines are written to."""
        return self._stream if self._stream is not None else sys.stdout

    def format_line(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        """The line printed for one step, or None when none of the selected metrics is present."""
        parts = [
            f"{_console_label(key)} {format_console_value(key, metrics[key], self.config.precision)}"
            for key in self.keys
            if key in metrics
        ]
        if not parts:
            return None
        return " | ".join([f"step {step}", *parts])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Print one line with the selected metrics (nothing if none of them is present)."""
        line = self.format_line(step, metrics)
        if line is not None:
            tqdm.write(line, file=self.stream)
            self.stream.flush()

    def format_summary(self, summary: Mapping[str, Any]) -> str | None:
        """The aligned table printed by :meth:`log_summary` (None for an empty summary)."""
        flat = _flatten(summary)
        if not flat:
            return None
        names = list(flat)
        values = [format_console_value(k, flat[k], self.config.precision) for k in names]
        kw = max(len(k) for k in names)
        vw = max(len(v) for v in values)
        rows = [f"  {k:<{kw}}  {v:>{vw}}" for k, v in zip(names, values, strict=True)]
        return "\n".join(["final values:", *rows])

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Print every summary value as an aligned ``name  value`` table (when ``summary = true``)."""
        if not self.config.summary:
            return
        table = self.format_summary(summary)
        if table is not None:
            tqdm.write(table, file=self.stream)
            self.stream.flush()


def make_console_logger(config: ConsoleLoggerConfig, context: LoggerContext) -> MetricLogger:
    """Factory of the ``console`` logger (a :class:`NullLogger` on ranks other than 0)."""
    if not context.is_main:
        return NullLogger()
    return ConsoleLogger(config)


# --------------------------------------------------------------------------------------------
# JSON lines


@config_class
class JsonlLoggerConfig(LoggerConfig):
    """Append one JSON object per logging step to a file, and write summary.json at the end.

    Each line is ``{"step": N, "<metric>": value, ...}``. JSON has no NaN or infinity: non-finite
    values are written as ``null``. A new run truncates the file; a resumed run first drops the
    lines at or after the first step it logs again, so no step appears twice.
    """

    name: ClassVar[str] = "jsonl"

    path: str = option(
        "metrics.jsonl",
        doc="Metrics file, relative to the run's output directory (or absolute). summary.json is "
            "written in the same directory.",
        validator=non_empty())


def read_jsonl_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a metrics file written by the ``jsonl`` logger: one dict per line, in file order.

    Non-finite values come back as None. A torn last line (a crash during a write) is skipped.

    Raises:
        DataError: the file is missing or unreadable, or a line other than the last one is not a
            JSON object.
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read metrics file {path}: {exc}") from exc
    lines = data.split(b"\n")
    records: list[dict[str, Any]] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:
            if number == len(lines):  # no newline after it: a write interrupted by a crash
                continue
            raise DataError(f"{path}:{number}: not a JSON line ({exc})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _step_of(raw: bytes) -> int | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return step


class JsonlLogger(MetricLogger):
    """Append ``{"step": N, ...metrics}`` lines to ``path``; flushed and fsynced at every call.

    - ``resume=False``: an existing file is truncated (and a stale summary removed) right away.
    - ``resume=True``: the file is kept; at the first :meth:`log` call, lines whose step is at or
      after the logged step are removed (the file is rewritten atomically), because a resumed
      run logs again the steps after its checkpoint. Lines that cannot be parsed (torn by a
      crash) are removed too.

    :meth:`log_summary` writes ``summary.json`` atomically in the same directory; successive
    calls update it key by key (on resume, starting from the existing summary).
    """

    def __init__(self, path: str | os.PathLike[str], *, resume: bool = False):
        self.path = pathlib.Path(path)
        self.summary_path = self.path.parent / SUMMARY_FILE
        self.resume = resume
        self._summary: dict[str, Any] = {}
        self._file: Any = None
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume:
                self._summary = self._read_summary()
            else:
                self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - held until close()
                self.summary_path.unlink(missing_ok=True)
        except OSError as exc:
            raise LmsaeError(f"cannot open metrics file {self.path}: {exc}") from exc

    def _read_summary(self) -> dict[str, Any]:
        try:
            data = json.loads(self.summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _open_for_resume(self, first_step: int) -> None:
        """Drop lines at or after ``first_step`` (atomic rewrite), then open for appending."""
        if self.path.exists():
            raw_lines = [r for r in self.path.read_bytes().split(b"\n") if r.strip()]
            kept = []
            for raw in raw_lines:
                step = _step_of(raw)
                if step is not None and step < first_step:
                    kept.append(raw)
            if len(kept) != len(raw_lines):
                atomic_write_bytes(self.path, b"".join(r + b"\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held until close()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append one line ``{"step": step, ...metrics}`` (non-finite values as null) durably.

        Raises:
            ValueError: a metric is called ``"step"``, or the logger is closed.
            TypeError: a value cannot be written as JSON.
        """
        if self._closed:
            raise ValueError(f"the metrics file {self.path} is closed")
        if "step" in metrics:
            raise ValueError("a metric cannot be called 'step' (the key holds the step number)")
        record: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            record[str(key)] = _to_json(value, str(key))
        line = json.dumps(record, allow_nan=False) + "\n"
        if self._file is None:
            self._open_for_resume(int(step))
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Update ``summary.json`` (written atomically; non-finite values as null)."""
        merged = {**self._summary, **_to_json(dict(summary), "summary")}
        atomic_write_json(self.summary_path, merged)
        self._summary = merged

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None


def make_jsonl_logger(config: JsonlLoggerConfig, context: LoggerContext) -> MetricLogger:
    """Factory of the ``jsonl`` logger (a :class:`NullLogger` on ranks other than 0)."""
    if not context.is_main:
        return NullLogger()
    path = pathlib.Path(config.path).expanduser()
    if not path.is_absolute():
        if context.output_dir is None:
            raise LmsaeError(f"the jsonl logger's path {config.path!r} is relative but the run has no "
                             "output directory; give an absolute path")
        path = context.output_dir / path
    return JsonlLogger(path, resume=context.resume)


# --------------------------------------------------------------------------------------------
# Weights & Biases

WandbMode = Literal["online", "offline", "disabled"]
_WANDB_MODES = ("online", "offline", "disabled")


def _check_mode(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value not in _WANDB_MODES:
        raise FieldValueError(attribute.name, f"must be one of {', '.join(map(repr, _WANDB_MODES))}, got {value!r}")


_RUN_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def _check_run_id(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not _RUN_ID.match(value)):
        raise FieldValueError(attribute.name, f"must be a W&B run id (letters, digits, '-' and '_'), got {value!r}")


@config_class
class WandbLoggerConfig(LoggerConfig):
    """Log to Weights & Biases (needs ``pip install wandb``); files go to <output_dir>/wandb."""

    name: ClassVar[str] = "wandb"

    project: str = option("lmsae", doc="W&B project.", validator=non_empty())
    entity: str | None = option(None, doc="W&B entity (user or team); unset: your default entity.")
    run_name: str | None = option(None, doc="Display name of the W&B run; unset: the run's name.")
    mode: WandbMode | None = option(
        None,
        doc="'online', 'offline' (sync later with `wandb sync`) or 'disabled'. Unset: the WANDB_MODE "
            "environment variable decides (online by default).",
        validator=_check_mode)
    tags: list[str] = option(factory=list, doc="Tags of the W&B run.")
    resume_id: str | None = option(
        None,
        doc="Id of an existing W&B run to continue. Unset: a resumed lmsae run continues the W&B run "
            "recorded in <output_dir>/wandb_run_id.json, a new one starts a new W&B run.",
        validator=_check_run_id)


def _read_run_id(path: pathlib.Path) -> str | None:
    """The run id stored in ``path`` (None when the file does not exist)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        run_id = data["run_id"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise LmsaeError(f"cannot read the W&B run id from {path} ({exc}); delete the file to start a new "
                         "W&B run, or set resume_id") from exc
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise LmsaeError(f"{path} holds an invalid W&B run id {run_id!r}; delete it or set resume_id")
    return run_id


class WandbLogger(MetricLogger):
    """Log to a started W&B run: ``log`` → ``run.log(metrics, step=step)``, ``log_summary`` →
    ``run.summary.update``, ``close`` → ``run.finish()`` (``exit_code=1`` when a ``with`` block
    raised)."""

    def __init__(self, run: Any):
        self.run = run
        self._finished = False

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log the metrics at ``step`` (W&B ignores steps lower than ones already logged)."""
        self.run.log(dict(metrics), step=int(step))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Update the run summary."""
        self.run.summary.update(dict(summary))

    def close(self) -> None:
        """Finish the run (idempotent)."""
        self._finish(0)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._finish(0 if exc_type is None else 1)

    def _finish(self, exit_code: int) -> None:
        if self._finished:
            return
        self._finished = True
        self.run.finish(exit_code=exit_code)


def make_wandb_logger(config: WandbLoggerConfig, context: LoggerContext) -> MetricLogger:
    """Factory of the ``wandb`` logger (a :class:`NullLogger` on ranks other than 0).

    Starts the run in ``context.output_dir`` (wandb writes under ``<output_dir>/wandb``) and
    records its id in ``<output_dir>/wandb_run_id.json`` (atomically). The run id is, in order:
    ``config.resume_id``; on resume, the id in that file; otherwise a new one. A known id is
    resumed with ``resume="allow"``.

    Raises:
        LmsaeError: wandb is not installed, the stored run id is unreadable, or the run could
            not be started.
    """
    if not context.is_main:
        return NullLogger()
    try:
        import wandb
    except ImportError as exc:
        raise LmsaeError("the wandb logger needs the wandb package: pip install wandb "
                         "(or pip install 'lmsae-core[wandb]')") from exc

    id_file = context.output_dir / WANDB_RUN_ID_FILE if context.output_dir is not None else None
    run_id = config.resume_id
    if run_id is None and context.resume and id_file is not None:
        run_id = _read_run_id(id_file)

    kwargs: dict[str, Any] = {
        "project": config.project,
        "entity": config.entity,
        "name": config.run_name or context.run_name or None,
        "config": dict(context.config),
        "tags": list(config.tags) or None,
    }
    if config.mode is not None:
        kwargs["mode"] = config.mode
    if run_id is not None:
        kwargs["id"] = run_id
        kwargs["resume"] = "allow"
    if context.output_dir is not None:
        try:
            context.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LmsaeError(f"cannot create the output directory {context.output_dir}: {exc}") from exc
        kwargs["dir"] = os.fspath(context.output_dir)

    try:
        run = wandb.init(**kwargs)
    except Exception as exc:  # wandb raises many error types (usage, network, auth); report them alike
        raise LmsaeError(f"could not start the W&B run: {type(exc).__name__}: {exc}") from exc

    if id_file is not None and not getattr(run, "disabled", False):
        try:
            atomic_write_json(id_file, {"run_id": run.id, "project": config.project, "entity": config.entity})
        except OSError as exc:
            run.finish(exit_code=1)
            raise LmsaeError(f"cannot write {id_file}: {exc}") from exc
    return WandbLogger(run)


# --------------------------------------------------------------------------------------------

LOGGER_SPECS: list[LoggerSpec] = [
    LoggerSpec(config_class=ConsoleLoggerConfig, factory=make_console_logger,
               summary="print compact metric lines (progress-bar friendly) and a final table"),
    LoggerSpec(config_class=JsonlLoggerConfig, factory=make_jsonl_logger,
               summary="append metrics as JSON lines to <output_dir>/metrics.jsonl, plus summary.json"),
    LoggerSpec(config_class=WandbLoggerConfig, factory=make_wandb_logger,
               summary="log to Weights & Biases (online, offline or disabled)"),
]
