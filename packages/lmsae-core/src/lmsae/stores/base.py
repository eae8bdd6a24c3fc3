"""The store contract: records and the abstract :class:`Store`.

Two backends implement it (one contract test suite for both): an embedded default (SQLite from
the standard library plus files, no server) and MongoDB (pymongo). Every record is identified by
the dictionary's ``(name, series)`` and, for per-feature records, the feature ``index``.

Arrays are ``numpy.ndarray`` in records and are stored without pickle (safetensors bytes).
Writing a record with the same key replaces it (upsert). Removing a dictionary removes everything
recorded about it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import numpy as np


def _arr(value: Any) -> np.ndarray:
    return np.asarray(value)


@attrs.frozen
class DictionaryRecord:
    """A trained dictionary known to the store."""

    name: str
    series: str
    path: str
    #: the architecture config as plain data (config.json)
    config: dict[str, Any]
    model_name: str | None = None
    created_at: float = 0.0


@attrs.frozen
class NamedConfigRecord:
    """A language model or a dataset: a name and its config as plain data."""

    name: str
    config: dict[str, Any]


@attrs.frozen
class Sample:
    """One context of a feature: its tokens and the feature's activation on every token.

    ``tokens`` int64 (T,), ``activations`` float32 (T,) (0 where the feature is off or the token
    is masked), ``meta``: where the context came from (dataset, document_index, offset, ...).
    Extra per-sample arrays (e.g. Lorsa's attention contributions, stored sparse) go in ``extras``.
    """

    tokens: np.ndarray = attrs.field(converter=_arr)
    activations: np.ndarray = attrs.field(converter=_arr)
    meta: dict[str, Any] = attrs.field(factory=dict)
    extras: dict[str, np.ndarray] = attrs.field(factory=dict)

    @property
    def peak(self) -> float:
        return float(self.activations.max()) if self.activations.size else 0.0


@attrs.frozen
class Sampling:
    """A named group of samples (``top_activations``, ``quantile_0.25-0.50``, ...)."""

    name: str
    samples: tuple[Sample, ...] = attrs.field(converter=tuple)


@attrs.frozen
class FeatureAnalysis:
    """Statistics and examples of one feature, from one analysis run (``analysis_name``)."""

    index: int
    #: tokens on which the feature fired (> 0)
    act_count: int
    #: tokens analysed (masked tokens excluded)
    n_tokens: int
    max_activation: float
    #: counts of non-zero activations per bin; ``histogram_edges`` has len(counts) + 1 entries
    histogram_counts: np.ndarray = attrs.field(converter=_arr)
    histogram_edges: np.ndarray = attrs.field(converter=_arr)
    samplings: tuple[Sampling, ...] = attrs.field(converter=tuple, factory=tuple)
    #: architecture extras (e.g. decoder norms per head), arrays or JSON scalars
    extras: dict[str, Any] = attrs.field(factory=dict)

    @property
    def density(self) -> float:
        return self.act_count / self.n_tokens if self.n_tokens else 0.0


@attrs.frozen
class TokenLogit:
    token_id: int
    token: str
    logit: float


@attrs.frozen
class LogitAttribution:
    """Direct logit attribution of one feature: the output tokens its decoder direction promotes
    and suppresses (through the final norm and the unembedding)."""

    index: int
    top_positive: tuple[TokenLogit, ...] = attrs.field(converter=tuple)
    top_negative: tuple[TokenLogit, ...] = attrs.field(converter=tuple)


@attrs.frozen
class Interpretation:
    """A natural-language explanation of one feature and how well it predicts activations.

    ``scores``: e.g. ``{"detection": 0.83, "fuzzing": 0.71}`` (balanced accuracies in [0, 1]);
    ``details``: prompts/answers or per-example results for auditing.
    """

    index: int
    text: str
    explainer_model: str
    scores: dict[str, float] = attrs.field(factory=dict)
    details: dict[str, Any] = attrs.field(factory=dict)
    created_at: float = 0.0


@attrs.frozen
class EvaluationRecord:
    """Metrics of one evaluation run of a dictionary (``name`` distinguishes runs)."""

    name: str
    metrics: dict[str, float]
    #: e.g. the feature-density histogram
    arrays: dict[str, np.ndarray] = attrs.field(factory=dict)
    config: dict[str, Any] = attrs.field(factory=dict)
    created_at: float = 0.0


class Store(abc.ABC):
    """Abstract store. Backends raise :class:`lmsae.errors.StoreError` for unreachable servers and
    I/O failures (never hang: connection attempts have a short timeout)."""

    # --- language models and datasets ---------------------------------------------------------

    # Both kinds are a name and a config; a backend stores them in two tables/collections
    # named "language_models" and "datasets" through these two primitives.

    @abc.abstractmethod
    def _put_named(self, table: str, record: NamedConfigRecord) -> None: ...

    @abc.abstractmethod
    def _get_named(self, table: str, name: str) -> NamedConfigRecord | None: ...

    def put_language_model(self, record: NamedConfigRecord) -> None:
        self._put_named("language_models", record)

    def get_language_model(self, name: str) -> NamedConfigRecord | None:
        return self._get_named("language_models", name)

    def put_dataset(self, record: NamedConfigRecord) -> None:
        self._put_named("datasets", record)

    def get_dataset(self, name: str) -> NamedConfigRecord | None:
        return self._get_named("datasets", name)

    # --- dictionaries ---------------------------------------------------------------------

    @abc.abstractmethod
    def put_dictionary(self, record: DictionaryRecord) -> None: ...

    @abc.abstractmethod
    def get_dictionary(self, name: str, series: str = "default") -> DictionaryRecord | None: ...

    @abc.abstractmethod
    def list_dictionaries(self, series: str | None = None) -> list[DictionaryRecord]: ...

    @abc.abstractmethod
    def remove_dictionary(self, name: str, series: str = "default") -> bool:
        """Remove the dictionary and everything recorded about it; False if it was unknown."""

    # --- per-feature analyses -------------------------------------------------------------

    @abc.abstractmethod
    def put_feature_analyses(self, name: str, series: str, analysis: str,
                             features: Iterable[FeatureAnalysis]) -> None:
        """Store analyses of features (the dictionary must be known: StoreError otherwise)."""

    @abc.abstractmethod
    def get_feature_analysis(self, name: str, series: str, index: int,
                             analysis: str = "default") -> FeatureAnalysis | None: ...

    @abc.abstractmethod
    def list_analyses(self, name: str, series: str = "default") -> list[str]: ...

    @abc.abstractmethod
    def feature_statistics(self, name: str, series: str, analysis: str = "default") -> dict[str, np.ndarray]:
        """Per-feature columns for listing and sorting without loading samples:
        ``{"index", "act_count", "n_tokens", "max_activation"}`` (arrays of equal length, sorted by index)."""

    # --- logit attributions and interpretations -------------------------------------------

    @abc.abstractmethod
    def put_logit_attributions(self, name: str, series: str, attributions: Iterable[LogitAttribution]) -> None: ...

    @abc.abstractmethod
    def get_logit_attribution(self, name: str, series: str, index: int) -> LogitAttribution | None: ...

    @abc.abstractmethod
    def put_interpretation(self, name: str, series: str, interpretation: Interpretation) -> None: ...

    @abc.abstractmethod
    def get_interpretation(self, name: str, series: str, index: int) -> Interpretation | None: ...

    @abc.abstractmethod
    def interpreted_features(self, name: str, series: str) -> set[int]:
        """Indices of features that already have an interpretation (for resumable auto-interp)."""

    # --- evaluations -------------------------------------------------------------------------

    @abc.abstractmethod
    def put_evaluation(self, name: str, series: str, record: EvaluationRecord) -> None: ...

    @abc.abstractmethod
    def list_evaluations(self, name: str, series: str = "default") -> list[EvaluationRecord]: ...

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release connections and files."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def dictionary_or_error(store: Store, name: str, series: str) -> DictionaryRecord:
    """The dictionary record, or :class:`lmsae.errors.StoreError` listing the known ones."""
    from lmsae._text import did_you_mean
    from lmsae.errors import StoreError

    record = store.get_dictionary(name, series)
    if record is None:
        known = [d.name for d in store.list_dictionaries(series)]
        raise StoreError(f"no dictionary {name!r} in series {series!r}; known: {', '.join(known) or '(none)'}"
                         f"{did_you_mean(name, known)}")
    return record


__all__: Sequence[str] = [
    "DictionaryRecord", "EvaluationRecord", "FeatureAnalysis", "Interpretation", "LogitAttribution",
    "NamedConfigRecord", "Sample", "Sampling", "Store", "TokenLogit", "dictionary_or_error",
]
