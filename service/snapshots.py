"""How a catalog's reads and writes are ordered: DuckDB commits with no lock held, index
changes under a short exclusive lock, reads that match a DuckDB snapshot to the indexes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any

import duckdb

from service.rwlock import RWLock
from service.storage import Storage

# A read that saw a write land mid-way retries; the last try excludes writers throughout.
SNAPSHOT_ATTEMPTS = 3
# How long a reader whose snapshot already holds a commit waits for its index change.
APPLY_WAIT_S = 2.0


class StaleSnapshot(Exception):
    """The indexes moved on since this read's DuckDB snapshot was pinned: retry."""


@dataclass
class ReadSnapshot:
    """A DuckDB read transaction pinned on this thread's cursor, and what it holds."""

    cursor: duckdb.DuckDBPyConnection
    commit_seq: int  # the last vector write the snapshot holds
    layout: int  # the collections' layout (create/drop) when it was pinned
    excludes_writers: bool


class ReadWriteOrder:
    """The locks of one catalog and the rules that use them.

    - ``writes``: one writer at a time (the write order).
    - ``indexes``: shared around index reads, exclusive while an index changes (short:
      the change is in memory; the DuckDB commit before it holds no lock).
    - ``cursors``: shared while a reader uses a DuckDB cursor, exclusive only when storage
      is reopened after a failure (which closes every cursor).
    Every vector write commits, in DuckDB, a commit sequence number; a reader's snapshot
    reads it, and an index read goes ahead only when the indexes have applied exactly that
    commit. Lock order: writes, then cursors, then indexes.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.writes = threading.RLock()
        self.indexes = RWLock()
        self.cursors = RWLock()
        self.applied_seq = storage.read_commit_seq(storage.writer)
        self.layout = 0
        self._applied = threading.Condition()
        self._local = threading.local()

    # -- writers ------------------------------------------------------------------------

    @contextmanager
    def applying(self, seq: int | None = None, *, layout: bool = False) -> Iterator[None]:
        """Change the indexes (exclusive); then they hold commit ``seq``."""
        with self.indexes.write():
            try:
                yield
            finally:  # also when the change failed: the index is out of sync (NotReady) then
                if layout:
                    self.layout += 1
                if seq is not None:
                    with self._applied:
                        self.applied_seq = seq
                        self._applied.notify_all()

    @contextmanager
    def reopen_guard(self) -> Iterator[None]:
        with self.cursors.write(), self.indexes.write():
            yield

    # -- readers ------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Indexes and cursors held shared: a short read of both, as one."""
        with self.cursors.read(), self.indexes.read():
            yield

    @contextmanager
    def snapshot(self, *, exclude_writers: bool = False) -> Iterator[ReadSnapshot]:
        """This thread's cursor in a read transaction; index reads go through
        ``index_access``. A nested call reuses the open snapshot."""
        current: ReadSnapshot | None = getattr(self._local, "snapshot", None)
        if current is not None:
            yield current
            return
        with ExitStack() as stack:
            if exclude_writers:  # before the cursors: a writer may reopen storage meanwhile
                stack.enter_context(self.writes)
            stack.enter_context(self.cursors.read())
            cur = self.storage.reader()
            with suppress(duckdb.Error):
                cur.execute("ROLLBACK")  # a transaction left open by an interrupted read
            # The layout is read before the snapshot is fixed: a create, drop or ALTER that
            # commits in between then shows as a layout change (a retry), never goes unseen.
            layout = self.layout
            cur.execute("BEGIN TRANSACTION")
            # The first read fixes the snapshot; it reads the commit sequence it holds.
            snap = ReadSnapshot(cur, self.storage.read_commit_seq(cur), layout, exclude_writers)
            self._local.snapshot = snap
            try:
                yield snap
            finally:
                self._local.snapshot = None
                with suppress(duckdb.Error):
                    cur.execute("ROLLBACK")

    def index_access(self, snap: ReadSnapshot | None) -> Any:
        """The context for reading indexes under ``snap`` (StaleSnapshot if they no longer
        match it); without a snapshot, just the shared lock."""
        if snap is None:
            return self.indexes.read()
        if snap.excludes_writers:
            return nullcontext()
        return self._matching(snap)

    @contextmanager
    def _matching(self, snap: ReadSnapshot) -> Iterator[None]:
        with self._applied:  # the snapshot may hold a commit whose index change is next
            self._applied.wait_for(lambda: self.applied_seq >= snap.commit_seq, APPLY_WAIT_S)
        with self.indexes.read():
            if self.applied_seq != snap.commit_seq or self.layout != snap.layout:
                raise StaleSnapshot()
            yield
