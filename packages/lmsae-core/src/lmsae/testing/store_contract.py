"""The store contract: one test suite every :class:`lmsae.stores.base.Store` backend passes.

Both built-in stores (``local`` and ``mongo``) pass it, and so should a plugin's store. A
backend's test module subclasses :class:`StoreContract` (the name does not start with ``Test``,
so the base class itself is not collected) and overrides the ``store`` fixture with a fresh,
empty store::

    import pytest

    from lmsae.testing.store_contract import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self, tmp_path):
            with MyStore(MyStoreConfig(directory=tmp_path / "store")) as s:
                yield s

The record factories (``make_dictionary``, ``make_feature``, ...) and :func:`assert_same` (exact
comparison, arrays included) are public too, for a backend's own extra tests. The class
attribute ``many_features`` (default 2000) is the size of the speed test, which must store them
in under 5 seconds; lower it only for a test double, not for the real backend.
"""

from __future__ import annotations

import math
import time
from typing import Any

import attrs
import numpy as np
import pytest

from lmsae.errors import StoreError
from lmsae.stores.base import (
    DictionaryRecord,
    EvaluationRecord,
    FeatureAnalysis,
    Interpretation,
    LogitAttribution,
    NamedConfigRecord,
    Sample,
    Sampling,
    Store,
    TokenLogit,
)

__all__ = ["StoreContract", "assert_same", "make_dictionary", "make_evaluation", "make_feature",
           "make_interpretation", "make_logits", "make_sample", "make_small_feature"]

# --------------------------------------------------------------------------------------------
# Exact comparison of records holding numpy arrays


def _expect(condition: bool, message: str) -> None:
    """An assertion that holds under ``python -O`` too (plain ``assert`` statements are removed)."""
    if not condition:
        raise AssertionError(message)


def assert_same(actual: Any, expected: Any, path: str = "$") -> None:
    """Deep equality where arrays must match in dtype, shape and values (NaN equals NaN),
    tuples stay tuples and attrs records are compared field by field."""
    if attrs.has(type(expected)):
        _expect(type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}")
        for field in attrs.fields(type(expected)):
            assert_same(getattr(actual, field.name), getattr(expected, field.name), f"{path}.{field.name}")
        return
    if isinstance(expected, np.ndarray):
        _expect(isinstance(actual, np.ndarray), f"{path}: {type(actual).__name__} is not an array")
        _expect(actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}")
        _expect(actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}")
        equal_nan = expected.dtype.kind == "f"
        _expect(np.array_equal(actual, expected, equal_nan=equal_nan), f"{path}: values differ")
        return
    if isinstance(expected, dict):
        _expect(isinstance(actual, dict), f"{path}: {type(actual).__name__} is not a dict")
        _expect(list(actual) == list(expected) or set(actual) == set(expected),
                f"{path}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}")
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}[{key!r}]")
        return
    if isinstance(expected, (list, tuple)):
        _expect(type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}")
        _expect(len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]")
        return
    if isinstance(expected, float) and math.isnan(expected):
        _expect(isinstance(actual, float) and math.isnan(actual), f"{path}: {actual!r} is not NaN")
        return
    _expect(type(actual) is type(expected) or (isinstance(actual, (int, float)) and isinstance(expected, (int, float))
                                               and not isinstance(expected, bool)),
            f"{path}: type {type(actual).__name__} != {type(expected).__name__}")
    _expect(actual == expected, f"{path}: {actual!r} != {expected!r}")


# --------------------------------------------------------------------------------------------
# Record factories


def make_dictionary(name: str = "sae-l3", series: str = "default", **overrides: Any) -> DictionaryRecord:
    values = {"path": f"/results/{series}/{name}", "model_name": "gpt2",
              "config": {"architecture": "sae", "d_model": 8, "d_sae": 32,
                         "hooks": ["blocks.3.hook_resid_post"],
                         "dataset_norms": {"blocks.3.hook_resid_post": 12.5}, "act_fn": {"name": "topk", "k": 4}},
              "created_at": 1_700_000_000.25}
    values.update(overrides)
    return DictionaryRecord(name=name, series=series, **values)


def make_sample(rng: np.random.Generator, length: int, doc: int) -> Sample:
    activations = np.maximum(rng.normal(size=length), 0).astype(np.float32)
    return Sample(
        tokens=rng.integers(0, 50_000, size=length, dtype=np.int64),
        activations=activations,
        meta={"dataset": "openwebtext", "document_index": doc, "offset": 128, "shard": (1, 4),
              "notes": {"tags": ["a", "b"], "score": 0.5, "missing": None}},
        extras={"z_pattern_indices": rng.integers(0, length, size=(2, 3)).astype(np.int32),
                "z_pattern_values": rng.normal(size=3).astype(np.float16)},
    )


def make_feature(index: int, seed: int = 0, n_samples: int = 3, length: int = 12) -> FeatureAnalysis:
    rng = np.random.default_rng(seed * 100_003 + index)
    top = [make_sample(rng, length, doc) for doc in range(n_samples)]
    quantile = [make_sample(rng, length // 2 or 1, 100 + doc) for doc in range(2)]
    empty = Sample(tokens=np.zeros(0, dtype=np.int64), activations=np.zeros(0, dtype=np.float32))
    return FeatureAnalysis(
        index=index,
        act_count=int(rng.integers(1, 1000)),
        n_tokens=100_000 + seed,
        max_activation=float(rng.uniform(1, 10)),
        histogram_counts=rng.integers(0, 100, size=10).astype(np.int64),
        histogram_edges=np.linspace(0.0, 5.0, 11, dtype=np.float32),
        samplings=(Sampling("top_activations", top), Sampling("quantile_0.25-0.50", quantile),
                   Sampling("non_activating", [empty]), Sampling("nothing", [])),
        extras={"decoder_norms": rng.normal(size=(2, 4)).astype(np.float64), "norm": 1.25, "heads": 2,
                "flag": True, "label": "attn", "undefined": float("nan"), "floor": float("-inf"),
                "scalar_array": np.array(3.5, dtype=np.float32), "bools": np.array([True, False, True])},
    )


def make_small_feature(index: int) -> FeatureAnalysis:
    return FeatureAnalysis(
        index=index, act_count=index % 7, n_tokens=4096, max_activation=index / 10,
        histogram_counts=np.array([index % 3, 1], dtype=np.int64), histogram_edges=np.array([0.0, 0.5, 1.0]),
        samplings=(Sampling("top_activations", [Sample(np.arange(8, dtype=np.int64),
                                                       np.linspace(0, 1, 8, dtype=np.float32),
                                                       {"document_index": index})]),),
    )


def make_logits(index: int) -> LogitAttribution:
    return LogitAttribution(
        index=index,
        top_positive=(TokenLogit(15496, "ĠHello", 3.25), TokenLogit(3, "日本語", 2.0), TokenLogit(198, "\n", 1.5)),
        top_negative=(TokenLogit(7, '"quoted"', -2.5), TokenLogit(8, "", float("-inf"))),
    )


def make_interpretation(index: int, text: str = "mentions of cities in France", **overrides: Any) -> Interpretation:
    values = {"explainer_model": "gpt-4o-mini", "scores": {"detection": 0.83, "fuzzing": 0.71},
              "details": {"prompt": "Explain...", "answers": [True, False, True],
                          "per_example": [{"activation": 1.5, "correct": True}],
                          "activations": np.array([0.0, 1.5, 2.25], dtype=np.float32)},
              "created_at": 1_700_000_100.5}
    values.update(overrides)
    return Interpretation(index=index, text=text, **values)


def make_evaluation(name: str, ev: float = 0.91) -> EvaluationRecord:
    return EvaluationRecord(
        name=name,
        metrics={"explained_variance": ev, "l0": 32.5, "metrics/ce_loss_delta.blocks.3": 0.12,
                 "dead": float("nan")},
        arrays={"density_histogram": np.arange(20, dtype=np.int64),
                "per_feature_density": np.linspace(0, 1, 32, dtype=np.float32)},
        config={"total_tokens": 1_000_000, "hooks": ("blocks.3.hook_resid_post",)},
        created_at=1_700_000_200.0,
    )


# --------------------------------------------------------------------------------------------
# The suite


class StoreContract:
    """Tests every store backend passes; subclasses override the ``store`` fixture."""

    #: features written by test_many_features_are_fast, which must take under 5 seconds
    many_features = 2000

    @pytest.fixture
    def store(self) -> Store:  # pragma: no cover - always overridden
        raise NotImplementedError("override the 'store' fixture")

    @pytest.fixture
    def known(self, store: Store) -> Store:
        """The store with two dictionaries registered: sae-l3 (default) and sae-l3 (sweep)."""
        store.put_dictionary(make_dictionary())
        store.put_dictionary(make_dictionary(series="sweep"))
        return store

    # --- language models and datasets ---------------------------------------------------------

    def test_language_models_round_trip_and_replace(self, store: Store) -> None:
        assert store.get_language_model("gpt2") is None
        record = NamedConfigRecord("gpt2", {"backend": "transformer_lens", "model_name": "gpt2", "dtype": "float32",
                                            "n_ctx": 1024, "fold_ln": True, "extra": {"a.b": [1, 2], "$x": None}})
        store.put_language_model(record)
        assert_same(store.get_language_model("gpt2"), record)
        replaced = NamedConfigRecord("gpt2", {"backend": "hf"})
        store.put_language_model(replaced)
        assert_same(store.get_language_model("gpt2"), replaced)
        assert store.get_dataset("gpt2") is None

    def test_datasets_round_trip_and_replace(self, store: Store) -> None:
        assert store.get_dataset("owt") is None
        record = NamedConfigRecord("owt", {"path": "Skylion007/openwebtext", "split": "train", "shards": (0, 8)})
        store.put_dataset(record)
        assert_same(store.get_dataset("owt"), record)
        store.put_dataset(NamedConfigRecord("owt", {}))
        assert_same(store.get_dataset("owt"), NamedConfigRecord("owt", {}))
        assert store.get_language_model("owt") is None

    # --- dictionaries ---------------------------------------------------------------------

    def test_dictionary_round_trip(self, store: Store) -> None:
        record = make_dictionary()
        store.put_dictionary(record)
        assert_same(store.get_dictionary("sae-l3"), record)
        assert_same(store.get_dictionary("sae-l3", "default"), record)
        assert store.get_dictionary("sae-l3", "other") is None
        assert store.get_dictionary("nope") is None
        minimal = DictionaryRecord("bare", "default", "/x", {})
        store.put_dictionary(minimal)
        assert_same(store.get_dictionary("bare"), minimal)

    def test_list_dictionaries_sorted_and_filtered_by_series(self, store: Store) -> None:
        assert store.list_dictionaries() == []
        for name, series in [("b", "default"), ("a", "sweep"), ("a", "default"), ("c", "sweep")]:
            store.put_dictionary(make_dictionary(name, series))
        assert [(d.name, d.series) for d in store.list_dictionaries()] == [
            ("a", "default"), ("a", "sweep"), ("b", "default"), ("c", "sweep")]
        assert [d.name for d in store.list_dictionaries("sweep")] == ["a", "c"]
        assert [d.name for d in store.list_dictionaries("default")] == ["a", "b"]
        assert store.list_dictionaries("missing") == []

    def test_put_dictionary_twice_replaces_and_keeps_what_is_recorded(self, known: Store) -> None:
        known.put_feature_analyses("sae-l3", "default", "default", [make_small_feature(0)])
        known.put_evaluation("sae-l3", "default", make_evaluation("eval"))
        updated = make_dictionary(path="/moved", model_name=None, config={"architecture": "sae", "d_sae": 64})
        known.put_dictionary(updated)
        assert_same(known.get_dictionary("sae-l3"), updated)
        assert len(known.list_dictionaries()) == 2
        # Re-registering is an update, not a remove + insert: nothing recorded is lost.
        assert known.list_analyses("sae-l3") == ["default"]
        assert [e.name for e in known.list_evaluations("sae-l3")] == ["eval"]

    def test_remove_dictionary(self, known: Store) -> None:
        assert known.remove_dictionary("sae-l3") is True
        assert known.get_dictionary("sae-l3") is None
        assert known.get_dictionary("sae-l3", "sweep") is not None
        assert known.remove_dictionary("sae-l3") is False
        assert known.remove_dictionary("never-there", "default") is False
        assert [d.series for d in known.list_dictionaries()] == ["sweep"]

    def test_remove_dictionary_cascades(self, known: Store) -> None:
        for series in ("default", "sweep"):
            known.put_feature_analyses("sae-l3", series, "default", [make_feature(i) for i in range(3)])
            known.put_feature_analyses("sae-l3", series, "second", [make_small_feature(0)])
            known.put_logit_attributions("sae-l3", series, [make_logits(0), make_logits(2)])
            known.put_interpretation("sae-l3", series, make_interpretation(1))
            known.put_evaluation("sae-l3", series, make_evaluation("eval"))

        assert known.remove_dictionary("sae-l3", "default")

        assert known.list_analyses("sae-l3", "default") == []
        assert known.feature_statistics("sae-l3", "default")["index"].size == 0
        assert known.get_feature_analysis("sae-l3", "default", 0) is None
        assert known.get_feature_analysis("sae-l3", "default", 0, "second") is None
        assert known.get_logit_attribution("sae-l3", "default", 0) is None
        assert known.get_interpretation("sae-l3", "default", 1) is None
        assert known.interpreted_features("sae-l3", "default") == set()
        assert known.list_evaluations("sae-l3", "default") == []
        # The same name in another series is untouched.
        assert known.list_analyses("sae-l3", "sweep") == ["default", "second"]
        assert_same(known.get_feature_analysis("sae-l3", "sweep", 2), make_feature(2))
        assert known.get_logit_attribution("sae-l3", "sweep", 2) is not None
        assert known.interpreted_features("sae-l3", "sweep") == {1}
        assert len(known.list_evaluations("sae-l3", "sweep")) == 1
        # A new dictionary with the removed name starts empty.
        known.put_dictionary(make_dictionary())
        assert known.list_analyses("sae-l3") == []
        assert known.list_evaluations("sae-l3") == []
        assert known.get_logit_attribution("sae-l3", "default", 0) is None

    # --- per-feature analyses -------------------------------------------------------------

    def test_feature_analyses_round_trip_exactly(self, known: Store) -> None:
        features = [make_feature(i, seed=1) for i in (0, 5, 7)]
        known.put_feature_analyses("sae-l3", "default", "default", features)
        for feature in features:
            got = known.get_feature_analysis("sae-l3", "default", feature.index)
            assert got is not None
            assert_same(got, feature)
        # Spot checks that the helper really compares what matters.
        got = known.get_feature_analysis("sae-l3", "default", 5)
        assert got.samplings[0].samples[0].tokens.dtype == np.int64
        assert got.samplings[0].samples[0].activations.dtype == np.float32
        assert got.samplings[0].samples[0].meta["shard"] == (1, 4)
        assert got.samplings[0].samples[0].extras["z_pattern_values"].dtype == np.float16
        assert got.histogram_edges.dtype == np.float32
        assert got.extras["scalar_array"].shape == ()
        assert math.isnan(got.extras["undefined"])
        assert got.density == features[1].act_count / features[1].n_tokens

    def test_feature_analysis_special_values(self, known: Store) -> None:
        feature = attrs.evolve(make_small_feature(3), max_activation=float("nan"), n_tokens=0,
                               histogram_counts=np.zeros(0, dtype=np.int64),
                               histogram_edges=np.zeros(1, dtype=np.float64),
                               extras={"__array__": "not a reference", "__dict__": {"x": 1},
                                       "big": 2**62, "neg": -(2**40), "empty": {}, "list": [],
                                       "matrix": np.zeros((0, 3), dtype=np.uint8), "mixed": [1, "a", None, 2.5]})
        known.put_feature_analyses("sae-l3", "default", "default", [feature])
        assert_same(known.get_feature_analysis("sae-l3", "default", 3), feature)
        stats = known.feature_statistics("sae-l3", "default")
        assert math.isnan(stats["max_activation"][0])

    def test_missing_feature_analysis_is_none(self, known: Store) -> None:
        known.put_feature_analyses("sae-l3", "default", "default", [make_small_feature(1)])
        assert known.get_feature_analysis("sae-l3", "default", 2) is None
        assert known.get_feature_analysis("sae-l3", "default", 1, analysis="other") is None
        assert known.get_feature_analysis("sae-l3", "sweep", 1) is None
        assert known.get_feature_analysis("unknown", "default", 1) is None

    def test_feature_statistics_sorted_by_index(self, known: Store) -> None:
        order = [9, 2, 31, 0, 4]
        features = [make_feature(i) for i in order]
        known.put_feature_analyses("sae-l3", "default", "default", features[:3])
        known.put_feature_analyses("sae-l3", "default", "default", features[3:])
        stats = known.feature_statistics("sae-l3", "default", "default")
        assert set(stats) == {"index", "act_count", "n_tokens", "max_activation"}
        by_index = {f.index: f for f in features}
        expected = sorted(order)
        np.testing.assert_array_equal(stats["index"], expected)
        np.testing.assert_array_equal(stats["act_count"], [by_index[i].act_count for i in expected])
        np.testing.assert_array_equal(stats["n_tokens"], [by_index[i].n_tokens for i in expected])
        np.testing.assert_array_equal(stats["max_activation"], [by_index[i].max_activation for i in expected])
        assert stats["index"].dtype.kind == "i" and stats["act_count"].dtype.kind == "i"
        assert stats["n_tokens"].dtype.kind == "i" and stats["max_activation"].dtype.kind == "f"
        assert all(len(v) == len(order) for v in stats.values())

    def test_feature_statistics_of_unknown_analysis_is_empty(self, known: Store) -> None:
        for stats in (known.feature_statistics("sae-l3", "default", "nothing"),
                      known.feature_statistics("unknown", "default")):
            assert set(stats) == {"index", "act_count", "n_tokens", "max_activation"}
            assert all(v.size == 0 for v in stats.values())

    def test_list_analyses(self, known: Store) -> None:
        assert known.list_analyses("sae-l3") == []
        known.put_feature_analyses("sae-l3", "default", "zeta", [make_small_feature(0)])
        known.put_feature_analyses("sae-l3", "default", "default", [make_small_feature(1)])
        known.put_feature_analyses("sae-l3", "default", "alpha", [make_small_feature(2)])
        known.put_feature_analyses("sae-l3", "sweep", "only-in-sweep", [make_small_feature(2)])
        # Writing nothing is not an error and records no analysis.
        known.put_feature_analyses("sae-l3", "default", "empty", [])
        assert known.list_analyses("sae-l3") == ["alpha", "default", "zeta"]
        assert known.list_analyses("sae-l3", "default") == ["alpha", "default", "zeta"]
        assert known.list_analyses("sae-l3", "sweep") == ["only-in-sweep"]
        assert known.list_analyses("unknown") == []
        # Analyses are separate: each has only its own features.
        assert known.get_feature_analysis("sae-l3", "default", 0, "zeta") is not None
        assert known.get_feature_analysis("sae-l3", "default", 0, "default") is None
        np.testing.assert_array_equal(known.feature_statistics("sae-l3", "default", "alpha")["index"], [2])

    def test_put_for_unknown_dictionary_raises(self, known: Store) -> None:
        with pytest.raises(StoreError, match="sae-l4"):
            known.put_feature_analyses("sae-l4", "default", "default", [make_small_feature(0)])
        with pytest.raises(StoreError):
            known.put_feature_analyses("sae-l3", "missing-series", "default", [make_small_feature(0)])
        with pytest.raises(StoreError):
            known.put_feature_analyses("sae-l4", "default", "default", [])
        with pytest.raises(StoreError):
            known.put_logit_attributions("sae-l4", "default", [make_logits(0)])
        with pytest.raises(StoreError):
            known.put_interpretation("sae-l4", "default", make_interpretation(0))
        with pytest.raises(StoreError):
            known.put_evaluation("sae-l4", "default", make_evaluation("eval"))
        assert known.get_feature_analysis("sae-l4", "default", 0) is None
        assert known.list_analyses("sae-l3") == []

    def test_writing_a_feature_twice_replaces_it(self, known: Store) -> None:
        known.put_feature_analyses("sae-l3", "default", "default", [make_feature(i) for i in range(4)])
        replacement = make_feature(2, seed=9, n_samples=1)
        known.put_feature_analyses("sae-l3", "default", "default", [replacement])
        assert_same(known.get_feature_analysis("sae-l3", "default", 2), replacement)
        assert_same(known.get_feature_analysis("sae-l3", "default", 1), make_feature(1))
        stats = known.feature_statistics("sae-l3", "default")
        np.testing.assert_array_equal(stats["index"], [0, 1, 2, 3])
        assert stats["act_count"][2] == replacement.act_count

    def test_unstorable_values_raise_store_error(self, known: Store) -> None:
        bad_meta = attrs.evolve(make_small_feature(0), extras={"set": {1, 2}})
        with pytest.raises(StoreError, match="set"):
            known.put_feature_analyses("sae-l3", "default", "default", [bad_meta])
        bad_array = attrs.evolve(make_small_feature(0), extras={"strings": np.array(["a", "b"])})
        with pytest.raises(StoreError, match="dtype"):
            known.put_feature_analyses("sae-l3", "default", "default", [bad_array])
        assert known.get_feature_analysis("sae-l3", "default", 0) is None

    def test_many_features_are_fast(self, known: Store) -> None:
        n = self.many_features
        start = time.perf_counter()
        known.put_feature_analyses("sae-l3", "default", "default", (make_small_feature(i) for i in range(n)))
        stats = known.feature_statistics("sae-l3", "default")
        elapsed = time.perf_counter() - start
        np.testing.assert_array_equal(stats["index"], np.arange(n))
        assert_same(known.get_feature_analysis("sae-l3", "default", n - 1), make_small_feature(n - 1))
        assert elapsed < 5.0, f"storing {n} features took {elapsed:.2f} s"

    # --- logit attributions and interpretations -------------------------------------------

    def test_logit_attributions_round_trip_and_replace(self, known: Store) -> None:
        assert known.get_logit_attribution("sae-l3", "default", 0) is None
        records = [make_logits(i) for i in (0, 3)]
        known.put_logit_attributions("sae-l3", "default", iter(records))
        for record in records:
            assert_same(known.get_logit_attribution("sae-l3", "default", record.index), record)
        assert known.get_logit_attribution("sae-l3", "sweep", 0) is None
        replacement = LogitAttribution(3, [TokenLogit(1, "a", 0.5)], [])
        known.put_logit_attributions("sae-l3", "default", [replacement])
        assert_same(known.get_logit_attribution("sae-l3", "default", 3), replacement)
        assert_same(known.get_logit_attribution("sae-l3", "default", 0), records[0])
        known.put_logit_attributions("sae-l3", "default", [])

    def test_interpretations_round_trip_and_replace(self, known: Store) -> None:
        assert known.get_interpretation("sae-l3", "default", 4) is None
        assert known.interpreted_features("sae-l3", "default") == set()
        record = make_interpretation(4)
        known.put_interpretation("sae-l3", "default", record)
        assert_same(known.get_interpretation("sae-l3", "default", 4), record)
        known.put_interpretation("sae-l3", "default", make_interpretation(9, text="", scores={}, details={}))
        known.put_interpretation("sae-l3", "sweep", make_interpretation(5))
        assert known.interpreted_features("sae-l3", "default") == {4, 9}
        assert known.interpreted_features("sae-l3", "sweep") == {5}
        assert known.interpreted_features("unknown", "default") == set()
        replacement = make_interpretation(4, text="the token 'Paris'", explainer_model="local-llm",
                                          scores={"detection": float("nan")}, created_at=5.0)
        known.put_interpretation("sae-l3", "default", replacement)
        assert_same(known.get_interpretation("sae-l3", "default", 4), replacement)
        assert known.interpreted_features("sae-l3", "default") == {4, 9}

    # --- evaluations -------------------------------------------------------------------------

    def test_evaluations_in_insertion_order(self, known: Store) -> None:
        assert known.list_evaluations("sae-l3") == []
        names = ["zz-first", "aa-second", "mm-third"]
        records = [make_evaluation(n, ev=i / 10) for i, n in enumerate(names)]
        for record in records:
            known.put_evaluation("sae-l3", "default", record)
        got = known.list_evaluations("sae-l3", "default")
        assert [e.name for e in got] == names
        for actual, expected in zip(got, records):
            assert_same(actual, expected)
        assert known.list_evaluations("sae-l3", "sweep") == []

    def test_writing_an_evaluation_twice_replaces_it(self, known: Store) -> None:
        for name in ("a", "b", "c"):
            known.put_evaluation("sae-l3", "default", make_evaluation(name))
        replacement = make_evaluation("a", ev=0.5)
        known.put_evaluation("sae-l3", "default", replacement)
        got = known.list_evaluations("sae-l3", "default")
        # One record per name; the rewritten one is the latest.
        assert [e.name for e in got] == ["b", "c", "a"]
        assert_same(got[-1], replacement)

    # --- lifecycle ---------------------------------------------------------------------------

    def test_context_manager_returns_the_store(self, store: Store) -> None:
        with store as entered:
            assert entered is store
