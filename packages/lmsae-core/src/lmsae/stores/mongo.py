"""The MongoDB store (pymongo), for teams sharing results on a server.

Collections of the database (``[store] database``, default ``lmsae``), with their unique indexes:

- ``language_models`` {name, config, config_arrays?} unique ``name``; ``datasets`` likewise;
- ``dictionaries`` {name, series, path, model_name, created_at, config, config_arrays?}
  unique ``(name, series)``;
- ``feature_analyses`` {dictionary, series, analysis, index, act_count, n_tokens,
  max_activation, doc, arrays?} unique ``(dictionary, series, analysis, index)``. The statistics
  are plain fields (so listing features reads no samples); the heavy part (histogram, samplings,
  extras) is ``doc`` (JSON text) plus ``arrays`` (BSON Binary holding safetensors bytes). When
  that would exceed :attr:`MongoStore.gridfs_threshold` (documents are limited to 16 MB), the
  heavy part is written as one packed blob to the GridFS bucket ``feature_analyses_blobs`` and
  the document holds its id in ``blob`` instead;
- ``logit_attributions`` {dictionary, series, index, doc} unique ``(dictionary, series, index)``;
- ``interpretations`` {dictionary, series, index, text, explainer_model, created_at, scores,
  details, details_arrays?} unique ``(dictionary, series, index)``;
- ``evaluations`` {dictionary, series, name, seq, created_at, doc, arrays?} unique
  ``(dictionary, series, name)``; ``seq`` orders them by last write.

Free-form dicts (configs, sample metadata, details, metrics) are stored as JSON text rather than
as sub-documents: their keys (hook names such as ``blocks.0.hook_resid_pre``) may contain dots
or dollars that MongoDB treats specially, and JSON keeps tuples and non-finite floats exact.
Nothing is pickled (see :mod:`lmsae.stores.arrays`).

Connecting never hangs: the client uses the config's ``timeout_ms`` for server selection and
connection, and a ``ping`` is sent on open; failure raises :class:`StoreError`.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from lmsae.errors import StoreError
from lmsae.stores.arrays import (
    decode_document,
    encode_document,
    evaluation_from_plain,
    evaluation_to_plain,
    feature_heavy_from_plain,
    feature_heavy_to_plain,
    interpretation_from_plain,
    logit_attribution_from_plain,
    logit_attribution_to_plain,
    pack_document,
    unpack_document,
)
from lmsae.stores.base import (
    DictionaryRecord,
    EvaluationRecord,
    FeatureAnalysis,
    Interpretation,
    LogitAttribution,
    NamedConfigRecord,
    Store,
)
from lmsae.stores.configs import MongoStoreConfig

__all__ = ["DEFAULT_URI", "MONGO_URI_ENV", "MongoStore", "redact_uri", "resolve_uri"]

#: environment variable that replaces the config's default URI (never a URI given with ``uri=``,
#: i.e. ``--mongo-uri``, nor a config URI other than the default)
MONGO_URI_ENV = "MONGO_URI"
#: the server used when neither the command line, the config nor $MONGO_URI names one
DEFAULT_URI = "mongodb://localhost:27017/"
#: features written per bulk write by put_feature_analyses
FEATURE_BATCH = 512
_GRIDFS_BUCKET = "feature_analyses_blobs"
_PER_DICTIONARY = ("feature_analyses", "logit_attributions", "interpretations", "evaluations")


def redact_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (for messages)."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", uri)


def resolve_uri(config: MongoStoreConfig, uri: str | None = None) -> str:
    """The URI to connect to: ``uri`` when given (an explicit choice such as ``--mongo-uri`` always
    wins); else the config's ``uri`` when set (written out, even if it is the default URI); else
    ``$MONGO_URI`` when set; else :data:`DEFAULT_URI`."""
    if uri is not None:
        return uri
    if config.uri is not None:
        return config.uri
    return os.environ.get(MONGO_URI_ENV) or DEFAULT_URI


def _binary(blob: bytes | None) -> Any:
    from bson.binary import Binary

    return None if blob is None else Binary(blob)


class MongoStore(Store):
    """A :class:`Store` in a MongoDB database.

    Args:
        config: server URI, database name and connection timeout.
        client: an already-open client (tests pass ``mongomock.MongoClient()``); it is pinged
            but not closed by :meth:`close`.
        uri: the server, chosen explicitly (``--mongo-uri``): it replaces ``config.uri`` and is
            never replaced by ``$MONGO_URI`` (see :func:`resolve_uri`).

    Raises:
        StoreError: the server cannot be reached within ``timeout_ms`` or the indexes cannot be
            created.
    """

    #: payload size (bytes) above which a feature's heavy part goes to GridFS
    gridfs_threshold: int = 15 * 1024 * 1024

    def __init__(self, config: MongoStoreConfig | None = None, *, client: Any = None, uri: str | None = None):
        try:
            from pymongo.errors import PyMongoError
        except ImportError as exc:
            raise StoreError(f"the MongoDB store needs pymongo: pip install 'lmsae-core[mongo]' ({exc})") from exc

        self.config = config if config is not None else MongoStoreConfig()
        self.uri = resolve_uri(self.config, uri)
        self._owns_client = client is None
        self._seq_lock = threading.Lock()
        self._last_seq = 0
        self._gridfs: Any = None
        timeout = int(self.config.timeout_ms)
        try:
            if client is None:
                from pymongo import MongoClient

                client = MongoClient(self.uri, serverSelectionTimeoutMS=timeout, connectTimeoutMS=timeout)
            client.admin.command("ping")
        except (PyMongoError, ValueError, TypeError) as exc:
            if self._owns_client and client is not None:
                client.close()
            raise StoreError(f"cannot reach MongoDB at {redact_uri(self.uri)} within {timeout} ms: {exc}") from exc
        self._client = client
        self._db = client[self.config.database]
        with self._errors():
            self._create_indexes()

    # --- plumbing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        from pymongo.errors import PyMongoError

        try:
            yield
        except PyMongoError as exc:
            raise StoreError(f"MongoDB {redact_uri(self.uri)} (database {self.config.database!r}): {exc}") from exc

    def _create_indexes(self) -> None:
        from pymongo import ASCENDING as UP

        db = self._db
        db.language_models.create_index([("name", UP)], unique=True)
        db.datasets.create_index([("name", UP)], unique=True)
        db.dictionaries.create_index([("name", UP), ("series", UP)], unique=True)
        db.dictionaries.create_index([("series", UP)])
        db.feature_analyses.create_index([("dictionary", UP), ("series", UP), ("analysis", UP), ("index", UP)],
                                         unique=True)
        db.logit_attributions.create_index([("dictionary", UP), ("series", UP), ("index", UP)], unique=True)
        db.interpretations.create_index([("dictionary", UP), ("series", UP), ("index", UP)], unique=True)
        db.evaluations.create_index([("dictionary", UP), ("series", UP), ("name", UP)], unique=True)
        db.evaluations.create_index([("dictionary", UP), ("series", UP), ("seq", UP)])

    def _bucket(self) -> Any:
        # Created on first use: GridFS checks the database type, which a test double may not pass
        # unless GridFS is actually needed.
        if self._gridfs is None:
            import gridfs

            self._gridfs = gridfs.GridFS(self._db, collection=_GRIDFS_BUCKET)
        return self._gridfs

    @staticmethod
    def _replace_many(collection: Any, replacements: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Upsert ``(filter, document)`` pairs: one bulk write on a real server; one call per
        document on test doubles (mongomock cannot run pymongo 4.9+'s ReplaceOne in bulk)."""
        from pymongo import ReplaceOne
        from pymongo.collection import Collection

        if not replacements:
            return
        if isinstance(collection, Collection):
            collection.bulk_write([ReplaceOne(f, d, upsert=True) for f, d in replacements], ordered=False)
        else:
            for f, d in replacements:
                collection.replace_one(f, d, upsert=True)

    def _require_dictionary(self, name: str, series: str) -> None:
        if self._db.dictionaries.find_one({"name": name, "series": series}, {"_id": 1}) is None:
            from lmsae._text import did_you_mean

            known = sorted(d["name"] for d in self._db.dictionaries.find({"series": series}, {"name": 1}))
            raise StoreError(f"no dictionary {name!r} in series {series!r} in MongoDB database "
                             f"{self.config.database!r}; known: {', '.join(known) or '(none)'}"
                             f"{did_you_mean(name, known)}")

    def _next_seq(self) -> int:
        # Wall-clock nanoseconds order writes across clients; the max() keeps one client's
        # writes strictly increasing even when the clock is coarse or steps back.
        with self._seq_lock:
            self._last_seq = max(time.time_ns(), self._last_seq + 1)
            return self._last_seq

    @staticmethod
    def _key(name: str, series: str) -> dict[str, Any]:
        return {"dictionary": name, "series": series}

    # --- language models and datasets ---------------------------------------------------------

    def _put_named(self, collection: str, record: NamedConfigRecord) -> None:
        text, blob = encode_document(dict(record.config))
        with self._errors():
            self._db[collection].replace_one(
                {"name": record.name}, {"name": record.name, "config": text, "config_arrays": _binary(blob)},
                upsert=True)

    def _get_named(self, collection: str, name: str) -> NamedConfigRecord | None:
        with self._errors():
            doc = self._db[collection].find_one({"name": name})
        if doc is None:
            return None
        return NamedConfigRecord(name=name, config=decode_document(doc["config"], doc.get("config_arrays")))

    # --- dictionaries ---------------------------------------------------------------------

    def put_dictionary(self, record: DictionaryRecord) -> None:
        text, blob = encode_document(dict(record.config))
        doc = {"name": record.name, "series": record.series, "path": str(record.path),
               "model_name": record.model_name, "created_at": float(record.created_at), "config": text,
               "config_arrays": _binary(blob)}
        with self._errors():
            self._db.dictionaries.replace_one({"name": record.name, "series": record.series}, doc, upsert=True)

    @staticmethod
    def _dictionary_from_doc(doc: dict[str, Any]) -> DictionaryRecord:
        return DictionaryRecord(name=doc["name"], series=doc["series"], path=doc["path"],
                                config=decode_document(doc["config"], doc.get("config_arrays")),
                                model_name=doc.get("model_name"), created_at=float(doc.get("created_at", 0.0)))

    def get_dictionary(self, name: str, series: str = "default") -> DictionaryRecord | None:
        with self._errors():
            doc = self._db.dictionaries.find_one({"name": name, "series": series})
        return None if doc is None else self._dictionary_from_doc(doc)

    def list_dictionaries(self, series: str | None = None) -> list[DictionaryRecord]:
        """Dictionaries sorted by name then series (only ``series`` when given)."""
        query = {} if series is None else {"series": series}
        with self._errors():
            docs = list(self._db.dictionaries.find(query).sort([("name", 1), ("series", 1)]))
        return [self._dictionary_from_doc(d) for d in docs]

    def remove_dictionary(self, name: str, series: str = "default") -> bool:
        key = self._key(name, series)
        with self._errors():
            existed = self._db.dictionaries.find_one({"name": name, "series": series}, {"_id": 1}) is not None
            blobs = [d["blob"] for d in self._db.feature_analyses.find({**key, "blob": {"$exists": True}},
                                                                      {"blob": 1})]
            # Children first: if this is interrupted, the dictionary is still listed and removing
            # it again finishes the job (no orphans left behind an invisible parent).
            for collection in _PER_DICTIONARY:
                self._db[collection].delete_many(key)
            for blob in blobs:
                self._bucket().delete(blob)
            self._db.dictionaries.delete_one({"name": name, "series": series})
        return existed

    # --- per-feature analyses -------------------------------------------------------------

    def put_feature_analyses(self, name: str, series: str, analysis: str,
                             features: Iterable[FeatureAnalysis]) -> None:
        """Store analyses of features (upsert by feature index), in bulk writes of
        :data:`FEATURE_BATCH`; an analysis is listed once it holds a feature."""
        with self._errors():
            self._require_dictionary(name, series)
        batch: list[dict[str, Any]] = []
        for feature in features:
            batch.append(self._feature_doc(name, series, analysis, feature))
            if len(batch) >= FEATURE_BATCH:
                self._write_features(name, series, analysis, batch)
                batch = []
        if batch:
            self._write_features(name, series, analysis, batch)

    def _feature_doc(self, name: str, series: str, analysis: str, feature: FeatureAnalysis) -> dict[str, Any]:
        doc: dict[str, Any] = {"dictionary": name, "series": series, "analysis": analysis,
                               "index": int(feature.index), "act_count": int(feature.act_count),
                               "n_tokens": int(feature.n_tokens), "max_activation": float(feature.max_activation)}
        heavy = feature_heavy_to_plain(feature)
        text, blob = encode_document(heavy)
        if len(text) + len(blob or b"") <= self.gridfs_threshold:
            doc["doc"] = text
            doc["arrays"] = _binary(blob)
        else:
            doc["_pending_blob"] = pack_document(heavy)
        return doc

    def _write_features(self, name: str, series: str, analysis: str, docs: list[dict[str, Any]]) -> None:
        key = {**self._key(name, series), "analysis": analysis}
        with self._errors():
            self._require_dictionary(name, series)
            indices = [d["index"] for d in docs]
            old_blobs = [d["blob"] for d in self._db.feature_analyses.find(
                {**key, "index": {"$in": indices}, "blob": {"$exists": True}}, {"blob": 1})]
            # Blobs are uploaded before the documents that reference them: a failure in between
            # can leave an unreferenced blob (wasted space), never a reference to a missing one.
            for doc in docs:
                if "_pending_blob" in doc:
                    doc["blob"] = self._bucket().put(doc.pop("_pending_blob"))
            self._replace_many(self._db.feature_analyses, [({**key, "index": d["index"]}, d) for d in docs])
            # Old blobs go after the documents that referenced them were replaced: a crash in
            # between leaves an unreferenced blob, never a reference to a missing one.
            for blob in old_blobs:
                self._bucket().delete(blob)

    def _feature_from_doc(self, doc: dict[str, Any]) -> FeatureAnalysis:
        if "blob" in doc:
            with self._errors():
                try:
                    data = self._bucket().get(doc["blob"]).read()
                except Exception as exc:  # gridfs.NoFile and I/O errors alike
                    raise StoreError(f"the samples of feature {doc['index']} are missing from GridFS: {exc}") from exc
            heavy = unpack_document(data)
        else:
            heavy = decode_document(doc["doc"], doc.get("arrays"))
        return feature_heavy_from_plain(doc["index"], doc["act_count"], doc["n_tokens"], doc["max_activation"], heavy)

    def get_feature_analysis(self, name: str, series: str, index: int,
                             analysis: str = "default") -> FeatureAnalysis | None:
        with self._errors():
            doc = self._db.feature_analyses.find_one({**self._key(name, series), "analysis": analysis,
                                                      "index": int(index)})
        return None if doc is None else self._feature_from_doc(doc)

    def list_analyses(self, name: str, series: str = "default") -> list[str]:
        """Names of the analyses of a dictionary that hold at least one feature, sorted."""
        with self._errors():
            return sorted(self._db.feature_analyses.distinct("analysis", self._key(name, series)))

    def feature_statistics(self, name: str, series: str, analysis: str = "default") -> dict[str, np.ndarray]:
        """Columns ``index``, ``act_count``, ``n_tokens`` (int64) and ``max_activation`` (float64),
        sorted by index; empty when the dictionary or analysis is unknown."""
        fields = ("index", "act_count", "n_tokens", "max_activation")
        with self._errors():
            docs = list(self._db.feature_analyses.find(
                {**self._key(name, series), "analysis": analysis},
                {"_id": 0, **{f: 1 for f in fields}}).sort("index", 1))
        return {
            "index": np.array([d["index"] for d in docs], dtype=np.int64),
            "act_count": np.array([d["act_count"] for d in docs], dtype=np.int64),
            "n_tokens": np.array([d["n_tokens"] for d in docs], dtype=np.int64),
            "max_activation": np.array([d["max_activation"] for d in docs], dtype=np.float64),
        }

    def feature_count(self, name: str, series: str, analysis: str = "default") -> int:
        """Number of features stored for one analysis (0 when unknown)."""
        with self._errors():
            return int(self._db.feature_analyses.count_documents({**self._key(name, series), "analysis": analysis}))

    # --- logit attributions and interpretations -------------------------------------------

    def put_logit_attributions(self, name: str, series: str, attributions: Iterable[LogitAttribution]) -> None:
        key = self._key(name, series)
        replacements = []
        for record in attributions:
            text, _ = encode_document(logit_attribution_to_plain(record))
            index = int(record.index)
            replacements.append(({**key, "index": index}, {**key, "index": index, "doc": text}))
        with self._errors():
            self._require_dictionary(name, series)
            self._replace_many(self._db.logit_attributions, replacements)

    def get_logit_attribution(self, name: str, series: str, index: int) -> LogitAttribution | None:
        with self._errors():
            doc = self._db.logit_attributions.find_one({**self._key(name, series), "index": int(index)})
        return None if doc is None else logit_attribution_from_plain(int(index), decode_document(doc["doc"]))

    def count_logit_attributions(self, name: str, series: str = "default") -> int:
        """Number of features with a logit attribution."""
        with self._errors():
            return int(self._db.logit_attributions.count_documents(self._key(name, series)))

    def put_interpretation(self, name: str, series: str, interpretation: Interpretation) -> None:
        key = {**self._key(name, series), "index": int(interpretation.index)}
        details, blob = encode_document(dict(interpretation.details))
        # Scores stay a sub-document so that a team can query features by score on the server.
        doc = {**key, "text": interpretation.text, "explainer_model": interpretation.explainer_model,
               "created_at": float(interpretation.created_at),
               "scores": {str(k): float(v) for k, v in interpretation.scores.items()},
               "details": details, "details_arrays": _binary(blob)}
        with self._errors():
            self._require_dictionary(name, series)
            self._db.interpretations.replace_one(key, doc, upsert=True)

    def get_interpretation(self, name: str, series: str, index: int) -> Interpretation | None:
        with self._errors():
            doc = self._db.interpretations.find_one({**self._key(name, series), "index": int(index)})
        if doc is None:
            return None
        plain = {"scores": doc.get("scores") or {},
                 "details": decode_document(doc["details"], doc.get("details_arrays"))}
        return interpretation_from_plain(int(index), doc["text"], doc["explainer_model"],
                                                 doc.get("created_at", 0.0), plain)

    def interpreted_features(self, name: str, series: str) -> set[int]:
        with self._errors():
            return {int(i) for i in self._db.interpretations.distinct("index", self._key(name, series))}

    def count_interpretations(self, name: str, series: str = "default") -> int:
        """Number of interpreted features."""
        with self._errors():
            return int(self._db.interpretations.count_documents(self._key(name, series)))

    # --- evaluations -------------------------------------------------------------------------

    def put_evaluation(self, name: str, series: str, record: EvaluationRecord) -> None:
        """Store an evaluation; one with the same name is replaced and moves to the end of the list."""
        key = {**self._key(name, series), "name": record.name}
        text, blob = encode_document(evaluation_to_plain(record))
        doc = {**key, "seq": self._next_seq(), "created_at": float(record.created_at), "doc": text,
               "arrays": _binary(blob)}
        with self._errors():
            self._require_dictionary(name, series)
            self._db.evaluations.replace_one(key, doc, upsert=True)

    def list_evaluations(self, name: str, series: str = "default") -> list[EvaluationRecord]:
        """Evaluations of a dictionary in the order they were (last) written."""
        with self._errors():
            docs = list(self._db.evaluations.find(self._key(name, series)).sort([("seq", 1), ("_id", 1)]))
        return [evaluation_from_plain(d["name"], d.get("created_at", 0.0), decode_document(d["doc"], d.get("arrays")))
                for d in docs]

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the client if this store opened it (a client passed in stays open)."""
        if self._owns_client and self._client is not None:
            self._client.close()
        self._client = None

    def __repr__(self) -> str:
        return f"MongoStore({redact_uri(self.uri)!r}, database={self.config.database!r})"
