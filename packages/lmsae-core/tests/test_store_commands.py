"""``lmsae store list|show|remove`` on a bare click group (no registry needed)."""

from __future__ import annotations

import click
import numpy as np
import pytest
from click.testing import CliRunner
from lmsae.errors import StoreError
from lmsae.stores.base import (
    DictionaryRecord,
    EvaluationRecord,
    FeatureAnalysis,
    Interpretation,
    LogitAttribution,
    TokenLogit,
)
from lmsae.stores.commands import describe_store, register, store_from_options
from lmsae.stores.configs import LocalStoreConfig, MongoStoreConfig
from lmsae.stores.local import LocalStore


def _feature(i: int) -> FeatureAnalysis:
    return FeatureAnalysis(i, 3, 100, 1.5, np.array([1, 2], np.int64), np.array([0.0, 1.0, 2.0]))


def _fill(store) -> None:
    store.put_dictionary(DictionaryRecord("sae-l3", "default", "/runs/sae-l3",
                                          {"architecture": "sae", "d_model": 8, "d_sae": 16}, "gpt2",
                                          created_at=1_700_000_000.0))
    store.put_dictionary(DictionaryRecord("lorsa-l5", "sweep", "/runs/lorsa-l5",
                                          {"architecture": "lorsa", "d_model": 8, "expansion_factor": 4}))
    store.put_dictionary(DictionaryRecord("mystery", "default", "/runs/mystery", {}))
    store.put_feature_analyses("sae-l3", "default", "default", [_feature(i) for i in range(5)])
    store.put_feature_analyses("sae-l3", "default", "wide-ctx", [_feature(i) for i in range(2)])
    store.put_logit_attributions("sae-l3", "default", [LogitAttribution(i, [TokenLogit(1, "a", 1.0)], [])
                                                       for i in range(3)])
    store.put_interpretation("sae-l3", "default", Interpretation(0, "cities", "gpt-4o-mini", {"detection": 0.8}))
    store.put_evaluation("sae-l3", "default", EvaluationRecord(
        "eval-owt", {"explained_variance": 0.912345, "l0": 31.5, "zeta": 1.0, "a": 2.0, "b": 3.0, "c": 4.0,
                     "d": 5.0}))
    store.put_evaluation("sae-l3", "default", EvaluationRecord("eval-empty", {}))


@pytest.fixture
def store_dir(tmp_path):
    directory = tmp_path / "store"
    with LocalStore(LocalStoreConfig(directory=directory)) as store:
        _fill(store)
    return directory


@pytest.fixture
def cli():
    group = click.Group("lmsae")
    register(group)
    return group


def invoke(cli, *args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def test_list(cli, store_dir):
    result = invoke(cli, "store", "list", "--store-dir", store_dir)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["name", "series", "architecture", "features", "path", "analyses"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["sae-l3"] == ["sae-l3", "default", "sae", "16", "/runs/sae-l3", "default,", "wide-ctx"]
    assert rows["lorsa-l5"] == ["lorsa-l5", "sweep", "lorsa", "32", "/runs/lorsa-l5", "-"]
    assert rows["mystery"] == ["mystery", "default", "?", "?", "/runs/mystery", "-"]
    assert list(rows) == ["lorsa-l5", "mystery", "sae-l3"]


def test_list_filters_by_series_and_reports_empty(cli, store_dir, tmp_path):
    result = invoke(cli, "store", "list", "--series", "sweep", "--store-dir", store_dir)
    assert result.exit_code == 0
    assert "lorsa-l5" in result.output and "sae-l3" not in result.output
    result = invoke(cli, "store", "list", "--series", "nothing", "--store-dir", store_dir)
    assert result.exit_code == 0
    assert result.output.startswith("no dictionaries in series 'nothing' in local store")


def test_show(cli, store_dir):
    result = invoke(cli, "store", "show", "sae-l3", "--store-dir", store_dir)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "dictionary sae-l3 (series default)" in out
    assert "architecture: sae" in out and "features: 16" in out and "path: /runs/sae-l3" in out
    assert "language model: gpt2" in out
    assert "default: 5 features" in out and "wide-ctx: 2 features" in out
    assert "logit attributions: 3" in out
    assert "interpretations: 1" in out
    assert "eval-owt: explained_variance=0.9123 l0=31.5 zeta=1 a=2 b=3 c=4 (+1 more)" in out
    assert "eval-empty: (no metrics)" in out


def test_show_other_series_and_unknown_name(cli, store_dir):
    result = invoke(cli, "store", "show", "lorsa-l5", "--series", "sweep", "--store-dir", store_dir)
    assert result.exit_code == 0, result.output
    assert "analyses: none" in result.output and "evaluations: none" in result.output
    result = invoke(cli, "store", "show", "sae-l4", "--store-dir", store_dir)
    assert isinstance(result.exception, StoreError)
    assert result.exception.exit_code == 2
    assert "did you mean 'sae-l3'" in str(result.exception)


def test_remove_with_yes(cli, store_dir):
    result = invoke(cli, "store", "remove", "sae-l3", "--yes", "--store-dir", store_dir)
    assert result.exit_code == 0, result.output
    assert "removed 'sae-l3'" in result.output and "/runs/sae-l3 are kept" in result.output
    with LocalStore(LocalStoreConfig(directory=store_dir)) as store:
        assert store.get_dictionary("sae-l3") is None
        assert store.list_analyses("sae-l3") == []
        assert store.list_evaluations("sae-l3") == []
        assert store.get_dictionary("mystery") is not None


def test_remove_asks_for_confirmation(cli, store_dir):
    result = invoke(cli, "store", "remove", "sae-l3", "--store-dir", store_dir, input="n\n")
    assert result.exit_code == 0, result.output
    assert "2 analyses" in result.output and "nothing removed" in result.output
    with LocalStore(LocalStoreConfig(directory=store_dir)) as store:
        assert store.get_dictionary("sae-l3") is not None
    result = invoke(cli, "store", "remove", "lorsa-l5", "--series", "sweep", "--store-dir", store_dir, input="y\n")
    assert result.exit_code == 0, result.output
    with LocalStore(LocalStoreConfig(directory=store_dir)) as store:
        assert store.get_dictionary("lorsa-l5", "sweep") is None


def test_remove_unknown_name_is_an_error_with_closest_match(cli, store_dir):
    result = invoke(cli, "store", "remove", "sae-l", "--yes", "--store-dir", store_dir)
    assert isinstance(result.exception, StoreError)
    assert "did you mean 'sae-l3'" in str(result.exception)
    result = invoke(cli, "store", "remove", "lorsa-l5", "--yes", "--store-dir", store_dir)  # wrong series
    assert isinstance(result.exception, StoreError)


def test_store_option_errors(cli, tmp_path, store_dir):
    result = invoke(cli, "store", "list", "--store-dir", tmp_path / "typo")
    assert isinstance(result.exception, StoreError)
    assert "no store at" in str(result.exception)
    assert not (tmp_path / "typo").exists()
    result = invoke(cli, "store", "list", "--store-dir", store_dir, "--mongo-uri", "mongodb://x/")
    assert isinstance(result.exception, StoreError) and "not both" in str(result.exception)
    result = invoke(cli, "store", "list", "--mongo-db", "x", "--store-dir", store_dir)
    assert isinstance(result.exception, StoreError) and "--mongo-uri" in str(result.exception)


def test_default_store_from_env(cli, store_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("LMSAE_STORE_DIR", str(store_dir))
    result = invoke(cli, "store", "list")
    assert result.exit_code == 0 and "sae-l3" in result.output
    monkeypatch.setenv("LMSAE_STORE_DIR", str(tmp_path / "empty"))
    result = invoke(cli, "store", "list")
    assert isinstance(result.exception, StoreError) and "--store-dir" in str(result.exception)


def test_store_from_options(tmp_path, store_dir):
    with store_from_options(store_dir, None, None) as store:
        assert isinstance(store, LocalStore) and store.directory == store_dir
        assert describe_store(store) == f"local store {store_dir}"
    with store_from_options(tmp_path / "new", None, None, create=True) as store:
        assert store.list_dictionaries() == []


def test_mongo_options_use_the_mongo_store(cli, monkeypatch):
    mongomock = pytest.importorskip("mongomock")
    import lmsae.stores.mongo as mongo_module

    client = mongomock.MongoClient()
    real = mongo_module.MongoStore
    opened: list[MongoStoreConfig] = []

    def fake(config, **kwargs):
        opened.append(config)
        return real(config, client=client, **kwargs)

    with real(MongoStoreConfig(database="team"), client=client) as store:
        _fill(store)
    monkeypatch.setattr(mongo_module, "MongoStore", fake)
    result = invoke(cli, "store", "list", "--mongo-uri", "mongodb://team-server:27017/", "--mongo-db", "team")
    assert result.exit_code == 0, result.output
    assert "sae-l3" in result.output and "lorsa-l5" in result.output
    assert opened[-1].uri == "mongodb://team-server:27017/" and opened[-1].database == "team"
    result = invoke(cli, "store", "show", "sae-l3", "--mongo-uri", "mongodb://u:pw@team-server/", "--mongo-db",
                    "team")
    assert result.exit_code == 0, result.output
    assert "logit attributions: 3" in result.output and "default: 5 features" in result.output
    result = invoke(cli, "store", "remove", "sae-l3", "--yes", "--mongo-uri", "mongodb://u:pw@team-server/",
                    "--mongo-db", "team")
    assert result.exit_code == 0, result.output
    assert "MongoDB mongodb://u:***@team-server/, database 'team'" in result.output
    assert "pw" not in result.output
    result = invoke(cli, "store", "list", "--mongo-uri", "mongodb://team-server:27017/")
    assert opened[-1].database == "lmsae"
    assert "no dictionaries" in result.output


def test_mongo_uri_option_wins_over_the_environment(monkeypatch):
    """--mongo-uri equal to the default URI still names the server: $MONGO_URI only fills in an
    absent URI."""
    mongomock = pytest.importorskip("mongomock")
    import lmsae.stores.mongo as mongo_module

    real = mongo_module.MongoStore
    monkeypatch.setattr(mongo_module, "MongoStore",
                        lambda config, **kwargs: real(config, client=mongomock.MongoClient(), **kwargs))
    monkeypatch.setenv("MONGO_URI", "mongodb://team-server:27017/")
    with store_from_options(None, "mongodb://localhost:27017/", None) as store:
        assert store.uri == "mongodb://localhost:27017/"
        assert describe_store(store) == "MongoDB mongodb://localhost:27017/, database 'lmsae'"
