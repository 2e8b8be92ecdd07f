"""DuckDB as the system of record: one database file, one table per collection, a schema version."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt

from service.duck_values import (
    STORAGE_LOST,
    THUMBNAIL_COLUMN,
    blob_column,
    decode_json,
    engine_stopped,
    first_row,
    json_value,
    map_duckdb_error,
    metadata_text,
    object_column,
    quote,
    storage_cause,
    write_failure,
)
from service.errors import DotsearchError, SchemaVersionError, StorageError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
DB_FILENAME = "dotsearch.duckdb"
META_TABLE = "_dotsearch_meta"
COLLECTIONS_TABLE = "_dotsearch_collections"
MODELS_TABLE = "_dotsearch_models"
# Rows per chunk when writing or reading vectors: bounds the Python-side copies.
CHUNK_ROWS = 8192

RESERVED_COLUMNS = {"id", THUMBNAIL_COLUMN, "rowid"}
DEFAULT_MEMORY_LIMIT = "512MB"  # DuckDB's memory_limit unless DOTSEARCH_DUCKDB_MEMORY_LIMIT
# Up to this many ids are looked up by primary key as parameters; more are joined as a view.
POINT_LOOKUP_MAX = 1024
# A checkpoint that runs out of disk space stops DuckDB (every statement fails until the
# database is opened again); a WAL append that runs out just fails its commit. Automatic
# checkpoints pause while the disk lacks room for one: 2x WAL and staged batch + headroom.
CHECKPOINT_HEADROOM = 64 << 20
CHECKPOINT_PAUSED = "1000000GB"
# The catalog table's columns, in order (version 1 had the first seven).
RECORD_FIELDS = ("name", "dim", "metric", "dtype", "columns", "thumbnails", "vector_column",
                 "column_order", "vector_type", "auto_increment", "shards")
# What version 2 added to the catalog table (a version-1 directory gains them at open).
V2_COLUMNS = ("column_order VARCHAR", "vector_type VARCHAR", "auto_increment BOOLEAN",
              "shards INTEGER")
# Version 3 added trained models: one row each, written once when training is done (a
# model is a snapshot of its training data), its weights a BLOB, the rest JSON text.
MODEL_FIELDS = ("name", "kind", "collection", "label_column", "dim", "classes", "source",
                "options", "metrics", "progress", "created_at", "weights")
MODELS_DDL = (f"CREATE TABLE {MODELS_TABLE} (name VARCHAR PRIMARY KEY, kind VARCHAR, "
              "collection VARCHAR, label_column VARCHAR, dim INTEGER, classes VARCHAR, "
              "source VARCHAR, options VARCHAR, metrics VARCHAR, progress VARCHAR, "
              "created_at VARCHAR, weights BLOB)")


@dataclass
class CollectionRecord:
    """What the catalog table stores about one collection."""

    name: str
    dim: int
    metric: str
    dtype: str
    columns: dict[str, str] = field(default_factory=dict)
    thumbnails: bool = False
    vector_column: str = "feature"
    # Every user-visible column in declared order: "id", the vector column, the metadata.
    column_order: list[str] = field(default_factory=list)
    vector_type: str = "VECTOR"  # the vector column's type as declared (for DESCRIBE)
    auto_increment: bool = False  # the id column was declared AUTO_INCREMENT
    shards: int | None = None  # the ray backend's shard count for it (None: the server's)

    def __post_init__(self) -> None:
        if not self.column_order:
            self.column_order = ["id", self.vector_column, *self.columns]
        # ``columns`` iterates in declared order too (any it does not name keep theirs, last).
        order = [c for c in self.column_order if c in self.columns]
        order += [c for c in self.columns if c not in order]
        self.columns = {c: self.columns[c] for c in order}


class Storage:
    """The DuckDB database: per-thread read cursors, one writer cursor, catalog tables.

    Writes go through ``writer`` only, under the caller's writer mutex; each reader
    thread gets its own cursor (a DuckDB connection to the same database). A write that
    fails in storage (full disk, I/O error) is rolled back and raises StorageError in our
    words; should DuckDB invalidate its database, ``commit`` reopens it so reads go on.
    """

    def __init__(self, data_dir: Path | str, *, memory_limit: str = DEFAULT_MEMORY_LIMIT,
                 checkpoint_threshold: str = "256MB",
                 reopen_guard: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
                 ) -> None:
        self.data_dir = Path(data_dir)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {self.data_dir}: {exc}") from exc
        self.path = self.data_dir / DB_FILENAME
        self._checkpoint_threshold = checkpoint_threshold
        self._checkpoints_paused = False
        self._checkpoint_headroom = CHECKPOINT_HEADROOM
        self._staged_bytes = 0
        self._open_hooks: list[Callable[[duckdb.DuckDBPyConnection], None]] = []
        self._generation = 0  # bumped when the database is opened again after a failure
        self.broken: str | None = None  # why storage cannot be used until a restart
        self._config: dict[str, str | bool | int | float | list[str]] = {
            "memory_limit": memory_limit,
            "enable_external_access": False,
            "preserve_insertion_order": False,
            # Commits append to the WAL; checkpoints (which rewrite the data into the file)
            # are amortised over this much WAL. Compression of random float bytes costs far
            # more time at checkpoint than it saves space, so vectors are stored raw.
            "checkpoint_threshold": checkpoint_threshold,
            "force_compression": "uncompressed",
        }
        # Entered before a reopen closes every cursor: the owner's way to wait for readers.
        self._reopen_guard = reopen_guard or contextlib.nullcontext
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._cursors_lock = threading.Lock()
        self._register_counter = 0
        self._connect()
        try:
            self._init_schema()
        except BaseException:
            self.close()  # a refused or failed open leaves the directory free for the next
            raise

    def _connect(self) -> None:
        self._config["checkpoint_threshold"] = (
            CHECKPOINT_PAUSED if self._checkpoints_paused else self._checkpoint_threshold)
        try:
            self.con = duckdb.connect(str(self.path), config=self._config)
        except duckdb.Error as exc:
            raise StorageError(f"cannot open {self.path}: {str(exc).splitlines()[0]}") from exc
        self._writer = self.con.cursor()

    @property
    def writer(self) -> duckdb.DuckDBPyConnection:
        """The one cursor that writes (StorageError while storage is unusable)."""
        if self.broken is not None:
            raise StorageError(self.broken)
        return self._writer

    def on_open(self, hook: Callable[[duckdb.DuckDBPyConnection], None]) -> None:
        """Run ``hook`` on the connection now and again whenever the database is reopened
        (to register functions)."""
        hook(self.con)
        self._open_hooks.append(hook)

    # -- connections -------------------------------------------------------------------

    def reader(self) -> duckdb.DuckDBPyConnection:
        """This thread's own cursor (a new one after the database was reopened)."""
        got: tuple[int, duckdb.DuckDBPyConnection] | None = getattr(self._local, "cursor", None)
        if got is not None and got[0] == self._generation:
            return got[1]
        if self.broken is not None:
            raise StorageError(self.broken)
        cur = self.con.cursor()
        self._local.cursor = (self._generation, cur)
        with self._cursors_lock:
            self._cursors.append(cur)
        return cur

    def unique_name(self, prefix: str) -> str:
        with self._cursors_lock:
            self._register_counter += 1
            return f"__{prefix}_{self._register_counter}"

    def close(self) -> None:
        with self._cursors_lock:
            for cur in [*self._cursors, self._writer, self.con]:
                with contextlib.suppress(duckdb.Error):
                    cur.close()
            self._cursors.clear()

    def _reopen(self) -> bool:
        """Open the database again after DuckDB invalidated it (its WAL and last checkpoint
        hold every committed write). Every cursor is closed, so this waits, in the owner's
        ``reopen_guard``, until no reader uses one."""
        with self._reopen_guard():
            return self._reopen_now()

    def _reopen_now(self) -> bool:
        self.close()
        self._generation += 1
        try:
            self._connect()
            first_row(self._writer.execute(f"SELECT count(*) FROM {META_TABLE}"))
            for hook in self._open_hooks:
                hook(self.con)
        except (duckdb.Error, StorageError) as exc:
            log.error("could not reopen %s after a storage failure: %s", self.path, exc)
            self.close()
            self.broken = STORAGE_LOST
            return False
        log.warning("reopened %s after a storage failure", self.path)
        return True

    def _failed(self, exc: duckdb.Error, lead: str) -> DotsearchError:
        """A failed write, rolled back, in our words; reopens the database DuckDB stopped."""
        self.rollback()
        if storage_cause(exc) is None:
            return map_duckdb_error(exc, lead)
        log.error("%s: %s", lead, exc)  # DuckDB's own words, with paths: for the log only
        if not engine_stopped(exc):
            return write_failure(exc, lead, reopened=None)
        # A checkpoint ran out of room after all: reopen with checkpoints paused, and ask
        # for more room before the next one.
        self._checkpoints_paused = True
        self._checkpoint_headroom *= 4
        return write_failure(exc, lead, reopened=self._reopen())

    # -- schema ------------------------------------------------------------------------

    def _init_schema(self) -> None:
        cur = self.writer
        if (META_TABLE,) not in cur.execute("SELECT table_name FROM duckdb_tables()").fetchall():
            cur.execute("BEGIN")
            cur.execute(f"CREATE TABLE {META_TABLE} (key VARCHAR PRIMARY KEY, value VARCHAR)")
            cur.execute(f"CREATE TABLE {COLLECTIONS_TABLE} (name VARCHAR PRIMARY KEY, "
                        "dim INTEGER, metric VARCHAR, dtype VARCHAR, columns VARCHAR, "
                        f"thumbnails BOOLEAN, vector_column VARCHAR, {', '.join(V2_COLUMNS)})")
            cur.execute(MODELS_DDL)
            cur.execute(f"INSERT INTO {META_TABLE} VALUES ('schema_version', $v)",
                        {"v": str(SCHEMA_VERSION)})
            cur.execute("COMMIT")
            return
        row = first_row(cur.execute(f"SELECT value FROM {META_TABLE} "
                                    "WHERE key = 'schema_version'"))
        found = row[0] if row else None
        if found in ("1", "2"):
            self._migrate(int(found))
        elif found != str(SCHEMA_VERSION):
            raise SchemaVersionError(
                f"{self.path} has storage schema version {found!r}, but this dotsearch reads "
                f"version {SCHEMA_VERSION}; use a matching dotsearch release or a new data "
                "directory")

    def _migrate(self, found: int) -> None:
        """Version 1 or 2 -> 3, in place, in one transaction (a failure leaves the version
        found). 1 -> 2: the catalog table learns each collection's declared column order
        (version 1 created id, the vector, then the metadata columns in their stored
        order), vector type and AUTO_INCREMENT. 2 -> 3: the table of trained models."""
        cur = self.writer
        try:
            cur.execute("BEGIN")
            if found == 1:
                self._migrate_v1_rows(cur)
            cur.execute(MODELS_DDL)
            cur.execute(f"UPDATE {META_TABLE} SET value = $v WHERE key = 'schema_version'",
                        {"v": str(SCHEMA_VERSION)})
            cur.execute("COMMIT")
        except (duckdb.Error, ValueError, TypeError) as exc:
            self.rollback()
            raise StorageError(
                f"could not migrate {self.path} from storage schema version {found} to "
                f"{SCHEMA_VERSION} (it is left at version {found}): "
                f"{str(exc).splitlines()[0]}") from exc
        log.info("migrated %s from storage schema version %d to %d (%d collections)",
                 self.path, found, SCHEMA_VERSION, len(self.load_records()))

    @staticmethod
    def _migrate_v1_rows(cur: duckdb.DuckDBPyConnection) -> list[Any]:
        """The 1 -> 2 step inside the migration's transaction; the collections' rows."""
        for column in V2_COLUMNS:
            cur.execute(f"ALTER TABLE {COLLECTIONS_TABLE} ADD COLUMN {column}")
        rows = cur.execute(f"SELECT name, dim, dtype, columns, vector_column "
                           f"FROM {COLLECTIONS_TABLE}").fetchall()
        for name, dim, dtype, columns, vector_column in rows:
            order = ["id", vector_column, *json.loads(columns)]
            f16 = ", F16" if dtype == "float16" else ""
            cur.execute(f"UPDATE {COLLECTIONS_TABLE} SET column_order = $o, "
                        "vector_type = $t, auto_increment = false WHERE name = $n",
                        {"o": json.dumps(order), "t": f"VECTOR({int(dim)}{f16})", "n": name})
        return rows

    # The commit sequence: one number in the meta table, bumped inside every transaction
    # that changes vectors, so a reader's snapshot says which writes it holds.

    def read_commit_seq(self, cur: duckdb.DuckDBPyConnection) -> int:
        """The commit sequence this cursor sees (in a transaction: pins its snapshot)."""
        row = first_row(cur.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'commit_seq'"))
        return int(row[0]) if row else 0

    def stage_commit_seq(self, seq: int) -> None:
        """Set the commit sequence inside the writer's open transaction."""
        self.writer.execute(f"INSERT OR REPLACE INTO {META_TABLE} VALUES ('commit_seq', $s)",
                            {"s": str(int(seq))})

    def load_records(self) -> list[CollectionRecord]:
        rows = self.writer.execute(f"SELECT {', '.join(RECORD_FIELDS)} FROM "
                                   f"{COLLECTIONS_TABLE} ORDER BY name").fetchall()
        return [CollectionRecord(r[0], int(r[1]), r[2], r[3], json.loads(r[4]), bool(r[5]), r[6],
                                 json.loads(r[7]), r[8], bool(r[9]),
                                 None if r[10] is None else int(r[10])) for r in rows]

    # -- trained models (caller holds the writer mutex) --------------------------------

    def load_models(self) -> list[dict[str, Any]]:
        """Every stored model's row, by name (weights as bytes)."""
        rows = self.writer.execute(f"SELECT {', '.join(MODEL_FIELDS)} FROM {MODELS_TABLE} "
                                   "ORDER BY name").fetchall()
        return [dict(zip(MODEL_FIELDS, r, strict=True)) for r in rows]

    def put_model(self, row: dict[str, Any]) -> None:
        """Store one finished model in one transaction (all of it, or nothing)."""
        values = [row[f] for f in MODEL_FIELDS]
        self.begin()
        try:
            self.writer.execute(f"INSERT INTO {MODELS_TABLE} ({', '.join(MODEL_FIELDS)}) "
                                f"VALUES ({', '.join('?' * len(values))})", values)
        except duckdb.Error as exc:
            raise self._failed(exc, f"storing model {row['name']!r} failed") from exc
        self.commit()

    def delete_model(self, name: str) -> None:
        self.begin()
        try:
            self.writer.execute(f"DELETE FROM {MODELS_TABLE} WHERE name = $n", {"n": name})
        except duckdb.Error as exc:
            raise self._failed(exc, f"dropping model {name!r} failed") from exc
        self.commit()

    def create_table(self, rec: CollectionRecord) -> None:
        """The collection's table, its columns in declared order (thumbnails last)."""
        cols = [("id BIGINT PRIMARY KEY" if c == "id"
                 else f"{quote(c)} BLOB NOT NULL" if c == rec.vector_column
                 else f"{quote(c)} {rec.columns[c]}") for c in rec.column_order]
        if rec.thumbnails:
            cols.append(f"{THUMBNAIL_COLUMN} BLOB")
        self.begin()
        try:
            self.writer.execute(f"CREATE TABLE {quote(rec.name)} ({', '.join(cols)})")
            self._put_record(rec)
        except duckdb.Error as exc:
            raise self._failed(exc, f"create table {rec.name!r} failed") from exc
        self.commit()

    def drop_table(self, name: str) -> None:
        self.begin()
        try:
            self.writer.execute(f"DROP TABLE IF EXISTS {quote(name)}")
            self.writer.execute(f"DELETE FROM {COLLECTIONS_TABLE} WHERE name = $n", {"n": name})
        except duckdb.Error as exc:
            raise self._failed(exc, f"drop table {name!r} failed") from exc
        self.commit()

    def stage_alter(self, name: str, change: str, rec: CollectionRecord) -> None:
        """Open a transaction that runs ``ALTER TABLE <name> <change>`` and stores ``rec``
        as the record of ``name`` (renamed, if ``rec.name`` differs); the caller commits
        it with ``try_commit``."""
        self.begin()
        try:
            self.writer.execute(f"ALTER TABLE {quote(name)} {change}")
            self.writer.execute(f"DELETE FROM {COLLECTIONS_TABLE} WHERE name = $n", {"n": name})
            self._put_record(rec)
        except duckdb.Error as exc:
            raise self._failed(exc, f"altering table {name!r} failed") from exc

    def _put_record(self, rec: CollectionRecord) -> None:
        values = [rec.name, rec.dim, rec.metric, rec.dtype, json.dumps(rec.columns),
                  rec.thumbnails, rec.vector_column, json.dumps(rec.column_order),
                  rec.vector_type, rec.auto_increment, rec.shards]
        self.writer.execute(f"INSERT INTO {COLLECTIONS_TABLE} ({', '.join(RECORD_FIELDS)}) "
                            f"VALUES ({', '.join('?' * len(values))})", values)

    # -- writes (caller holds the writer mutex; BEGIN here, COMMIT by commit()) ----------

    def begin(self) -> None:
        self._staged_bytes = 0
        try:
            self.writer.execute("BEGIN")  # StorageError while storage is unusable
        except duckdb.Error as exc:
            raise map_duckdb_error(exc, "starting the write") from exc

    def commit(self) -> None:
        """COMMIT the open transaction, or StorageError (rolled back). Should the commit stop
        DuckDB, the database is reopened here (inside the reopen guard)."""
        failure = self.try_commit()
        if failure is not None:
            raise self.failed(failure, "the write was not stored") from failure

    def try_commit(self) -> duckdb.Error | None:
        """COMMIT the open transaction; DuckDB's error, if it failed, for ``failed`` (which
        may reopen the database: call it holding no lock that readers wait on)."""
        self._pace_checkpoints()
        try:
            self.writer.execute("COMMIT")
        except duckdb.Error as exc:
            return exc
        return None

    def failed(self, exc: duckdb.Error, lead: str) -> DotsearchError:
        """A failed commit, rolled back, in our words (see ``_failed``)."""
        return self._failed(exc, lead)

    def _pace_checkpoints(self) -> None:
        """Pause DuckDB's automatic checkpoints while the disk lacks room for one."""
        try:
            free = shutil.disk_usage(self.data_dir).free
            wal_path = f"{self.path}.wal"
            wal = os.stat(wal_path).st_size if os.path.exists(wal_path) else 0
        except OSError:
            return
        pause = free < 2 * (wal + self._staged_bytes) + self._checkpoint_headroom
        if pause == self._checkpoints_paused:
            return
        threshold = CHECKPOINT_PAUSED if pause else self._checkpoint_threshold
        try:
            self.writer.execute(f"SET checkpoint_threshold = '{threshold}'")
        except duckdb.Error as exc:
            log.warning("could not set checkpoint_threshold: %s", exc)
            return
        self._checkpoints_paused = pause
        log.warning("automatic checkpoints %s (%d MB free in the data directory)",
                    "paused" if pause else "resumed", free >> 20)

    def rollback(self) -> None:
        with contextlib.suppress(duckdb.Error):
            self._writer.execute("ROLLBACK")

    def stage_upsert(self, rec: CollectionRecord, ids: npt.NDArray[np.int64],
                     vectors: npt.NDArray[np.float32], metadata: Sequence[dict[str, Any]] | None,
                     thumbnails: Sequence[bytes | None] | None, *, overwrite: bool = True) -> None:
        """Write the rows inside the open transaction (ids already unique): INSERT OR
        REPLACE, or a plain INSERT when the caller knows that none of the ids is stored."""
        names = ["id", rec.vector_column, *rec.columns]
        select = ["id", quote(rec.vector_column)]
        select += [f"CAST({quote(c)} AS {t}) AS {quote(c)}" for c, t in rec.columns.items()]
        if rec.thumbnails:
            names.append(THUMBNAIL_COLUMN)
            select.append(THUMBNAIL_COLUMN)
        texts: dict[str, list[str | None]] = {c: [] for c in rec.columns}
        for i in range(len(ids)):
            row = metadata[i] if metadata is not None else {}
            for c, t in rec.columns.items():
                texts[c].append(metadata_text(c, t, row.get(c)))
        self._staged_bytes += int(vectors.nbytes) + sum(
            len(text) for column in texts.values() for text in column if text is not None)
        target = quote(rec.name)
        column_list = ", ".join(quote(n) for n in names)
        verb = "INSERT OR REPLACE" if overwrite else "INSERT"
        for start in range(0, len(ids), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, len(ids))
            batch: dict[str, npt.NDArray[Any]] = {
                "id": ids[start:stop],
                rec.vector_column: blob_column(vectors[start:stop]),
            }
            for c in rec.columns:
                batch[c] = object_column(texts[c][start:stop])
            if rec.thumbnails:
                thumbs = list(thumbnails[start:stop]) if thumbnails is not None else []
                thumbs += [None] * (stop - start - len(thumbs))
                batch[THUMBNAIL_COLUMN] = object_column(thumbs)
            self._write_from(batch, lambda view: (
                f"{verb} INTO {target} ({column_list}) "
                f"SELECT {', '.join(select)} FROM {view}"))

    def stage_delete(self, name: str, ids: npt.NDArray[np.int64]) -> None:
        self._write_from({"id": ids}, lambda view: (
            f"DELETE FROM {quote(name)} WHERE id IN (SELECT id FROM {view})"))

    def _write_from(self, columns: dict[str, Any], statement: Callable[[str], str]) -> None:
        """Run a write that reads ``columns`` registered as a temporary view; roll back the
        open transaction if it fails."""
        view = self.unique_name("batch")
        self.writer.register(view, columns)
        try:
            self.writer.execute(statement(view))
        except duckdb.Error:
            self.rollback()
            raise
        finally:
            with contextlib.suppress(duckdb.Error):
                self._writer.unregister(view)

    # -- reads --------------------------------------------------------------------------

    def existing_ids(self, cur: duckdb.DuckDBPyConnection, name: str,
                     ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        view = self.unique_name("ids")
        cur.register(view, {"id": ids})
        try:
            got = cur.execute(f"SELECT t.id FROM {quote(name)} t JOIN {view} v ON t.id = v.id"
                              ).fetchnumpy()["id"]
        finally:
            cur.unregister(view)
        return np.asarray(got, dtype=np.int64)

    def max_id(self, name: str) -> int:
        row = first_row(self.writer.execute(f"SELECT max(id) FROM {quote(name)}"))
        return -1 if row is None or row[0] is None else int(row[0])

    def iter_vectors(self, rec: CollectionRecord, chunk_rows: int | None = None
                     ) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """Every stored (ids, vectors) in chunks of rowid ranges (about 32 MB each)."""
        if chunk_rows is None:
            chunk_rows = max(1024, (32 << 20) // (4 * rec.dim))
        cur = self.writer
        row = first_row(cur.execute(f"SELECT max(rowid) FROM {quote(rec.name)}"))
        if row is None or row[0] is None:
            return
        last = int(row[0])
        for start in range(0, last + 1, chunk_rows):
            got = cur.execute(f"SELECT id, {quote(rec.vector_column)} AS v FROM {quote(rec.name)} "
                              "WHERE rowid >= $a AND rowid < $b",
                              {"a": start, "b": start + chunk_rows}).fetchnumpy()
            if len(got["id"]) == 0:
                continue
            ids = np.asarray(got["id"], dtype=np.int64)
            vectors = np.frombuffer(b"".join(got["v"]), dtype="<f4").reshape(len(ids), rec.dim)
            yield ids, vectors

    def fetch_rows(self, cur: duckdb.DuckDBPyConnection, name: str, ids: npt.NDArray[np.int64],
                   columns: dict[str, str]) -> dict[int, dict[str, Any]]:
        """Metadata (JSON-friendly) for ids, keyed by id; absent ids are left out."""
        if len(ids) == 0:
            return {}
        projection = ", ".join(["t.id", *(f"t.{quote(c)}" for c in columns)])
        if len(ids) <= POINT_LOOKUP_MAX:
            # Point lookups through the primary-key index; ids travel as parameters.
            marks = ", ".join(f"$i{i}" for i in range(len(ids)))
            rows = cur.execute(
                f"SELECT {projection} FROM {quote(name)} t WHERE t.id IN ({marks})",
                {f"i{i}": int(v) for i, v in enumerate(ids)},
            ).fetchall()
        else:
            view = self.unique_name("ids")
            cur.register(view, {"id": np.asarray(ids, dtype=np.int64)})
            try:
                rows = cur.execute(
                    f"SELECT {projection} FROM {quote(name)} t "
                    f"WHERE t.id IN (SELECT id FROM {view})"
                ).fetchall()
            finally:
                cur.unregister(view)
        return {int(r[0]): {c: decode_json(v) if columns[c] == "JSON" else json_value(v)
                            for c, v in zip(columns, r[1:], strict=True)} for r in rows}
