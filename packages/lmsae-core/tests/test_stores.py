"""Both store backends against the one contract suite, plus backend-specific behaviour."""

from __future__ import annotations

import ast
import os
import pathlib
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from lmsae.errors import StoreError
from lmsae.stores.configs import LocalStoreConfig, MongoStoreConfig
from lmsae.testing import store_contract as contract
from lmsae.testing.store_contract import StoreContract, assert_same

STORES_SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "lmsae" / "stores"
REAL_MONGO_URI = os.environ.get("LMSAE_TEST_MONGO_URI")


def _local(directory: pathlib.Path):
    from lmsae.stores.local import LocalStore

    return LocalStore(LocalStoreConfig(directory=directory))


# --------------------------------------------------------------------------------------------
# Local (SQLite)


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        with _local(tmp_path / "store") as s:
            yield s


class TestLocalStoreSpecifics:
    def test_layout_and_schema_version(self, tmp_path):
        from lmsae.stores.local import DATABASE_NAME, SCHEMA_VERSION

        with _local(tmp_path / "a" / "b") as store:
            assert store.schema_version() == SCHEMA_VERSION
            assert store.path == tmp_path / "a" / "b" / DATABASE_NAME
        assert (tmp_path / "a" / "b" / DATABASE_NAME).is_file()
        db = sqlite3.connect(tmp_path / "a" / "b" / DATABASE_NAME)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        db.close()

    def test_directory_given_as_str_and_default_from_env(self, tmp_path, monkeypatch):
        from lmsae.stores.local import LocalStore

        with LocalStore(LocalStoreConfig(directory=str(tmp_path / "s"))) as store:  # type: ignore[arg-type]
            assert store.directory == tmp_path / "s"
        monkeypatch.setenv("LMSAE_STORE_DIR", str(tmp_path / "env"))
        with LocalStore() as store:
            assert store.directory == tmp_path / "env"
        assert (tmp_path / "env" / "store.sqlite").is_file()

    def test_newer_schema_is_refused(self, tmp_path):
        _local(tmp_path).close()
        db = sqlite3.connect(tmp_path / "store.sqlite")
        db.execute("UPDATE schema_version SET version = 99")
        db.commit()
        db.close()
        with pytest.raises(StoreError, match="schema version 99"):
            _local(tmp_path)

    def test_not_a_database_is_a_store_error(self, tmp_path):
        (tmp_path / "store.sqlite").write_bytes(b"this is not sqlite" * 100)
        with pytest.raises(StoreError, match="store.sqlite"):
            _local(tmp_path)

    def test_unusable_directory_is_a_store_error(self, tmp_path):
        (tmp_path / "file").write_text("x")
        with pytest.raises(StoreError, match="cannot create"):
            _local(tmp_path / "file" / "store")

    def test_closed_store_raises(self, tmp_path):
        store = _local(tmp_path)
        store.close()
        store.close()  # idempotent
        with pytest.raises(StoreError, match="closed"):
            store.list_dictionaries()

    def test_survives_reopen(self, tmp_path):
        feature = contract.make_feature(3)
        with _local(tmp_path) as store:
            store.put_dictionary(contract.make_dictionary())
            store.put_feature_analyses("sae-l3", "default", "default", [feature])
            store.put_evaluation("sae-l3", "default", contract.make_evaluation("e"))
        with _local(tmp_path) as store:
            assert_same(store.get_feature_analysis("sae-l3", "default", 3), feature)
            assert_same(store.list_evaluations("sae-l3"), [contract.make_evaluation("e")])

    def test_reopen_from_another_process_while_open(self, tmp_path):
        with _local(tmp_path) as store:
            store.put_dictionary(contract.make_dictionary())
            script = textwrap.dedent(f"""
                import numpy as np
                from lmsae.stores.base import DictionaryRecord, FeatureAnalysis, Interpretation
                from lmsae.stores.configs import LocalStoreConfig
                from lmsae.stores.local import LocalStore
                with LocalStore(LocalStoreConfig(directory={str(tmp_path)!r})) as s:
                    assert s.get_dictionary("sae-l3") is not None
                    s.put_dictionary(DictionaryRecord("child", "default", "/c", {{"d_sae": 4}}))
                    s.put_feature_analyses("sae-l3", "default", "default", [FeatureAnalysis(
                        7, 1, 10, 2.5, np.array([1], np.int64), np.array([0.0, 1.0]))])
                    s.put_interpretation("sae-l3", "default", Interpretation(7, "from a child", "m"))
            """)
            result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            # The parent's open connection sees what the other process committed.
            assert store.get_dictionary("child") is not None
            np.testing.assert_array_equal(store.feature_statistics("sae-l3", "default")["index"], [7])
            assert store.get_interpretation("sae-l3", "default", 7).text == "from a child"

    def test_concurrent_writes_from_threads(self, tmp_path):
        with _local(tmp_path) as store:
            store.put_dictionary(contract.make_dictionary())
            errors: list[Exception] = []

            def write(i: int) -> None:
                try:
                    store.put_interpretation("sae-l3", "default", contract.make_interpretation(i, text=f"f{i}"))
                    store.put_feature_analyses("sae-l3", "default", f"a{i % 3}", [contract.make_small_feature(i)])
                    store.put_evaluation("sae-l3", "default", contract.make_evaluation(f"e{i}"))
                    assert store.get_interpretation("sae-l3", "default", i).text == f"f{i}"
                except Exception as exc:  # noqa: BLE001 - collected: a thread's failure must fail the test
                    errors.append(exc)

            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(write, range(120)))
            assert errors == []
            assert store.interpreted_features("sae-l3", "default") == set(range(120))
            assert store.list_analyses("sae-l3") == ["a0", "a1", "a2"]
            assert sum(store.feature_statistics("sae-l3", "default", f"a{k}")["index"].size for k in range(3)) == 120
            assert len(store.list_evaluations("sae-l3")) == 120

    def test_concurrent_writers_in_two_stores(self, tmp_path):
        # Two connections to one database (as two processes would have) both writing.
        with _local(tmp_path) as first, _local(tmp_path) as second:
            first.put_dictionary(contract.make_dictionary())

            def write(store, offset):
                for i in range(offset, offset + 50):
                    store.put_interpretation("sae-l3", "default", contract.make_interpretation(i))

            threads = [threading.Thread(target=write, args=(s, o)) for s, o in ((first, 0), (second, 50))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert first.interpreted_features("sae-l3", "default") == set(range(100))

    def test_cascade_leaves_no_rows(self, tmp_path):
        with _local(tmp_path) as store:
            store.put_dictionary(contract.make_dictionary())
            store.put_feature_analyses("sae-l3", "default", "default", [contract.make_feature(i) for i in range(3)])
            store.put_logit_attributions("sae-l3", "default", [contract.make_logits(0)])
            store.put_interpretation("sae-l3", "default", contract.make_interpretation(0))
            store.put_evaluation("sae-l3", "default", contract.make_evaluation("e"))
            assert store.remove_dictionary("sae-l3")
        db = sqlite3.connect(tmp_path / "store.sqlite")
        for table in ("dictionaries", "analyses", "feature_statistics", "feature_payloads", "logit_attributions",
                      "interpretations", "evaluations"):
            assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table
        db.close()

    def test_counting_helpers(self, tmp_path):
        with _local(tmp_path) as store:
            store.put_dictionary(contract.make_dictionary())
            store.put_feature_analyses("sae-l3", "default", "default", [contract.make_small_feature(i) for i in range(5)])
            store.put_logit_attributions("sae-l3", "default", [contract.make_logits(i) for i in range(3)])
            store.put_interpretation("sae-l3", "default", contract.make_interpretation(0))
            assert store.feature_count("sae-l3", "default") == 5
            assert store.count_logit_attributions("sae-l3") == 3
            assert store.count_interpretations("sae-l3") == 1


# --------------------------------------------------------------------------------------------
# MongoDB (mongomock)


def _mock_store(client=None, database="lmsae"):
    mongomock = pytest.importorskip("mongomock")
    from lmsae.stores.mongo import MongoStore

    return MongoStore(MongoStoreConfig(database=database), client=client or mongomock.MongoClient())


class TestMongoStore(StoreContract):
    # mongomock checks unique indexes and filters by scanning the whole collection, so writing
    # n documents costs O(n^2) in the test double itself (2,000 take ~40 s there, not in our
    # code); the real-server class below keeps the full 2,000.
    many_features = 300

    @pytest.fixture
    def store(self):
        with _mock_store() as s:
            yield s


class TestMongoStoreSpecifics:
    def test_unreachable_server_fails_fast(self):
        from lmsae.stores.mongo import MongoStore

        start = time.perf_counter()
        with pytest.raises(StoreError, match=r"cannot reach MongoDB at mongodb://127\.0\.0\.1:9/ within 500 ms"):
            MongoStore(MongoStoreConfig(uri="mongodb://127.0.0.1:9/", timeout_ms=500))
        assert time.perf_counter() - start < 5.0

    def test_password_is_not_shown(self):
        from lmsae.stores.mongo import MongoStore

        with pytest.raises(StoreError) as info:
            MongoStore(MongoStoreConfig(uri="mongodb://alice:s3cret@127.0.0.1:9/", timeout_ms=300))
        assert "s3cret" not in str(info.value)
        assert "alice:***@127.0.0.1" in str(info.value)

    def test_bad_uri_is_a_store_error(self):
        from lmsae.stores.mongo import MongoStore

        with pytest.raises(StoreError, match="cannot reach MongoDB"):
            MongoStore(MongoStoreConfig(uri="not-a-uri", timeout_ms=300))

    def test_env_uri_replaces_only_the_default(self, monkeypatch):
        from lmsae.stores.mongo import resolve_uri

        monkeypatch.delenv("MONGO_URI", raising=False)
        assert resolve_uri(MongoStoreConfig()) == "mongodb://localhost:27017/"
        monkeypatch.setenv("MONGO_URI", "mongodb://team-server:27017/")
        assert resolve_uri(MongoStoreConfig()) == "mongodb://team-server:27017/"
        assert resolve_uri(MongoStoreConfig(uri="mongodb://explicit:1/")) == "mongodb://explicit:1/"

    def test_explicit_uri_wins_over_env_even_when_it_is_the_default(self, monkeypatch):
        mongomock = pytest.importorskip("mongomock")
        from lmsae.stores.mongo import MongoStore, resolve_uri

        default = "mongodb://localhost:27017/"
        monkeypatch.setenv("MONGO_URI", "mongodb://team-server:27017/")
        assert resolve_uri(MongoStoreConfig(), default) == default
        with MongoStore(MongoStoreConfig(uri=default), client=mongomock.MongoClient(), uri=default) as store:
            assert store.uri == default

    def test_indexes_are_created(self):
        with _mock_store() as store:
            db = store._db
            unique = {name: [tuple(k for k, _ in info["key"]) for info in db[name].index_information().values()
                             if info.get("unique")]
                      for name in ("language_models", "datasets", "dictionaries", "feature_analyses",
                                   "logit_attributions", "interpretations", "evaluations")}
        assert unique["dictionaries"] == [("name", "series")]
        assert unique["feature_analyses"] == [("dictionary", "series", "analysis", "index")]
        assert unique["logit_attributions"] == [("dictionary", "series", "index")]
        assert unique["interpretations"] == [("dictionary", "series", "index")]
        assert unique["evaluations"] == [("dictionary", "series", "name")]
        assert unique["language_models"] == [("name",)] and unique["datasets"] == [("name",)]

    def test_statistics_are_plain_fields_and_samples_binary(self):
        with _mock_store() as store:
            store.put_dictionary(contract.make_dictionary())
            store.put_feature_analyses("sae-l3", "default", "default", [contract.make_feature(1)])
            doc = store._db.feature_analyses.find_one({"index": 1})
        assert {"dictionary", "series", "analysis", "index", "act_count", "n_tokens", "max_activation"} <= set(doc)
        assert isinstance(doc["doc"], str) and isinstance(doc["arrays"], bytes)
        assert "blob" not in doc

    def test_large_features_go_to_gridfs(self):
        mongomock = pytest.importorskip("mongomock")
        # mongomock's GridFS stand-in (legacy gridfs.GridFS API) must be switched on explicitly.
        pytest.importorskip("mongomock.gridfs").enable_gridfs_integration()
        client = mongomock.MongoClient()
        with _mock_store(client) as store:
            store.gridfs_threshold = 2_000
            store.put_dictionary(contract.make_dictionary())
            big = [contract.make_feature(i, n_samples=20, length=64) for i in range(3)]
            small = contract.make_small_feature(5)
            small = type(small)(**{**{f: getattr(small, f) for f in ("index", "act_count", "n_tokens",
                                                                     "max_activation")},
                                   "histogram_counts": np.zeros(1, np.int64), "histogram_edges": np.zeros(2)})
            store.put_feature_analyses("sae-l3", "default", "default", [*big, small])
            files = store._db["feature_analyses_blobs.files"]
            assert files.count_documents({}) == 3
            assert "blob" not in store._db.feature_analyses.find_one({"index": 5})
            for feature in big:
                assert "blob" in store._db.feature_analyses.find_one({"index": feature.index})
                assert_same(store.get_feature_analysis("sae-l3", "default", feature.index), feature)
            np.testing.assert_array_equal(store.feature_statistics("sae-l3", "default")["index"], [0, 1, 2, 5])
            # Replacing a feature drops its old blob; removing the dictionary drops the rest.
            store.put_feature_analyses("sae-l3", "default", "default", [contract.make_small_feature(0)])
            assert files.count_documents({}) == 2
            replacement = contract.make_feature(1, seed=4, n_samples=20, length=64)
            store.put_feature_analyses("sae-l3", "default", "default", [replacement])
            assert files.count_documents({}) == 2
            assert_same(store.get_feature_analysis("sae-l3", "default", 1), replacement)
            assert store.remove_dictionary("sae-l3")
            assert files.count_documents({}) == 0
            assert store._db["feature_analyses_blobs.chunks"].count_documents({}) == 0

    def test_client_passed_in_is_not_closed(self):
        mongomock = pytest.importorskip("mongomock")
        client = mongomock.MongoClient()
        store = _mock_store(client)
        store.close()
        client["other"].things.insert_one({"x": 1})  # still usable
        with _mock_store(client) as again:
            assert again.list_dictionaries() == []

    def test_databases_are_separate(self):
        mongomock = pytest.importorskip("mongomock")
        client = mongomock.MongoClient()
        with _mock_store(client, "one") as one, _mock_store(client, "two") as two:
            one.put_dictionary(contract.make_dictionary())
            assert two.list_dictionaries() == []
            assert len(one.list_dictionaries()) == 1


# --------------------------------------------------------------------------------------------
# A real MongoDB server (opt-in)


@pytest.mark.mongo
@pytest.mark.skipif(not REAL_MONGO_URI, reason="opt-in: set LMSAE_TEST_MONGO_URI to test against a real server")
class TestRealMongo(StoreContract):
    @pytest.fixture
    def store(self):
        from lmsae.stores.mongo import MongoStore

        database = f"lmsae_test_{uuid.uuid4().hex[:12]}"
        store = MongoStore(MongoStoreConfig(uri=REAL_MONGO_URI, database=database, timeout_ms=5000))
        try:
            yield store
        finally:
            from pymongo import MongoClient

            store.close()
            with MongoClient(REAL_MONGO_URI, serverSelectionTimeoutMS=5000) as client:
                client.drop_database(database)


# --------------------------------------------------------------------------------------------
# Codec, specs, safety


class TestArrays:
    def test_arrays_round_trip_exactly(self):
        from lmsae.stores.arrays import arrays_to_bytes, bytes_to_arrays

        arrays = {"f16": np.arange(4, dtype=np.float16), "u64": np.array([2**64 - 1], dtype=np.uint64),
                  "b": np.array([[True], [False]]), "empty": np.zeros((0, 3), np.int8),
                  "scalar": np.array(1.5), "big_endian": np.arange(3, dtype=">i4"),
                  "transposed": np.arange(6, dtype=np.int16).reshape(2, 3).T}
        back = bytes_to_arrays(arrays_to_bytes(arrays))
        assert set(back) == set(arrays)
        for key, value in arrays.items():
            assert back[key].dtype == value.dtype.newbyteorder("=")
            assert back[key].shape == value.shape
            np.testing.assert_array_equal(back[key], value)
            assert back[key].flags.writeable

    def test_unsupported_dtype_and_corrupt_bytes(self):
        from lmsae.stores.arrays import arrays_to_bytes, bytes_to_arrays, unpack_document

        for bad in (np.array(["x"]), np.array([1 + 2j]), np.array([object()], dtype=object)):
            with pytest.raises(StoreError, match="cannot be stored"):
                arrays_to_bytes({"bad": bad})
        with pytest.raises(StoreError, match="corrupt"):
            bytes_to_arrays(b"\x00" * 3)
        with pytest.raises(StoreError, match="corrupt"):
            unpack_document(b"not a packed document at all")

    def test_documents_round_trip(self):
        from lmsae.stores.arrays import decode_document, encode_document, pack_document, unpack_document

        value = {"a": np.arange(3, dtype=np.int32), "nested": [{"b": (1, np.float32(2.5))}, None],
                 "tags": {"__array__": "a0"}, "__tuple__": 1, "nan": float("nan"), "inf": float("inf"),
                 "np_int": np.int64(7), "np_bool": np.bool_(True), 3: "int key", ("t", 1): "tuple key",
                 "surrogate": "\udcff", "unicode": "日本"}
        expected = {**value, "nested": [{"b": (1, 2.5)}, None], "np_int": 7, "np_bool": True}
        text, blob = encode_document(value)
        assert text.isascii() and "NaN" not in text
        assert_same(decode_document(text, blob), expected)
        assert_same(unpack_document(pack_document(value)), expected)
        assert encode_document({"x": 1})[1] is None

    def test_specs_do_not_import_pymongo(self):
        code = ("import sys, lmsae.stores.specs as s; "
                "assert [x.name for x in s.STORE_SPECS] == ['local', 'mongo']; "
                "assert 'pymongo' not in sys.modules, 'pymongo imported'")
        result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr

    def test_spec_factories_open_stores(self, tmp_path):
        from lmsae.stores.local import LocalStore
        from lmsae.stores.specs import STORE_SPECS

        local, mongo = STORE_SPECS
        with local.factory(LocalStoreConfig(directory=tmp_path)) as store:
            assert isinstance(store, LocalStore)
        with pytest.raises(StoreError, match="cannot reach MongoDB"):
            mongo.factory(MongoStoreConfig(uri="mongodb://127.0.0.1:9/", timeout_ms=300))


_FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}


@pytest.mark.parametrize("source", sorted(p.name for p in STORES_SRC.glob("*.py")))
def test_no_pickle_in_store_sources(source):
    """Stores must never (un)pickle: no pickle-like import, name or ``allow_pickle`` anywhere."""
    tree = ast.parse((STORES_SRC / source).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & _FORBIDDEN_MODULES, ast.dump(node)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in _FORBIDDEN_MODULES, ast.dump(node)
        elif isinstance(node, ast.Name):
            assert node.id not in _FORBIDDEN_MODULES, node.id
        elif isinstance(node, ast.Attribute):
            assert node.attr not in {"loads", "load"} or not (isinstance(node.value, ast.Name)
                                                              and node.value.id in _FORBIDDEN_MODULES)
        elif isinstance(node, ast.keyword):
            assert node.arg != "allow_pickle", "allow_pickle"
