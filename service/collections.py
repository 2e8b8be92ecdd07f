"""The catalog: durable collections (DuckDB rows) mirrored by in-memory vector indexes."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import numpy.typing as npt

from service.catalog_values import CollectionInfo, Hit, QueryResult, as_id_array, as_vectors
from service.duck_values import canonical_type, check_name, first_row, map_duckdb_error
from service.errors import Conflict, DotsearchError, InvalidInput, NotFound, NotReady
from service.index_protocol import VectorIndex
from service.limits import SqlLimits, Watchdog
from service.rwlock import RWLock
from service.storage import META_TABLE, RESERVED_COLUMNS, CollectionRecord, Storage

log = logging.getLogger(__name__)

METRICS = ("dot", "cosine", "l2")
DTYPES = ("float32", "float16")
MAX_DIM = 65536
MAX_ID = 2**63 - 1
MAX_SEARCH_HITS = 1_000_000  # query rows x results of one search (its answer's size)


# A read that saw a write land mid-way retries; the last try holds the read lock throughout.
SNAPSHOT_ATTEMPTS = 3


class StaleSnapshot(Exception):
    """A write changed the indexes after this read's DuckDB snapshot was taken: retry."""


@dataclass
class ReadSnapshot:
    """A pinned DuckDB read transaction and the index generation it matches."""

    cursor: duckdb.DuckDBPyConnection
    generation: int
    holds_lock: bool


@dataclass
class Collection:
    """A collection's durable record, its index, and the next id handed out."""

    record: CollectionRecord
    index: VectorIndex
    next_id: int = 0


def _prefetched(chunks: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Read the next chunk from DuckDB in a thread while the caller indexes this one."""
    pending: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for chunk in chunks:
                pending.put(chunk)
            pending.put(done)
        except BaseException as exc:
            pending.put(exc)

    thread = threading.Thread(target=produce, name="dotsearch-reload", daemon=True)
    thread.start()
    while True:
        item = pending.get()
        if item is done:
            break
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


class Catalog:
    """Every collection of one data directory; thread safe (readers-writer discipline).

    Writes: validate -> commit in DuckDB -> apply to the index -> return. The DuckDB
    commit and the index update happen under the exclusive lock, so a reader sees a
    batch entirely or not at all, in DuckDB and in the index alike.

    Reads that run user SQL (statements, search filters) do not hold the shared lock while
    DuckDB works: they pin a DuckDB snapshot together with the index generation, and take
    the lock only around index searches, where a changed generation means "retry". So a
    slow statement never makes a write, or the searches queued behind it, wait.
    """

    def __init__(
        self,
        data_dir: Path | str,
        backend: str = "auto",
        *,
        duckdb_memory_limit: str = "512MB",
        sql_limits: SqlLimits | None = None,
    ) -> None:
        self.backend = backend
        self.sql_limits = sql_limits or SqlLimits()
        self.watchdog = Watchdog()
        self._storage = Storage(data_dir, memory_limit=duckdb_memory_limit)
        self._generation = 0  # bumped by every write that changes an index
        self._local = threading.local()
        self._lock = RWLock()
        self._writer_mutex = threading.RLock()
        self._id_lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self.backend_name = "cpu"
        try:
            from service.sql.functions import register_functions

            self._storage.on_open(register_functions)
            self._load()
        except BaseException:
            self._storage.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------

    def _make_index(self, rec: CollectionRecord) -> VectorIndex:
        from service.backend import make_index

        index = make_index(rec.dim, rec.metric, rec.dtype, backend=self.backend)
        self.backend_name = "gpu" if "gpu" in type(index).__module__ else "cpu"
        return index

    def _load(self) -> None:
        records = self._storage.load_records()
        if not records:
            self._make_index(CollectionRecord("probe", 1, "dot", "float32"))
        for rec in records:
            index = self._make_index(rec)
            for ids, vectors in _prefetched(self._storage.iter_vectors(rec)):
                index.add(ids, vectors)
            next_id = self._storage.max_id(rec.name) + 1
            self._collections[rec.name] = Collection(rec, index, next_id)
            log.info("loaded collection %s: %d vectors", rec.name, len(index))

    def close(self) -> None:
        with self._writer_mutex, self._lock.write():
            self._storage.close()
            self._collections.clear()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------

    def _get(self, name: str) -> Collection:
        coll = self._collections.get(name) if isinstance(name, str) else None
        if coll is None:
            raise NotFound(f"no collection named {name!r}")
        return coll

    def _info(self, coll: Collection) -> CollectionInfo:
        rec = coll.record
        return CollectionInfo(
            rec.name,
            rec.dim,
            rec.metric,
            rec.dtype,
            dict(rec.columns),
            len(coll.index),
            rec.thumbnails,
            rec.vector_column,
        )

    def reader(self) -> duckdb.DuckDBPyConnection:
        """This thread's DuckDB cursor (call under ``read_lock``)."""
        return self._storage.reader()

    @contextmanager
    def read_lock(self) -> Iterator[None]:
        with self._lock.read():
            yield

    @contextmanager
    def snapshot(self, *, hold_lock: bool = False) -> Iterator[ReadSnapshot]:
        """This thread's cursor in a read transaction pinned to the current indexes.

        Without ``hold_lock`` the shared lock is held only while pinning; index reads then
        go through ``index_access``. A nested call reuses the open snapshot.
        """
        current: ReadSnapshot | None = getattr(self._local, "snapshot", None)
        if current is not None:
            yield current
            return
        cur = self._storage.reader()
        with ExitStack() as stack:
            stack.enter_context(self._lock.read())
            with suppress(duckdb.Error):
                cur.execute("ROLLBACK")  # a transaction left open by an interrupted read
            cur.execute("BEGIN TRANSACTION")
            # DuckDB fixes a transaction's snapshot at its first read, so read now.
            cur.execute(f"SELECT 1 FROM {META_TABLE} LIMIT 0").fetchall()
            snap = ReadSnapshot(cur, self._generation, hold_lock)
            if not hold_lock:
                stack.close()
            self._local.snapshot = snap
            try:
                yield snap
            finally:
                self._local.snapshot = None
                with suppress(duckdb.Error):
                    cur.execute("ROLLBACK")

    def index_access(self, snap: ReadSnapshot | None) -> Any:
        """A context for reading indexes under ``snap``: the shared lock, and StaleSnapshot
        when a write has changed them since the snapshot was pinned."""
        if snap is None or snap.holds_lock:
            return nullcontext()
        return self._checked_read(snap.generation)

    @contextmanager
    def _checked_read(self, generation: int) -> Iterator[None]:
        with self._lock.read():
            if self._generation != generation:
                raise StaleSnapshot()
            yield

    # -- collections -------------------------------------------------------------------

    def list_collections(self) -> list[CollectionInfo]:
        with self._lock.read():
            return [self._info(c) for _, c in sorted(self._collections.items())]

    def get_collection(self, name: str) -> CollectionInfo:
        with self._lock.read():
            return self._info(self._get(name))

    def create_collection(
        self,
        name: str,
        dim: int,
        metric: str = "cosine",
        dtype: str = "float32",
        columns: dict[str, str] | None = None,
        *,
        thumbnails: bool = False,
        vector_column: str = "feature",
    ) -> CollectionInfo:
        check_name("collection", name)
        if name.lower().startswith("_dotsearch") or name.lower().startswith("duckdb"):
            raise InvalidInput(f"collection name {name!r} is reserved")
        check_name("column", vector_column)
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or not 0 < dim <= MAX_DIM:
            raise InvalidInput(f"dim must be an integer in 1..{MAX_DIM}, got {dim!r}")
        if metric not in METRICS:
            raise InvalidInput(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if dtype not in DTYPES:
            raise InvalidInput(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        canon: dict[str, str] = {}
        for col, sql_type in (columns or {}).items():
            check_name("column", col)
            lowered = {c.lower() for c in canon}
            if col.lower() in RESERVED_COLUMNS or col.lower() == vector_column.lower():
                raise InvalidInput(f"column name {col!r} is reserved")
            if col.lower() in lowered:
                raise InvalidInput(f"column {col!r} given twice")
            canon[col] = canonical_type(col, sql_type)
        rec = CollectionRecord(
            name, int(dim), metric, dtype, canon, bool(thumbnails), vector_column
        )
        with self._writer_mutex:
            if any(n.lower() == name.lower() for n in self._collections):
                raise Conflict(f"collection {name!r} already exists")
            index = self._make_index(rec)
            with self._lock.write():
                self._generation += 1
                self._storage.create_table(rec)
                coll = Collection(rec, index, 0)
                self._collections[name] = coll
                return self._info(coll)

    def drop_collection(self, name: str) -> None:
        with self._writer_mutex:
            self._get(name)
            with self._lock.write():
                self._generation += 1
                self._storage.drop_table(name)
                del self._collections[name]

    # -- writes ------------------------------------------------------------------------

    def upsert(
        self,
        name: str,
        ids: Any,
        vectors: Any,
        metadata: Sequence[dict[str, Any]] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        *,
        replace: bool = True,
    ) -> int:
        """Insert or replace a batch atomically; returns how many rows were written.

        With ``replace=False`` (SQL ``INSERT``) an id already stored is a Conflict.
        """
        with self._writer_mutex:
            coll = self._get(name)
            rec = coll.record
            id_arr = as_id_array(ids)
            if id_arr.size == 0:
                raise InvalidInput("an upsert needs at least one vector")
            vec_arr = as_vectors(vectors, rec.dim, len(id_arr))
            if metadata is not None:
                if not isinstance(metadata, Sequence) or len(metadata) != len(id_arr):
                    raise InvalidInput(f"metadata must be a list of {len(id_arr)} objects")
                for row in metadata:
                    if not isinstance(row, dict):
                        raise InvalidInput("each metadata entry must be an object")
                    unknown = set(row) - set(rec.columns)
                    if unknown:
                        raise InvalidInput(
                            f"unknown metadata columns {sorted(unknown)}; collection {name!r} "
                            f"has {sorted(rec.columns)}"
                        )
            if thumbnails is not None:
                if not rec.thumbnails:
                    raise InvalidInput(f"collection {name!r} does not keep thumbnails")
                if len(thumbnails) != len(id_arr):
                    raise InvalidInput(f"thumbnails must be a list of {len(id_arr)} entries")
            if rec.metric == "cosine":
                norms = np.linalg.norm(vec_arr.astype(np.float64), axis=1)
                if np.any(norms == 0):
                    raise InvalidInput("a zero vector cannot be stored under the cosine metric")
                vec_arr = (vec_arr / norms[:, None]).astype(np.float32)
            # Last duplicate wins, as in the index.
            _, last_pos = np.unique(id_arr[::-1], return_index=True)
            keep = np.sort(len(id_arr) - 1 - last_pos)
            if len(keep) != len(id_arr):
                id_arr, vec_arr = id_arr[keep], vec_arr[keep]
                if metadata is not None:
                    metadata = [metadata[i] for i in keep]
                if thumbnails is not None:
                    thumbnails = [thumbnails[i] for i in keep]
            if not replace:
                present = self._storage.existing_ids(self._storage.writer, name, id_arr)
                if len(present):
                    raise Conflict(
                        f"ids already present in {name!r}: {present[:10].tolist()}"
                    )
            # The index mirrors storage: when no id is stored yet, a plain INSERT does
            # (DuckDB's INSERT OR REPLACE costs about 2.5x as much per row).
            overwrite = replace and any(i in coll.index for i in id_arr.tolist())
            self._storage.begin()
            try:
                self._storage.stage_upsert(rec, id_arr, vec_arr, metadata, thumbnails,
                                           overwrite=overwrite)
            except DotsearchError:
                self._storage.rollback()
                raise
            except duckdb.Error as exc:
                self._storage.rollback()
                raise map_duckdb_error(exc, f"upsert into {name!r}") from exc
            with self._lock.write():
                self._generation += 1
                self._storage.commit()
                self._apply(coll, lambda: coll.index.add(id_arr, vec_arr))
            with self._id_lock:
                coll.next_id = max(coll.next_id, int(id_arr.max()) + 1)
            return len(id_arr)

    def _apply(self, coll: Collection, change: Any) -> None:
        try:
            change()
        except (ValueError, TypeError, MemoryError) as exc:
            log.exception("index of %s out of sync with storage", coll.record.name)
            raise NotReady(
                f"the batch was stored but the index of {coll.record.name!r} could not apply "
                f"it ({exc}); restart the service to rebuild the index from storage"
            ) from exc

    def delete(self, name: str, ids: Any) -> int:
        """Delete ids (unknown ids ignored); returns how many were present."""
        with self._writer_mutex:
            coll = self._get(name)
            id_arr = np.unique(as_id_array(ids))
            if id_arr.size == 0:
                return 0
            self._storage.begin()
            try:
                self._storage.stage_delete(name, id_arr)
            except duckdb.Error as exc:
                self._storage.rollback()
                raise map_duckdb_error(exc, f"delete from {name!r}") from exc
            removed = 0
            with self._lock.write():
                self._generation += 1
                self._storage.commit()

                def remove() -> None:
                    nonlocal removed
                    removed = coll.index.remove(id_arr)

                self._apply(coll, remove)
            return removed

    def next_ids(self, name: str, n: int) -> npt.NDArray[np.int64]:
        """n fresh ids (never handed out before in this process, above every stored id)."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise InvalidInput(f"n must be a non-negative integer, got {n!r}")
        with self._lock.read():
            coll = self._get(name)
        with self._id_lock:
            start = coll.next_id
            if start + int(n) - 1 > MAX_ID:
                raise InvalidInput(f"{n} more ids would pass the largest id, {MAX_ID}; give "
                                   "ids explicitly")
            coll.next_id += int(n)
        return np.arange(start, start + int(n), dtype=np.int64)

    # -- reads -------------------------------------------------------------------------

    def get_vector(self, name: str, id: int) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
        """The stored vector (float32, as written; unit length under cosine) and metadata."""
        from service.duck_values import quote

        key = int(as_id_array([id])[0])
        with self._lock.read():
            rec = self._get(name).record
            cur = self._storage.reader()
            cols = ", ".join([quote(rec.vector_column), *(quote(c) for c in rec.columns)])
            row = first_row(cur.execute(
                f"SELECT {cols} FROM {quote(name)} WHERE id = $id", {"id": key}
            ))
            if row is None:
                raise NotFound(f"no id {key} in collection {name!r}")
            meta = self._storage.fetch_rows(cur, name, np.array([key]), rec.columns)[key]
        return np.frombuffer(row[0], dtype="<f4").astype(np.float32), meta

    def get_thumbnail(self, name: str, id: int) -> bytes | None:
        from service.duck_values import THUMBNAIL_COLUMN, quote

        key = int(as_id_array([id])[0])
        with self._lock.read():
            rec = self._get(name).record
            if not rec.thumbnails:
                return None
            row = first_row(self._storage.reader().execute(
                f"SELECT {THUMBNAIL_COLUMN} FROM {quote(name)} WHERE id = $id", {"id": key}
            ))
        if row is None:
            raise NotFound(f"no id {key} in collection {name!r}")
        return None if row[0] is None else bytes(row[0])

    def allow_ids(self, name: str, filter: str) -> npt.NDArray[np.int64]:
        """Ids whose metadata satisfies the SQL boolean expression (call in a snapshot or
        under the read lock), within the SQL limits."""
        from service.sql.filters import filter_ids

        with self.watchdog.watch(self.sql_limits, self._storage.reader()):
            return filter_ids(self, self._get(name).record, filter)

    def search(
        self,
        name: str,
        queries: Any,
        k: int,
        *,
        threshold: float | None = None,
        filter: str | None = None,
        offset: int = 0,
    ) -> list[list[Hit]]:
        """Top-k per query, best first, ties by id; ``filter`` pre-filters exactly.

        The work is bounded by the collection's size whatever ``k + offset`` asks for.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise InvalidInput(f"k must be a positive integer, got {k!r}")
        if isinstance(offset, bool) or not isinstance(offset, int | np.integer) or offset < 0:
            raise InvalidInput(f"offset must be a non-negative integer, got {offset!r}")
        if threshold is not None and (
            isinstance(threshold, bool) or not np.isfinite(float(threshold))
        ):
            raise InvalidInput(f"threshold must be a finite number, got {threshold!r}")
        if filter is None or not str(filter).strip():
            with self._lock.read():
                return self._search(name, queries, int(k), int(offset), threshold, None,
                                    self._storage.reader())
        # A filter is user SQL: it runs in a snapshot, outside the lock (see the class doc).
        for attempt in range(SNAPSHOT_ATTEMPTS):
            with self.snapshot(hold_lock=attempt == SNAPSHOT_ATTEMPTS - 1) as snap:
                try:
                    return self._search(name, queries, int(k), int(offset), threshold,
                                        filter, snap.cursor, snap)
                except StaleSnapshot:
                    continue
        raise AssertionError("unreachable: the last attempt holds the lock")

    def _search(self, name: str, queries: Any, k: int, offset: int, threshold: float | None,
                filter: str | None, cur: duckdb.DuckDBPyConnection,
                snap: ReadSnapshot | None = None) -> list[list[Hit]]:
        coll = self._get(name)
        q = as_vectors(queries, coll.record.dim)
        if q.shape[0] == 0:
            raise InvalidInput("at least one query vector is needed")
        allow = None if filter is None else self.allow_ids(name, filter)
        with self.index_access(snap):
            rows = len(coll.index) if allow is None else min(len(allow), len(coll.index))
            if rows == 0 or offset >= rows:
                return [[] for _ in range(q.shape[0])]
            if q.shape[0] * min(k + offset, rows) > MAX_SEARCH_HITS:
                raise InvalidInput(
                    f"{q.shape[0]} queries x {min(k + offset, rows)} results is more than "
                    f"{MAX_SEARCH_HITS} hits in one search; send fewer queries or a smaller k")
            try:
                scores, ids = coll.index.search(
                    q, min(k + offset, rows), threshold=threshold, allow=allow
                )
            except (ValueError, TypeError) as exc:
                raise InvalidInput(str(exc)) from exc
        ids, scores = ids[:, offset:], scores[:, offset:]
        meta: dict[int, dict[str, Any]] = {}
        if coll.record.columns:  # no metadata columns: no DuckDB round trip
            found = np.unique(ids[ids >= 0])
            meta = self._storage.fetch_rows(cur, name, found, coll.record.columns)
        out: list[list[Hit]] = []
        for row_ids, row_scores in zip(ids, scores, strict=True):
            out.append(
                [
                    Hit(int(i), float(s), meta.get(int(i), {}))
                    for i, s in zip(row_ids, row_scores, strict=True)
                    if i >= 0
                ]
            )
        return out

    def query(self, sql: str, params: dict[str, Any] | list[Any] | None = None, *,
              access: Literal["read", "write"] = "write") -> QueryResult:
        """Run a SQL script (statements separated by ';'); the last statement's result.

        ``access="read"`` (the read-only key) refuses the script, before any statement
        runs, unless every parsed statement only reads.
        """
        from service.sql.executor import execute_script

        return execute_script(self, sql, params, access=access)
