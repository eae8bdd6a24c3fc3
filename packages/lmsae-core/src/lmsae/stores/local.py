"""The embedded store: one SQLite database in a directory, no server.

Layout: ``<directory>/store.sqlite`` (plus SQLite's ``-wal`` and ``-shm`` files) holds every
record. Free-form parts of records (configs, sample metadata, extras, scores...) are stored as
JSON text, and their numpy arrays as one safetensors BLOB per record (see
:mod:`lmsae.stores.arrays`); nothing is pickled. Per-feature statistics live in their own table,
apart from the heavy samples, so :meth:`LocalStore.feature_statistics` never reads samples.

Tables (schema version :data:`SCHEMA_VERSION`, recorded in ``schema_version``):

- ``language_models(name, config, arrays)``, ``datasets(name, config, arrays)``;
- ``dictionaries(id, name, series, path, model_name, created_at, config, config_arrays)``,
  unique ``(name, series)``;
- ``analyses(id, dictionary_id, name)``: an analysis run of a dictionary;
- ``feature_statistics(analysis_id, feature, act_count, n_tokens, max_activation)``;
- ``feature_payloads(analysis_id, feature, doc, arrays)``: histogram, samplings and extras;
- ``logit_attributions(dictionary_id, feature, doc)``;
- ``interpretations(dictionary_id, feature, text, explainer_model, created_at, doc, arrays)``;
- ``evaluations(id, dictionary_id, name, created_at, doc, arrays)``: ``id`` gives the order.

Every per-dictionary table references its parent with ``ON DELETE CASCADE``, so removing a
dictionary removes everything recorded about it in one statement.

Concurrency: the database runs in WAL mode with a busy timeout, so several processes can read
while one writes. Within a process one connection is shared behind a lock, so a store may be
used from worker threads (e.g. auto-interp writing interpretations from a thread pool).
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import sqlite3
import threading
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
from lmsae.stores.configs import LocalStoreConfig

__all__ = ["DATABASE_NAME", "SCHEMA_VERSION", "LocalStore"]

log = logging.getLogger(__name__)

#: file name of the database inside the store directory
DATABASE_NAME = "store.sqlite"
#: version of the table layout this code writes and reads
SCHEMA_VERSION = 1
#: how long a writer waits for another process's write to finish before failing
BUSY_TIMEOUT_MS = 30_000
#: features written per transaction by put_feature_analyses (bounds memory for long iterables)
FEATURE_BATCH = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS language_models (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    arrays BLOB
);
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    arrays BLOB
);
CREATE TABLE IF NOT EXISTS dictionaries (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    series TEXT NOT NULL,
    path TEXT NOT NULL,
    model_name TEXT,
    created_at REAL NOT NULL,
    config TEXT NOT NULL,
    config_arrays BLOB,
    UNIQUE (name, series)
);
CREATE INDEX IF NOT EXISTS dictionaries_by_series ON dictionaries (series, name);
CREATE TABLE IF NOT EXISTS analyses (
    id INTEGER PRIMARY KEY,
    dictionary_id INTEGER NOT NULL REFERENCES dictionaries (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    UNIQUE (dictionary_id, name)
);
CREATE TABLE IF NOT EXISTS feature_statistics (
    analysis_id INTEGER NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    feature INTEGER NOT NULL,
    act_count INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    max_activation REAL,
    PRIMARY KEY (analysis_id, feature)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS feature_payloads (
    id INTEGER PRIMARY KEY,
    analysis_id INTEGER NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    feature INTEGER NOT NULL,
    doc TEXT NOT NULL,
    arrays BLOB,
    UNIQUE (analysis_id, feature)
);
CREATE TABLE IF NOT EXISTS logit_attributions (
    dictionary_id INTEGER NOT NULL REFERENCES dictionaries (id) ON DELETE CASCADE,
    feature INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (dictionary_id, feature)
);
CREATE TABLE IF NOT EXISTS interpretations (
    dictionary_id INTEGER NOT NULL REFERENCES dictionaries (id) ON DELETE CASCADE,
    feature INTEGER NOT NULL,
    text TEXT NOT NULL,
    explainer_model TEXT NOT NULL,
    created_at REAL NOT NULL,
    doc TEXT NOT NULL,
    arrays BLOB,
    PRIMARY KEY (dictionary_id, feature)
);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dictionary_id INTEGER NOT NULL REFERENCES dictionaries (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    doc TEXT NOT NULL,
    arrays BLOB,
    UNIQUE (dictionary_id, name)
);
"""


def _float_or_nan(value: float | None) -> float:
    # SQLite stores NaN as NULL.
    return float("nan") if value is None else float(value)


class LocalStore(Store):
    """A :class:`Store` in ``<directory>/store.sqlite`` (created with its directory if missing).

    Raises:
        StoreError: the directory cannot be created, the file is not a store database, or it
            was written by a newer lmsae (a schema version this code does not know).
    """

    def __init__(self, config: LocalStoreConfig | None = None):
        self.config = config if config is not None else LocalStoreConfig()
        # Configs built in code may carry a str; those read from files carry a Path.
        given = self.config.directory
        self.directory: pathlib.Path = (pathlib.Path(given).expanduser() if given is not None
                                        else self.config.resolved_directory())
        self.path: pathlib.Path = self.directory / DATABASE_NAME
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store directory {self.directory}: {exc}") from exc
        with self._errors():
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE for writes), so a
            # reader never holds a lock it later has to upgrade (a classic SQLite deadlock).
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                db.execute("PRAGMA foreign_keys = ON")
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.debug("store %s: journal mode %s (WAL unavailable on this file system)", self.path, mode)
                self._db = db
                self._migrate()
            except BaseException:
                self._db = None
                db.close()
                raise

    # --- plumbing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"local store {self.path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"local store {self.path} is closed")
        return self._db

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors():
            yield self._connection()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any error."""
        with self._lock, self._errors():
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT: the connection must not stay inside a transaction.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        db = self._connection()
        version = self._schema_version(db)
        if version is None:
            with self._write() as tx:
                tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                # Another process may have created the schema between our read and the lock.
                row = tx.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    # executescript() would commit the open transaction; run the statements in it.
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            tx.execute(statement)
                    tx.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                    version = SCHEMA_VERSION
                else:
                    version = int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(f"the store at {self.directory} has schema version {version}, written by a newer "
                             f"lmsae; this version reads up to {SCHEMA_VERSION} (upgrade lmsae)")
        # Version 1 is the first layout: nothing to migrate yet.

    @staticmethod
    def _schema_version(db: sqlite3.Connection) -> int | None:
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
        if not exists:
            return None
        row = db.execute("SELECT version FROM schema_version").fetchone()
        return None if row is None else int(row[0])

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self._read() as db:
            version = self._schema_version(db)
        if version is None:
            raise StoreError(f"local store {self.path} has no schema version")
        return version

    def _dictionary_id(self, db: sqlite3.Connection, name: str, series: str, *, required: bool) -> int | None:
        row = db.execute("SELECT id FROM dictionaries WHERE name = ? AND series = ?", (name, series)).fetchone()
        if row is None and required:
            known = [r[0] for r in db.execute("SELECT name FROM dictionaries WHERE series = ? ORDER BY name",
                                               (series,))]
            from lmsae._text import did_you_mean

            raise StoreError(f"no dictionary {name!r} in series {series!r} in the store at {self.directory}; "
                             f"known: {', '.join(known) or '(none)'}{did_you_mean(name, known)}")
        return None if row is None else int(row[0])

    # --- language models and datasets ---------------------------------------------------------

    def _put_named(self, table: str, record: NamedConfigRecord) -> None:
        text, blob = encode_document(dict(record.config))
        with self._write() as db:
            db.execute(f"INSERT INTO {table} (name, config, arrays) VALUES (?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET config = excluded.config, arrays = excluded.arrays",
                       (record.name, text, blob))

    def _get_named(self, table: str, name: str) -> NamedConfigRecord | None:
        with self._read() as db:
            row = db.execute(f"SELECT config, arrays FROM {table} WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        return NamedConfigRecord(name=name, config=decode_document(row[0], row[1]))

    # --- dictionaries ---------------------------------------------------------------------

    def put_dictionary(self, record: DictionaryRecord) -> None:
        text, blob = encode_document(dict(record.config))
        with self._write() as db:
            # An UPDATE on conflict (not INSERT OR REPLACE, which deletes the row first) keeps
            # the row id, so re-registering a dictionary does not cascade-delete its analyses.
            db.execute(
                "INSERT INTO dictionaries (name, series, path, model_name, created_at, config, config_arrays) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name, series) DO UPDATE SET path = excluded.path, "
                "model_name = excluded.model_name, created_at = excluded.created_at, config = excluded.config, "
                "config_arrays = excluded.config_arrays",
                (record.name, record.series, str(record.path), record.model_name, float(record.created_at), text,
                 blob))

    @staticmethod
    def _dictionary_from_row(row: tuple[Any, ...]) -> DictionaryRecord:
        name, series, path, model_name, created_at, config, arrays = row
        return DictionaryRecord(name=name, series=series, path=path, config=decode_document(config, arrays),
                                model_name=model_name, created_at=float(created_at))

    _DICTIONARY_COLUMNS = "name, series, path, model_name, created_at, config, config_arrays"

    def get_dictionary(self, name: str, series: str = "default") -> DictionaryRecord | None:
        with self._read() as db:
            row = db.execute(f"SELECT {self._DICTIONARY_COLUMNS} FROM dictionaries WHERE name = ? AND series = ?",
                             (name, series)).fetchone()
        return None if row is None else self._dictionary_from_row(row)

    def list_dictionaries(self, series: str | None = None) -> list[DictionaryRecord]:
        """Dictionaries sorted by name then series (only ``series`` when given)."""
        with self._read() as db:
            if series is None:
                rows = db.execute(f"SELECT {self._DICTIONARY_COLUMNS} FROM dictionaries "
                                  "ORDER BY name, series").fetchall()
            else:
                rows = db.execute(f"SELECT {self._DICTIONARY_COLUMNS} FROM dictionaries WHERE series = ? "
                                  "ORDER BY name", (series,)).fetchall()
        return [self._dictionary_from_row(r) for r in rows]

    def remove_dictionary(self, name: str, series: str = "default") -> bool:
        with self._write() as db:
            # Foreign keys with ON DELETE CASCADE remove analyses, features, logit
            # attributions, interpretations and evaluations with the dictionary row.
            cursor = db.execute("DELETE FROM dictionaries WHERE name = ? AND series = ?", (name, series))
            return cursor.rowcount > 0

    # --- per-feature analyses -------------------------------------------------------------

    def put_feature_analyses(self, name: str, series: str, analysis: str,
                             features: Iterable[FeatureAnalysis]) -> None:
        """Store analyses of features (upsert by feature index); an analysis is listed once it
        holds a feature. Large iterables are written in batches of :data:`FEATURE_BATCH`."""
        with self._read() as db:
            self._dictionary_id(db, name, series, required=True)
        stats: list[tuple[int, int, int, float]] = []
        payloads: list[tuple[int, str, bytes | None]] = []
        for feature in features:
            index = int(feature.index)
            text, blob = encode_document(feature_heavy_to_plain(feature))
            stats.append((index, int(feature.act_count), int(feature.n_tokens), float(feature.max_activation)))
            payloads.append((index, text, blob))
            if len(stats) >= FEATURE_BATCH:
                self._write_features(name, series, analysis, stats, payloads)
                stats, payloads = [], []
        if stats:
            self._write_features(name, series, analysis, stats, payloads)

    def _write_features(self, name: str, series: str, analysis: str, stats: list[tuple[int, int, int, float]],
                        payloads: list[tuple[int, str, bytes | None]]) -> None:
        with self._write() as db:
            dictionary_id = self._dictionary_id(db, name, series, required=True)
            db.execute("INSERT INTO analyses (dictionary_id, name) VALUES (?, ?) "
                       "ON CONFLICT (dictionary_id, name) DO NOTHING", (dictionary_id, analysis))
            analysis_id = db.execute("SELECT id FROM analyses WHERE dictionary_id = ? AND name = ?",
                                     (dictionary_id, analysis)).fetchone()[0]
            db.executemany(
                "INSERT INTO feature_statistics (analysis_id, feature, act_count, n_tokens, max_activation) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (analysis_id, feature) DO UPDATE SET "
                "act_count = excluded.act_count, n_tokens = excluded.n_tokens, "
                "max_activation = excluded.max_activation",
                [(analysis_id, *row) for row in stats])
            db.executemany(
                "INSERT INTO feature_payloads (analysis_id, feature, doc, arrays) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (analysis_id, feature) DO UPDATE SET doc = excluded.doc, arrays = excluded.arrays",
                [(analysis_id, *row) for row in payloads])

    def get_feature_analysis(self, name: str, series: str, index: int,
                             analysis: str = "default") -> FeatureAnalysis | None:
        with self._read() as db:
            row = db.execute(
                "SELECT s.act_count, s.n_tokens, s.max_activation, p.doc, p.arrays "
                "FROM dictionaries d JOIN analyses a ON a.dictionary_id = d.id "
                "JOIN feature_statistics s ON s.analysis_id = a.id "
                "JOIN feature_payloads p ON p.analysis_id = a.id AND p.feature = s.feature "
                "WHERE d.name = ? AND d.series = ? AND a.name = ? AND s.feature = ?",
                (name, series, analysis, int(index))).fetchone()
        if row is None:
            return None
        act_count, n_tokens, max_activation, doc, arrays = row
        return feature_heavy_from_plain(int(index), act_count, n_tokens, _float_or_nan(max_activation),
                                        decode_document(doc, arrays))

    def list_analyses(self, name: str, series: str = "default") -> list[str]:
        """Names of the analyses of a dictionary that hold at least one feature, sorted."""
        with self._read() as db:
            rows = db.execute(
                "SELECT a.name FROM analyses a JOIN dictionaries d ON a.dictionary_id = d.id "
                "WHERE d.name = ? AND d.series = ? "
                "AND EXISTS (SELECT 1 FROM feature_statistics s WHERE s.analysis_id = a.id) ORDER BY a.name",
                (name, series)).fetchall()
        return [r[0] for r in rows]

    def feature_statistics(self, name: str, series: str, analysis: str = "default") -> dict[str, np.ndarray]:
        """Columns ``index``, ``act_count``, ``n_tokens`` (int64) and ``max_activation`` (float64),
        sorted by index; empty when the dictionary or analysis is unknown."""
        with self._read() as db:
            rows = db.execute(
                "SELECT s.feature, s.act_count, s.n_tokens, s.max_activation "
                "FROM dictionaries d JOIN analyses a ON a.dictionary_id = d.id "
                "JOIN feature_statistics s ON s.analysis_id = a.id "
                "WHERE d.name = ? AND d.series = ? AND a.name = ? ORDER BY s.feature",
                (name, series, analysis)).fetchall()
        columns = list(zip(*rows)) if rows else [(), (), (), ()]
        return {
            "index": np.array(columns[0], dtype=np.int64),
            "act_count": np.array(columns[1], dtype=np.int64),
            "n_tokens": np.array(columns[2], dtype=np.int64),
            "max_activation": np.array([_float_or_nan(v) for v in columns[3]], dtype=np.float64),
        }

    def feature_count(self, name: str, series: str, analysis: str = "default") -> int:
        """Number of features stored for one analysis (0 when unknown)."""
        with self._read() as db:
            row = db.execute(
                "SELECT COUNT(*) FROM dictionaries d JOIN analyses a ON a.dictionary_id = d.id "
                "JOIN feature_statistics s ON s.analysis_id = a.id "
                "WHERE d.name = ? AND d.series = ? AND a.name = ?", (name, series, analysis)).fetchone()
        return int(row[0])

    # --- logit attributions and interpretations -------------------------------------------

    def put_logit_attributions(self, name: str, series: str, attributions: Iterable[LogitAttribution]) -> None:
        rows = []
        for record in attributions:
            text, _ = encode_document(logit_attribution_to_plain(record))
            rows.append((int(record.index), text))
        with self._write() as db:
            dictionary_id = self._dictionary_id(db, name, series, required=True)
            db.executemany("INSERT INTO logit_attributions (dictionary_id, feature, doc) VALUES (?, ?, ?) "
                           "ON CONFLICT (dictionary_id, feature) DO UPDATE SET doc = excluded.doc",
                           [(dictionary_id, *row) for row in rows])

    def get_logit_attribution(self, name: str, series: str, index: int) -> LogitAttribution | None:
        with self._read() as db:
            row = db.execute("SELECT l.doc FROM logit_attributions l JOIN dictionaries d ON l.dictionary_id = d.id "
                             "WHERE d.name = ? AND d.series = ? AND l.feature = ?",
                             (name, series, int(index))).fetchone()
        return None if row is None else logit_attribution_from_plain(int(index), decode_document(row[0]))

    def count_logit_attributions(self, name: str, series: str = "default") -> int:
        """Number of features with a logit attribution."""
        return self._count("logit_attributions", name, series)

    def put_interpretation(self, name: str, series: str, interpretation: Interpretation) -> None:
        text, blob = encode_document({"scores": dict(interpretation.scores),
                                      "details": dict(interpretation.details)})
        with self._write() as db:
            dictionary_id = self._dictionary_id(db, name, series, required=True)
            db.execute(
                "INSERT INTO interpretations (dictionary_id, feature, text, explainer_model, created_at, doc, "
                "arrays) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dictionary_id, feature) DO UPDATE SET "
                "text = excluded.text, explainer_model = excluded.explainer_model, "
                "created_at = excluded.created_at, doc = excluded.doc, arrays = excluded.arrays",
                (dictionary_id, int(interpretation.index), interpretation.text, interpretation.explainer_model,
                 float(interpretation.created_at), text, blob))

    def get_interpretation(self, name: str, series: str, index: int) -> Interpretation | None:
        with self._read() as db:
            row = db.execute(
                "SELECT i.text, i.explainer_model, i.created_at, i.doc, i.arrays FROM interpretations i "
                "JOIN dictionaries d ON i.dictionary_id = d.id WHERE d.name = ? AND d.series = ? AND i.feature = ?",
                (name, series, int(index))).fetchone()
        if row is None:
            return None
        text, model, created_at, doc, arrays = row
        return interpretation_from_plain(int(index), text, model, created_at, decode_document(doc, arrays))

    def interpreted_features(self, name: str, series: str) -> set[int]:
        with self._read() as db:
            rows = db.execute("SELECT i.feature FROM interpretations i JOIN dictionaries d ON i.dictionary_id = d.id "
                              "WHERE d.name = ? AND d.series = ?", (name, series)).fetchall()
        return {int(r[0]) for r in rows}

    # --- evaluations -------------------------------------------------------------------------

    def put_evaluation(self, name: str, series: str, record: EvaluationRecord) -> None:
        """Store an evaluation; one with the same name is replaced and moves to the end of the list."""
        text, blob = encode_document(evaluation_to_plain(record))
        with self._write() as db:
            dictionary_id = self._dictionary_id(db, name, series, required=True)
            # Delete then insert (AUTOINCREMENT never reuses ids): the list is in order of last write.
            db.execute("DELETE FROM evaluations WHERE dictionary_id = ? AND name = ?", (dictionary_id, record.name))
            db.execute("INSERT INTO evaluations (dictionary_id, name, created_at, doc, arrays) VALUES (?, ?, ?, ?, ?)",
                       (dictionary_id, record.name, float(record.created_at), text, blob))

    def list_evaluations(self, name: str, series: str = "default") -> list[EvaluationRecord]:
        """Evaluations of a dictionary in the order they were (last) written."""
        with self._read() as db:
            rows = db.execute("SELECT e.name, e.created_at, e.doc, e.arrays FROM evaluations e "
                              "JOIN dictionaries d ON e.dictionary_id = d.id WHERE d.name = ? AND d.series = ? "
                              "ORDER BY e.id", (name, series)).fetchall()
        return [evaluation_from_plain(n, c, decode_document(doc, arrays)) for n, c, doc, arrays in rows]

    # --- helpers -------------------------------------------------------------------------------

    def _count(self, table: str, name: str, series: str) -> int:
        with self._read() as db:
            row = db.execute(f"SELECT COUNT(*) FROM {table} t JOIN dictionaries d ON t.dictionary_id = d.id "
                             "WHERE d.name = ? AND d.series = ?", (name, series)).fetchone()
        return int(row[0])

    def count_interpretations(self, name: str, series: str = "default") -> int:
        """Number of interpreted features."""
        return self._count("interpretations", name, series)

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection (further calls raise StoreError); idempotent."""
        with self._lock:
            if self._db is not None:
                with self._errors():
                    self._db.close()
                self._db = None

    def __repr__(self) -> str:
        return f"LocalStore({str(self.directory)!r})"
