"""DuckDB as the system of record: one database file, one table per collection, a schema version."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt

from service.duck_values import (
    THUMBNAIL_COLUMN,
    blob_column,
    decode_json,
    first_row,
    json_value,
    map_duckdb_error,
    metadata_text,
    object_column,
    quote,
)
from service.errors import (
    SchemaVersionError,
    StorageError,
)

SCHEMA_VERSION = 1
DB_FILENAME = "dotsearch.duckdb"
META_TABLE = "_dotsearch_meta"
COLLECTIONS_TABLE = "_dotsearch_collections"
# Rows per chunk when writing or reading vectors: bounds the Python-side copies.
CHUNK_ROWS = 8192

RESERVED_COLUMNS = {"id", THUMBNAIL_COLUMN, "rowid"}


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


class Storage:
    """The DuckDB database: per-thread read cursors, one writer cursor, catalog tables.

    Writes go through ``writer`` only, under the caller's writer mutex; each reader
    thread gets its own cursor (a DuckDB connection to the same database).
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        memory_limit: str = "512MB",
        checkpoint_threshold: str = "256MB",
    ) -> None:
        self.data_dir = Path(data_dir)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {self.data_dir}: {exc}") from exc
        self.path = self.data_dir / DB_FILENAME
        config: dict[str, str | bool | int | float | list[str]] = {
            "memory_limit": memory_limit,
            "enable_external_access": False,
            "preserve_insertion_order": False,
            # Commits append to the WAL; checkpoints (which rewrite the data into the file)
            # are amortised over this much WAL. Compression of random float bytes costs far
            # more time at checkpoint than it saves space, so vectors are stored raw.
            "checkpoint_threshold": checkpoint_threshold,
            "force_compression": "uncompressed",
        }
        try:
            self.con = duckdb.connect(str(self.path), config=config)
        except duckdb.Error as exc:
            raise StorageError(f"cannot open {self.path}: {str(exc).splitlines()[0]}") from exc
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._cursors_lock = threading.Lock()
        self._register_counter = 0
        self.writer = self.con.cursor()
        self._init_schema()

    # -- connections -------------------------------------------------------------------

    def reader(self) -> duckdb.DuckDBPyConnection:
        """This thread's own cursor."""
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self.con.cursor()
            self._local.cursor = cur
            with self._cursors_lock:
                self._cursors.append(cur)
        return cur

    def unique_name(self, prefix: str) -> str:
        with self._cursors_lock:
            self._register_counter += 1
            return f"__{prefix}_{self._register_counter}"

    def close(self) -> None:
        with self._cursors_lock:
            for cur in self._cursors:
                with contextlib.suppress(duckdb.Error):
                    cur.close()
            self._cursors.clear()
        try:
            self.writer.close()
            self.con.close()
        except duckdb.Error:
            pass

    # -- schema ------------------------------------------------------------------------

    def _init_schema(self) -> None:
        cur = self.writer
        found_tables = cur.execute("SELECT table_name FROM duckdb_tables()").fetchall()
        tables = {row[0] for row in found_tables}
        if META_TABLE not in tables:
            cur.execute("BEGIN")
            cur.execute(f"CREATE TABLE {META_TABLE} (key VARCHAR PRIMARY KEY, value VARCHAR)")
            cur.execute(
                f"CREATE TABLE {COLLECTIONS_TABLE} (name VARCHAR PRIMARY KEY, dim INTEGER, "
                "metric VARCHAR, dtype VARCHAR, columns VARCHAR, thumbnails BOOLEAN, "
                "vector_column VARCHAR)"
            )
            cur.execute(
                f"INSERT INTO {META_TABLE} VALUES ('schema_version', $v)",
                {"v": str(SCHEMA_VERSION)},
            )
            cur.execute("COMMIT")
            return
        row = first_row(cur.execute(
            f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'"
        ))
        found = row[0] if row else None
        if found != str(SCHEMA_VERSION):
            raise SchemaVersionError(
                f"{self.path} has storage schema version {found!r}, but this dotsearch reads "
                f"version {SCHEMA_VERSION}; use a matching dotsearch release or a new "
                "data directory"
            )

    def load_records(self) -> list[CollectionRecord]:
        rows = self.writer.execute(
            f"SELECT name, dim, metric, dtype, columns, thumbnails, vector_column "
            f"FROM {COLLECTIONS_TABLE} ORDER BY name"
        ).fetchall()
        return [
            CollectionRecord(r[0], int(r[1]), r[2], r[3], json.loads(r[4]), bool(r[5]), r[6])
            for r in rows
        ]

    def create_table(self, rec: CollectionRecord) -> None:
        cols = ["id BIGINT PRIMARY KEY", f"{quote(rec.vector_column)} BLOB NOT NULL"]
        cols += [f"{quote(c)} {t}" for c, t in rec.columns.items()]
        if rec.thumbnails:
            cols.append(f"{THUMBNAIL_COLUMN} BLOB")
        cur = self.writer
        try:
            cur.execute("BEGIN")
            cur.execute(f"CREATE TABLE {quote(rec.name)} ({', '.join(cols)})")
            cur.execute(
                f"INSERT INTO {COLLECTIONS_TABLE} VALUES ($n, $d, $m, $t, $c, $th, $v)",
                {
                    "n": rec.name,
                    "d": rec.dim,
                    "m": rec.metric,
                    "t": rec.dtype,
                    "c": json.dumps(rec.columns),
                    "th": rec.thumbnails,
                    "v": rec.vector_column,
                },
            )
            cur.execute("COMMIT")
        except duckdb.Error as exc:
            self.rollback()
            raise map_duckdb_error(exc, f"create table {rec.name!r}") from exc

    def drop_table(self, name: str) -> None:
        cur = self.writer
        try:
            cur.execute("BEGIN")
            cur.execute(f"DROP TABLE IF EXISTS {quote(name)}")
            cur.execute(f"DELETE FROM {COLLECTIONS_TABLE} WHERE name = $n", {"n": name})
            cur.execute("COMMIT")
        except duckdb.Error as exc:
            self.rollback()
            raise map_duckdb_error(exc, f"drop table {name!r}") from exc

    # -- writes (caller holds the writer mutex; BEGIN here, COMMIT by commit()) ----------

    def begin(self) -> None:
        self.writer.execute("BEGIN")

    def commit(self) -> None:
        try:
            self.writer.execute("COMMIT")
        except duckdb.Error as exc:
            self.rollback()
            err = map_duckdb_error(exc, "commit")
            raise StorageError(f"the write was not stored: {err.message}") from exc

    def rollback(self) -> None:
        with contextlib.suppress(duckdb.Error):
            self.writer.execute("ROLLBACK")

    def stage_upsert(
        self,
        rec: CollectionRecord,
        ids: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32],
        metadata: Sequence[dict[str, Any]] | None,
        thumbnails: Sequence[bytes | None] | None,
        *,
        overwrite: bool = True,
    ) -> None:
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
                self.writer.unregister(view)

    # -- reads --------------------------------------------------------------------------

    def existing_ids(
        self, cur: duckdb.DuckDBPyConnection, name: str, ids: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        view = self.unique_name("ids")
        cur.register(view, {"id": ids})
        try:
            got = cur.execute(
                f"SELECT t.id FROM {quote(name)} t JOIN {view} v ON t.id = v.id"
            ).fetchnumpy()["id"]
        finally:
            cur.unregister(view)
        return np.asarray(got, dtype=np.int64)

    def max_id(self, name: str) -> int:
        row = first_row(self.writer.execute(f"SELECT max(id) FROM {quote(name)}"))
        return -1 if row is None or row[0] is None else int(row[0])

    def iter_vectors(
        self, rec: CollectionRecord, chunk_rows: int | None = None
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
            got = cur.execute(
                f"SELECT id, {quote(rec.vector_column)} AS v FROM {quote(rec.name)} "
                "WHERE rowid >= $a AND rowid < $b",
                {"a": start, "b": start + chunk_rows},
            ).fetchnumpy()
            if len(got["id"]) == 0:
                continue
            ids = np.asarray(got["id"], dtype=np.int64)
            vectors = np.frombuffer(b"".join(got["v"]), dtype="<f4").reshape(len(ids), rec.dim)
            yield ids, vectors

    def fetch_rows(
        self,
        cur: duckdb.DuckDBPyConnection,
        name: str,
        ids: npt.NDArray[np.int64],
        columns: dict[str, str],
    ) -> dict[int, dict[str, Any]]:
        """Metadata (JSON-friendly) for ids, keyed by id; absent ids are left out."""
        if len(ids) == 0:
            return {}
        projection = ", ".join(["t.id", *(f"t.{quote(c)}" for c in columns)])
        if len(ids) <= 1024:
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
        return {
            int(r[0]): {
                c: decode_json(v) if columns[c] == "JSON" else json_value(v)
                for c, v in zip(columns, r[1:], strict=True)
            }
            for r in rows
        }
