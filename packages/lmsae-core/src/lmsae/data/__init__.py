"""Text data for activation sources: datasets, the built-in corpus, and context windows.

- :mod:`lmsae.data.datasets`: :class:`DatasetConfig` and :func:`load_documents` (local files,
  saved datasets, cached Hub datasets, ``builtin:python-docs``), sharded over data-parallel ranks;
- :mod:`lmsae.data.corpus`: ``builtin:python-docs``, Python's documentation, built and cached
  locally (no download);
- :mod:`lmsae.data.windows`: :func:`pack` / :func:`pad_truncate` (token sequences -> resumable
  fixed-size windows) and :func:`training_mask`.

Importing this package does not import the optional ``datasets`` library.
"""

from lmsae.data.corpus import BUILTIN_CORPORA, builtin_corpus_document_count, builtin_corpus_path, cache_dir
from lmsae.data.datasets import BUILTIN_PREFIX, DatasetConfig, iter_texts, load_documents, shard_bounds, take_shard
from lmsae.data.windows import Window, WindowIterator, WindowState, pack, pad_truncate, training_mask

__all__ = [
    "BUILTIN_CORPORA",
    "BUILTIN_PREFIX",
    "DatasetConfig",
    "Window",
    "WindowIterator",
    "WindowState",
    "builtin_corpus_document_count",
    "builtin_corpus_path",
    "cache_dir",
    "iter_texts",
    "load_documents",
    "pack",
    "pad_truncate",
    "shard_bounds",
    "take_shard",
    "training_mask",
]
