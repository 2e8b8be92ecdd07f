"""The collection store: durable collections (DuckDB rows) mirrored by in-memory vector
indexes, behind the typed API that the SQL layer and the routes use."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import duckdb
import numpy as np
import numpy.typing as npt

from cpu_fallback.core import IndexUnavailable
from service.backend import ClusterOptions, make_index, resolve_backend
from service.batches import new_record, prepare_rows
from service.catalog_values import ID_MAX, CollectionInfo, Hit, as_id_array, as_vectors
from service.duck_values import first_row, map_duckdb_error, quote
from service.errors import Conflict, DotsearchError, InvalidInput, NotFound, NotReady
from service.index_protocol import VectorIndex
from service.limits import SqlLimits, Watch, Watchdog
from service.shard_watch import ShardWatch
from service.snapshots import SNAPSHOT_ATTEMPTS, ReadSnapshot, ReadWriteOrder, StaleSnapshot
from service.storage import DEFAULT_MEMORY_LIMIT, CollectionRecord, Storage

log = logging.getLogger(__name__)

MAX_SEARCH_HITS = 1_000_000  # query rows x results of one search (its answer's size)


# Computes a search's allow-list (ids a filter admits) inside the search's snapshot.
AllowFn = Callable[[], npt.NDArray[np.int64]]


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


class CollectionStore:
    """Every collection of one data directory; thread safe.

    Writes (one at a time): validate -> stage in DuckDB -> COMMIT, holding no lock, with a
    commit sequence number -> apply to the index under a short exclusive lock -> return.
    Reads that use both DuckDB and an index pin a DuckDB snapshot and read the index only
    when it has applied exactly the commits the snapshot holds (``ReadWriteOrder``), so a
    reader sees a batch entirely or not at all, and nobody waits for a DuckDB commit or for
    a slow statement. It imports nothing from ``service.sql``: the SQL face is on top.
    """

    def __init__(
        self,
        data_dir: Path | str,
        backend: str = "auto",
        *,
        duckdb_memory_limit: str = DEFAULT_MEMORY_LIMIT,
        sql_limits: SqlLimits | None = None,
        engine_options: Mapping[str, int | None] | None = None,
        cluster: ClusterOptions | None = None,
    ) -> None:
        self.backend = backend
        # Decided before the database opens: a missing GPU fails first.
        self.backend_name = resolve_backend(backend)
        self.engine_options = dict(engine_options or {})
        self.cluster = cluster or ClusterOptions()
        if self.backend_name == "ray":
            from service.cluster.runtime import ensure_ray

            ensure_ray(self.cluster.address)
        self.sql_limits = sql_limits or SqlLimits()
        self.watchdog = Watchdog()
        self._storage = Storage(data_dir, memory_limit=duckdb_memory_limit,
                                reopen_guard=lambda: self._order.reopen_guard())
        self._id_lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._shard_watch = ShardWatch(self, self.cluster.check_s)
        try:
            self._order = ReadWriteOrder(self._storage)
            self._load()
        except BaseException:
            self._storage.close()
            raise
        if self.backend_name == "ray":
            self._shard_watch.start()

    def _make_index(self, rec: CollectionRecord) -> VectorIndex:
        return make_index(rec.dim, rec.metric, rec.dtype, backend=self.backend_name,
                          shards=rec.shards, name=rec.name, cluster=self.cluster,
                          **self.engine_options)

    def _load(self) -> None:
        records = self._storage.load_records()
        for rec in records:
            index = self._make_index(rec)
            for ids, vectors in _prefetched(self._storage.iter_vectors(rec)):
                index.add(ids, vectors)
            next_id = self._storage.max_id(rec.name) + 1
            self._collections[rec.name] = Collection(rec, index, next_id)
            log.info("loaded collection %s: %d vectors", rec.name, len(index))

    def close(self) -> None:
        self._shard_watch.stop()
        with self._order.writes, self._order.indexes.write():
            self._storage.close()
            for coll in self._collections.values():
                coll.index.close()  # a sharded index lets its actors go
            self._collections.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the typed API of names, records and reads --------------------------------------

    def collection(self, name: str) -> Collection:
        """The collection named exactly ``name`` (NotFound otherwise)."""
        coll = self._collections.get(name) if isinstance(name, str) else None
        if coll is None:
            raise NotFound(f"no collection named {name!r}")
        return coll

    def resolve(self, name: str) -> str | None:
        """The collection a (case-insensitive, as in SQL) table name refers to, or None."""
        if name in self._collections:
            return name
        matches = [n for n in list(self._collections) if n.lower() == name.lower()]
        return matches[0] if len(matches) == 1 else None

    def find(self, name: str) -> Collection | None:
        """The collection named exactly ``name``, or None."""
        return self._collections.get(name)

    def names(self) -> list[str]:
        return sorted(self._collections)

    def unique_name(self, prefix: str) -> str:
        """A fresh name for a view registered on a cursor."""
        return self._storage.unique_name(prefix)

    def on_storage_open(self, hook: Callable[[duckdb.DuckDBPyConnection], None]) -> None:
        """Run ``hook`` (registering SQL functions) on the database now and after a reopen."""
        self._storage.on_open(hook)

    def _info(self, coll: Collection) -> CollectionInfo:
        rec = coll.record
        return CollectionInfo(rec.name, rec.dim, rec.metric, rec.dtype, dict(rec.columns),
                              len(coll.index), rec.thumbnails, rec.vector_column,
                              list(rec.column_order), rec.vector_type, rec.auto_increment,
                              rec.shards)

    def reader(self) -> duckdb.DuckDBPyConnection:
        """This thread's DuckDB cursor (use it in ``snapshot`` or ``reading``)."""
        return self._storage.reader()

    def reading(self) -> AbstractContextManager[None]:
        """Indexes and DuckDB cursors held for a short read of both."""
        return self._order.reading()

    def snapshot(self, *, exclude_writers: bool = False) -> AbstractContextManager[ReadSnapshot]:
        """This thread's cursor in a read transaction (see ``ReadWriteOrder.snapshot``)."""
        return self._order.snapshot(exclude_writers=exclude_writers)

    def index_access(self, snap: ReadSnapshot | None) -> AbstractContextManager[Any]:
        """The context for reading indexes under ``snap`` (StaleSnapshot: retry)."""
        return self._order.index_access(snap)

    def write_order(self) -> AbstractContextManager[Any]:
        """Held by a multi-step write (SQL DELETE/UPDATE): no other write in between."""
        return self._order.writes

    # -- collections -------------------------------------------------------------------

    def list_collections(self) -> list[CollectionInfo]:
        with self._order.indexes.read():
            return [self._info(c) for _, c in sorted(self._collections.items())]

    def get_collection(self, name: str) -> CollectionInfo:
        with self._order.indexes.read():
            return self._info(self.collection(name))

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
        column_order: Sequence[str] | None = None,
        vector_type: str | None = None,
        auto_increment: bool = False,
        shards: int | None = None,
    ) -> CollectionInfo:
        """A new collection; ``column_order`` (id, the vector column and the metadata
        columns, each once) is the declared order, by default that one."""
        rec = new_record(name, dim, metric, dtype, columns, thumbnails, vector_column,
                         column_order=column_order, vector_type=vector_type,
                         auto_increment=auto_increment, shards=shards)
        with self._order.writes:
            if any(n.lower() == name.lower() for n in self._collections):
                raise Conflict(f"collection {name!r} already exists")
            index = self._make_index(rec)
            self._storage.create_table(rec)  # commits: no lock held
            coll = Collection(rec, index, 0)
            with self._order.applying(layout=True):
                self._collections[name] = coll
            return self._info(coll)

    def drop_collection(self, name: str) -> None:
        with self._order.writes:
            coll = self.collection(name)
            with self._order.applying(layout=True):
                del self._collections[name]
            self._storage.drop_table(name)  # commits: no lock held
            coll.index.close()

    # -- shards (the ray backend) ----------------------------------------------------------

    def _writable(self, coll: Collection) -> None:
        """NotReady, before anything is stored, when a shard of the collection is down or
        rebuilding: a write goes to storage and then to every owning shard, or nowhere. The
        shards are asked now (one round), not as last seen: a shard that died since the
        last answer is found here, before the commit, and the write changes nothing."""
        try:
            coll.index.refresh()
            coll.index.check_ready()
        except IndexUnavailable as exc:
            raise NotReady(f"{exc}; writes to {coll.record.name!r} are refused until it is "
                           "back (nothing was changed)") from exc

    def shard_states(self) -> list[tuple[str, dict[str, Any]]]:
        """(collection, state) for every shard (the ray backend; none for one process):
        its number, state, node, device, rows, bytes and latest answer time."""
        return [(name, state) for name, coll in sorted(self._collections.items())
                for state in coll.index.shard_states()]

    def stale_shards(self) -> list[tuple[str, int]]:
        """(collection, shard) for every shard that restarted and must be reloaded."""
        out: list[tuple[str, int]] = []
        for name, coll in list(self._collections.items()):
            out.extend((name, shard) for shard in coll.index.refresh())
        return out

    def reload_shard(self, name: str, shard: int) -> int:
        """Stream one shard's partition back from storage (writes to the collection wait;
        its searches answer 503 meanwhile); returns the rows loaded."""
        with self._order.writes:
            coll = self._collections.get(name)
            if coll is None:
                return 0  # dropped or renamed meanwhile; a later check finds it again
            return coll.index.reload_shard(shard, self._storage.iter_vectors(coll.record))

    # -- schema changes (SQL ALTER TABLE; names exact: the SQL layer resolves case) -------

    def add_column(self, name: str, column: str, sql_type: str) -> CollectionInfo:
        """A new metadata column (NULL in every row), last in the declared order. DuckDB
        appends it to the table, after ``_thumbnail`` if any: ``column_order`` is the order."""
        with self._order.writes:
            rec = self.collection(name).record
            self._absent(rec, column)
            columns = {**rec.columns, column: sql_type}
            new = self._altered(rec, columns=columns, order=[*rec.column_order, column])
            return self._alter(name, f"ADD COLUMN {quote(column)} {new.columns[column]}", new)

    def drop_column(self, name: str, column: str) -> CollectionInfo:
        """Drop a metadata column and its values."""
        with self._order.writes:
            rec = self.collection(name).record
            if column == "id":
                raise InvalidInput("the id column cannot be dropped")
            if column == rec.vector_column:
                raise InvalidInput(f"the vector column {column!r} cannot be dropped")
            self._present(rec, column)
            columns = {c: t for c, t in rec.columns.items() if c != column}
            new = self._altered(rec, columns=columns,
                                order=[c for c in rec.column_order if c != column])
            return self._alter(name, f"DROP COLUMN {quote(column)}", new)

    def rename_column(self, name: str, old: str, new: str) -> CollectionInfo:
        """Rename a metadata column or the vector column; it keeps its place."""
        with self._order.writes:
            rec = self.collection(name).record
            if old == "id":
                raise InvalidInput("the id column cannot be renamed")
            self._present(rec, old)
            if not (isinstance(new, str) and new != old and new.lower() == old.lower()):
                self._absent(rec, new)  # a change of case alone clashes with nothing
            columns = {new if c == old else c: t for c, t in rec.columns.items()}
            vector = new if old == rec.vector_column else rec.vector_column
            altered = self._altered(rec, columns=columns, vector_column=vector,
                                    order=[new if c == old else c for c in rec.column_order])
            return self._alter(name, f"RENAME COLUMN {quote(old)} TO {quote(new)}", altered)

    def rename_collection(self, old: str, new: str) -> CollectionInfo:
        """Rename a collection; its index stays as it is (nothing is reloaded)."""
        with self._order.writes:
            renamed = self._altered(self.collection(old).record, name=new)
            if new == old or any(n.lower() == new.lower() for n in self._collections
                                 if n != old):
                raise Conflict(f"collection {new!r} already exists")
            return self._alter(old, f"RENAME TO {quote(new)}", renamed)

    @staticmethod
    def _present(rec: CollectionRecord, column: str) -> None:
        if column not in rec.column_order:
            raise NotFound(f"collection {rec.name!r} has no column {column!r} (it has "
                           f"{', '.join(rec.column_order)})")

    @staticmethod
    def _absent(rec: CollectionRecord, column: str) -> None:
        lowered = {c.lower(): c for c in rec.column_order}
        if isinstance(column, str) and column.lower() in lowered:
            raise Conflict(f"collection {rec.name!r} already has a column "
                           f"{lowered[column.lower()]!r}")

    @staticmethod
    def _altered(rec: CollectionRecord, *, name: str | None = None,
                 columns: dict[str, str] | None = None, vector_column: str | None = None,
                 order: list[str] | None = None) -> CollectionRecord:
        """``rec`` changed, checked by the rules of a new collection."""
        return new_record(rec.name if name is None else name, rec.dim, rec.metric, rec.dtype,
                          rec.columns if columns is None else columns, rec.thumbnails,
                          rec.vector_column if vector_column is None else vector_column,
                          column_order=rec.column_order if order is None else order,
                          vector_type=rec.vector_type, auto_increment=rec.auto_increment,
                          shards=rec.shards)

    def _alter(self, name: str, change: str, rec: CollectionRecord) -> CollectionInfo:
        """``ALTER TABLE name change`` and the new record in one transaction. Its commit and
        the swap of the in-memory record happen as one step for readers (under the exclusive
        index lock), so none sees a record that does not match the table; a failed commit is
        handled (storage may be reopened) once that lock is let go. Call holding ``writes``."""
        coll = self.collection(name)
        self._storage.stage_alter(name, change, rec)
        with self._order.applying(layout=True):
            failure = self._storage.try_commit()
            if failure is None:
                coll.record = rec
                if rec.name != name:
                    del self._collections[name]
                    self._collections[rec.name] = coll
        if failure is not None:
            raise self._storage.failed(failure, f"altering {name!r} was not stored") from failure
        log.info("altered collection %s: %s", name, change)
        return self.get_collection(rec.name)

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
        with self._order.writes:
            coll = self.collection(name)
            rec = coll.record
            id_arr, vec_arr, metadata, thumbnails = prepare_rows(rec, ids, vectors, metadata,
                                                                 thumbnails)
            self._writable(coll)
            if not replace:
                present = self._storage.existing_ids(self._storage.writer, name, id_arr)
                if len(present):
                    raise Conflict(
                        f"ids already present in {name!r}: {present[:10].tolist()}"
                    )
            # The index mirrors storage: when no id is stored yet, a plain INSERT does
            # (DuckDB's INSERT OR REPLACE costs about 2.5x as much per row).
            overwrite = replace and coll.index.holds_any(id_arr)
            seq = self._order.applied_seq + 1
            self._storage.begin()
            try:
                self._storage.stage_upsert(rec, id_arr, vec_arr, metadata, thumbnails,
                                           overwrite=overwrite)
                self._storage.stage_commit_seq(seq)
            except DotsearchError:
                self._storage.rollback()
                raise
            except duckdb.Error as exc:
                self._storage.rollback()
                raise map_duckdb_error(exc, f"upsert into {name!r}") from exc
            self._storage.commit()  # no lock held: searches go on meanwhile
            with self._order.applying(seq):
                self._apply(coll, lambda: coll.index.add(id_arr, vec_arr, prepared=True))
            with self._id_lock:
                coll.next_id = max(coll.next_id, int(id_arr.max()) + 1)
            return len(id_arr)

    def _apply(self, coll: Collection, change: Any) -> None:
        try:
            change()
        except IndexUnavailable as exc:
            log.warning("index of %s missed a stored batch: %s", coll.record.name, exc)
            raise NotReady(f"the batch was stored, but {exc}; the shard holds it once it is "
                           "rebuilt from storage") from exc
        except (ValueError, TypeError, MemoryError) as exc:
            log.exception("index of %s out of sync with storage", coll.record.name)
            raise NotReady(
                f"the batch was stored but the index of {coll.record.name!r} could not apply "
                f"it ({exc}); restart the service to rebuild the index from storage"
            ) from exc

    def delete(self, name: str, ids: Any) -> int:
        """Delete ids (unknown ids ignored); returns how many were present."""
        with self._order.writes:
            coll = self.collection(name)
            id_arr = np.unique(as_id_array(ids))
            if id_arr.size == 0:
                return 0
            self._writable(coll)
            seq = self._order.applied_seq + 1
            self._storage.begin()
            try:
                self._storage.stage_delete(name, id_arr)
                self._storage.stage_commit_seq(seq)
            except duckdb.Error as exc:
                self._storage.rollback()
                raise map_duckdb_error(exc, f"delete from {name!r}") from exc
            removed = 0
            self._storage.commit()  # no lock held
            with self._order.applying(seq):

                def remove() -> None:
                    nonlocal removed
                    removed = coll.index.remove(id_arr)

                self._apply(coll, remove)
            return removed

    def next_ids(self, name: str, n: int) -> npt.NDArray[np.int64]:
        """n fresh ids (never handed out before in this process, above every stored id)."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise InvalidInput(f"n must be a non-negative integer, got {n!r}")
        coll = self.collection(name)
        with self._id_lock:
            start = coll.next_id
            if start + int(n) - 1 > ID_MAX:
                raise InvalidInput(f"{n} more ids would pass the largest id, {ID_MAX}; give "
                                   "ids explicitly")
            coll.next_id += int(n)
        return np.arange(start, start + int(n), dtype=np.int64)

    # -- reads -------------------------------------------------------------------------

    def get_vector(self, name: str, id: int) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
        """The stored vector (float32, as written; unit length under cosine) and metadata."""
        key = int(as_id_array([id])[0])
        with self.reading():
            rec = self.collection(name).record
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
        from service.duck_values import THUMBNAIL_COLUMN

        key = int(as_id_array([id])[0])
        with self.reading():
            rec = self.collection(name).record
            if not rec.thumbnails:
                return None
            row = first_row(self._storage.reader().execute(
                f"SELECT {THUMBNAIL_COLUMN} FROM {quote(name)} WHERE id = $id", {"id": key}
            ))
        if row is None:
            raise NotFound(f"no id {key} in collection {name!r}")
        return None if row[0] is None else bytes(row[0])

    def search(
        self,
        name: str,
        queries: Any,
        k: int,
        *,
        threshold: float | None = None,
        offset: int = 0,
        allow: AllowFn | None = None,
    ) -> list[list[Hit]]:
        """Top-k per query, best first, ties by id; ``allow`` (the ids a filter admits,
        computed in the search's snapshot under the SQL limits) pre-filters exactly.

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
        coll = self.collection(name)
        if allow is None and not coll.record.columns:  # the index alone answers
            return self._search(coll, queries, int(k), int(offset), threshold, None, None)
        for attempt in range(SNAPSHOT_ATTEMPTS):
            with self.snapshot(exclude_writers=attempt == SNAPSHOT_ATTEMPTS - 1) as snap:
                try:
                    return self._search(coll, queries, int(k), int(offset), threshold, allow,
                                        snap)
                except StaleSnapshot:
                    continue
        raise AssertionError("unreachable: the last attempt excludes writers")

    def _search(self, coll: Collection, queries: Any, k: int, offset: int,
                threshold: float | None, allow_fn: AllowFn | None,
                snap: ReadSnapshot | None) -> list[list[Hit]]:
        q = as_vectors(queries, coll.record.dim)
        if q.shape[0] == 0:
            raise InvalidInput("at least one query vector is needed")
        allow = None
        if allow_fn is not None:
            with self.watchdog.watch(self.sql_limits, self.reader()):
                allow = allow_fn()
        with self.index_access(snap):
            rec = coll.record  # as of the snapshot (an ALTER swaps it under the index lock)
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
        if rec.columns and snap is not None:
            found = np.unique(ids[ids >= 0])
            meta = self._storage.fetch_rows(snap.cursor, rec.name, found, rec.columns)
        return [[Hit(int(i), float(s), meta.get(int(i), {}))
                 for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
                for row_ids, row_scores in zip(ids, scores, strict=True)]

    # -- metadata updates (SQL UPDATE) -------------------------------------------------

    def update_metadata(self, name: str, ids: npt.NDArray[np.int64], set_sql: str,
                        values: dict[str, Any], watch: Watch | None = None) -> int:
        """``UPDATE name SET <set_sql> WHERE id IN ids`` in one transaction; how many rows
        changed. Metadata only: no index changes, so readers are never excluded (DuckDB
        commits it atomically). Call inside ``write_order``."""
        with self._order.writes:
            self.collection(name)
            writer = self._storage.writer
            view = self._storage.unique_name("ids")
            watching = (self.watchdog.including(watch, writer) if watch is not None
                        else nullcontext())
            with watching:
                writer.register(view, {"id": ids})
                try:
                    self._storage.begin()
                    row = first_row(writer.execute(
                        f"UPDATE {quote(name)} SET {set_sql} WHERE id IN (SELECT id FROM {view})",
                        values))
                    self._storage.commit()
                except duckdb.Error as exc:
                    self._storage.rollback()
                    raise map_duckdb_error(exc, "update failed") from exc
                except BaseException:
                    self._storage.rollback()
                    raise
                finally:
                    with suppress(duckdb.Error):
                        writer.unregister(view)
        return int(row[0]) if row else len(ids)
