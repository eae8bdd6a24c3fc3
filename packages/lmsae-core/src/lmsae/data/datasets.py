"""Text datasets: where documents come from (``[activations.sources.dataset]``).

:class:`DatasetConfig.path` accepts

- ``"builtin:python-docs"``: Python's documentation, built locally (:mod:`lmsae.data.corpus`);
- a local file or glob (``.txt``, ``.md``, ``.rst``, ``.jsonl``, ``.json``, ``.csv``,
  ``.parquet``, optionally compressed ``.gz``/``.bz2``/``.xz``/``.zst``): the Hugging Face
  ``datasets`` builder is picked from the suffix; text files load with ``sample_by``;
- a local directory: one saved with ``Dataset.save_to_disk`` (detected from its metadata files),
  or a directory of data files (searched recursively, hidden entries skipped);
- a Hugging Face Hub dataset name, which only works when it is in the local cache if downloads
  are disabled (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``); otherwise it fails at once with a
  :class:`~lmsae.errors.DataError`.

``datasets`` is imported only when documents are loaded (it is an optional dependency).
"""

from __future__ import annotations

import glob
import os
import pathlib
from collections.abc import Iterator
from typing import Any, Literal

from lmsae._text import did_you_mean
from lmsae.config.base import Config
from lmsae.config.fields import FieldValueError, config_class, non_empty, non_negative, one_of, option, positive
from lmsae.errors import DataError

__all__ = ["BUILTIN_PREFIX", "DatasetConfig", "iter_texts", "load_documents", "shard_bounds", "take_shard"]

BUILTIN_PREFIX = "builtin:"

# suffix -> Hugging Face datasets builder
_BUILDERS = {
    ".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".csv": "csv", ".tsv": "tsv",  # tsv: the csv builder with a tab separator
    ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_GLOB_CHARS = set("*?[")


@config_class
class DatasetConfig(Config):
    """A text dataset: a built-in corpus, local files, a saved dataset or a cached Hub dataset."""

    path: str = option(
        doc="'builtin:python-docs' (Python's documentation, no download); a local file or glob "
            "(.txt/.md/.rst/.jsonl/.json/.csv/.parquet); a directory of such files or one written by "
            "Dataset.save_to_disk; or a Hugging Face Hub dataset name (must be cached when offline).",
        validator=non_empty())
    name: str | None = option(
        None, doc="Configuration (subset) of a Hub dataset, the second argument of datasets.load_dataset: "
                  "'wikitext-103-raw-v1' for path 'wikitext'. Unset: the dataset's default configuration. "
                  "Not used for builtin corpora, local files or saved datasets.")
    split: str = option(
        "train", doc="Split to read (slices such as 'train[:1000]' work for files and Hub datasets). Local "
                     "files form a single 'train' split.",
        validator=non_empty())
    text_column: str = option("text", doc="Column holding the text of each document.", validator=non_empty())
    sample_by: Literal["document", "line", "paragraph"] = option(
        "document", doc="For text files: one document per file ('document'), per line ('line') or per "
                        "blank-line-separated paragraph ('paragraph'). Ignored for other formats.",
        validator=one_of("document", "line", "paragraph"))
    max_documents: int | None = option(
        None, doc="Use only the first this many documents (after shuffling; before sharding over "
                  "data-parallel ranks, so it bounds all ranks together).",
        validator=positive())
    shuffle_documents: bool = option(
        False, doc="Shuffle the document order (with seed) before max_documents and sharding.")
    seed: int = option(0, doc="Seed of shuffle_documents.", validator=non_negative())
    cache_dir: str | None = option(
        None, doc="Where the datasets library caches converted files (unset: its default, "
                  "~/.cache/huggingface/datasets).")

    def __attrs_post_init__(self) -> None:
        if self.path.startswith(BUILTIN_PREFIX):
            from lmsae.data.corpus import BUILTIN_CORPORA

            which = self.path[len(BUILTIN_PREFIX):]
            if which not in BUILTIN_CORPORA:
                choices = [BUILTIN_PREFIX + c for c in BUILTIN_CORPORA]
                raise FieldValueError(
                    "path", f"unknown built-in corpus {self.path!r}; available: {', '.join(choices)}"
                            f"{did_you_mean(self.path, choices)}")


def shard_bounds(n_documents: int, shard: tuple[int, int]) -> tuple[int, int]:
    """``(start, stop)`` of the contiguous block of documents of ``shard = (rank, world)``.

    Blocks are disjoint and cover ``range(n_documents)``; the first ``n_documents % world``
    ranks get one document more.
    """
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    q, r = divmod(n_documents, world)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def load_documents(config: DatasetConfig, shard: tuple[int, int] = (0, 1)) -> Any:
    """The documents of ``shard = (rank, world)`` as a ``datasets.Dataset``.

    Order of operations: load, check ``text_column``, shuffle (``shuffle_documents``), keep
    ``max_documents``, then take this rank's contiguous block (:func:`shard_bounds`), so every
    rank gets whole documents and the ranks together see each document once. Document ``i`` of
    the result is document ``shard_bounds(n, shard)[0] + i`` of the unsharded dataset.

    Raises:
        DataError: the path does not exist or matches no usable files, the Hub dataset is not
            available (offline and not cached, unknown name...), the split or ``text_column`` is
            missing (the message lists what exists), or the column does not hold text.
    """
    dataset = _load(config)
    columns = list(dataset.column_names)
    if config.text_column not in columns:
        raise DataError(
            f"dataset {config.path!r} has no column {config.text_column!r}; its columns are "
            f"{', '.join(map(repr, columns)) or '(none)'}{did_you_mean(config.text_column, columns)} "
            "(set text_column in the dataset config)")
    feature = dataset.features[config.text_column]
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(f"column {config.text_column!r} of dataset {config.path!r} holds {feature}, not text")
    if config.shuffle_documents:
        dataset = dataset.shuffle(seed=config.seed)
    if config.max_documents is not None and config.max_documents < len(dataset):
        dataset = dataset.select(range(config.max_documents))
    return take_shard(dataset, shard)[0]


def take_shard(dataset: Any, shard: tuple[int, int]) -> tuple[Any, int]:
    """``(documents of shard (rank, world), index of its first document in dataset)``: the
    contiguous block given by :func:`shard_bounds` (possibly empty)."""
    start, stop = shard_bounds(len(dataset), shard)
    if (start, stop) == (0, len(dataset)):
        return dataset, 0
    # an empty range is special-cased because contiguous selection rejects start == len
    return dataset.select(range(start, stop) if stop > start else []), start


def iter_texts(dataset: Any, text_column: str = "text", start: int = 0, *,
               batch_size: int = 1000) -> Iterator[tuple[int, str]]:
    """Yield ``(document_index, text)`` from document ``start`` on.

    ``dataset`` is a ``datasets.Dataset`` (read ``batch_size`` rows at a time) or a sequence of
    strings. Missing texts (None) are yielded as "".

    Raises:
        DataError: a value of the column is not a string.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    is_dataset = hasattr(dataset, "column_names")
    if is_dataset:
        dataset = dataset.select_columns([text_column])
    n = len(dataset)
    for lo in range(start, n, batch_size):
        hi = min(lo + batch_size, n)
        texts = dataset[lo:hi][text_column] if is_dataset else dataset[lo:hi]
        for i, text in enumerate(texts, start=lo):
            if text is None:
                text = ""
            elif not isinstance(text, str):
                raise DataError(f"document {i} of column {text_column!r} is a {type(text).__name__}, not text")
            yield i, text


# --- loading ---------------------------------------------------------------------------------


def _format_suffix(path: pathlib.Path) -> str:
    """The suffix naming the file format, looking through a compression suffix (``a.jsonl.gz`` -> ``.jsonl``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _builder_of(path: pathlib.Path) -> str | None:
    return _BUILDERS.get(_format_suffix(path))


def _is_saved_dataset(directory: pathlib.Path) -> bool:
    return ((directory / "dataset_info.json").is_file() and (directory / "state.json").is_file()) or \
        (directory / "dataset_dict.json").is_file()


def _looks_local(path: str) -> bool:
    return (path.startswith(("/", "./", "../", "~", ".\\")) or os.path.splitdrive(path)[0] != ""
            or _builder_of(pathlib.Path(path)) is not None)


def _load(config: DatasetConfig) -> Any:
    path = config.path
    if path.startswith(BUILTIN_PREFIX):
        return _load_builtin(config)
    expanded = os.path.expanduser(path)
    if _GLOB_CHARS & set(expanded):
        files = sorted(pathlib.Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"no files match the dataset pattern {path!r}")
        return _load_files(config, files)
    local = pathlib.Path(expanded)
    if local.is_dir():
        if _is_saved_dataset(local):
            return _load_saved(config, local)
        return _load_files(config, _data_files_in(local))
    if local.is_file():
        return _load_files(config, [local])
    if _looks_local(path):
        raise DataError(f"dataset path {path!r} does not exist")
    return _load_hub(config)


def _data_files_in(directory: pathlib.Path) -> list[pathlib.Path]:
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # sorted: deterministic walk
        files.extend(pathlib.Path(root) / n for n in names if not n.startswith(".") and _builder_of(pathlib.Path(n)))
    if not files:
        raise DataError(f"directory {str(directory)!r} holds no data files (looked for "
                        f"{', '.join(sorted(_BUILDERS))}) and is not a saved dataset")
    return sorted(files)


def _split_error(config: DatasetConfig, error: Exception) -> DataError:
    return DataError(f"cannot read split {config.split!r} of dataset {config.path!r}: {error}")


def _load_files(config: DatasetConfig, files: list[pathlib.Path]) -> Any:
    builders = {_builder_of(f) for f in files}
    if None in builders:
        bad = next(f for f in files if _builder_of(f) is None)
        raise DataError(f"cannot tell the format of {str(bad)!r} from its suffix; supported: "
                        f"{', '.join(sorted(_BUILDERS))}")
    if len(builders) > 1:
        kinds = sorted({_format_suffix(f) for f in files})
        raise DataError(f"dataset {config.path!r} mixes file formats ({', '.join(kinds)}); "
                        "use a glob that selects one format")
    builder = builders.pop()
    kwargs: dict[str, Any] = {"sample_by": config.sample_by} if builder == "text" else {}
    if builder == "tsv":
        builder, kwargs = "csv", {"sep": "\t"}
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split=config.split,
                                     cache_dir=config.cache_dir, **kwargs)
    except Exception as e:
        if isinstance(e, (ValueError, KeyError)) and "split" in str(e).lower():
            raise _split_error(config, e) from e
        # malformed files: report them as data problems with the parser's message
        raise DataError(f"cannot read dataset {config.path!r} ({builder} files): {type(e).__name__}: {e}") from e


def _load_saved(config: DatasetConfig, directory: pathlib.Path) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(directory))
    if isinstance(loaded, datasets.DatasetDict):
        if config.split not in loaded:
            splits = list(loaded)
            raise DataError(f"saved dataset {config.path!r} has no split {config.split!r}; its splits are "
                            f"{', '.join(map(repr, splits))}{did_you_mean(config.split, splits)}")
        loaded = loaded[config.split]
    return loaded


def _load_builtin(config: DatasetConfig) -> Any:
    import datasets

    from lmsae.data.corpus import builtin_corpus_path, read_corpus

    # A few MB: reading the JSONL directly is faster than the datasets json builder and writes
    # nothing to the Hugging Face cache.
    dataset = datasets.Dataset.from_dict(read_corpus(builtin_corpus_path()))
    if config.split == "train":
        return dataset
    # the corpus is one 'train' split; slices such as 'train[:1000]' or 'train[90%:]' select from it
    try:
        parts = datasets.ReadInstruction.from_spec(config.split).to_absolute({"train": len(dataset)})
    except (ValueError, AssertionError) as e:
        raise _split_error(config, e) from e
    indices = [i for part in parts for i in range(part.from_ or 0, len(dataset) if part.to is None else part.to)]
    return dataset.select(indices)


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _load_hub(config: DatasetConfig) -> Any:
    import datasets

    try:
        return datasets.load_dataset(config.path, config.name, split=config.split, cache_dir=config.cache_dir)
    except Exception as e:
        if _offline():
            raise DataError(
                f"dataset {config.path!r} is not a local path and is not in the Hugging Face cache, and downloads "
                "are disabled (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); use a local file, a directory saved with "
                f"Dataset.save_to_disk, or 'builtin:python-docs' ({type(e).__name__}: {e})") from e
        raise DataError(f"cannot load dataset {config.path!r} from the Hugging Face Hub "
                        f"({type(e).__name__}: {e})") from e
