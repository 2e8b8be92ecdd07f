"""Bounds on the work one statement may cause: a time limit and a memory ceiling, enforced by
interrupting DuckDB from one watchdog thread."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import duckdb

from service.errors import DotsearchError, QueryResourceLimit, QueryTimeout

log = logging.getLogger(__name__)

POLL_S = 0.02


@dataclass(frozen=True)
class SqlLimits:
    """What one SQL statement (or search filter) may use; each bound is a setting."""

    timeout_s: float = 5.0
    max_chars: int = 1_048_576
    max_tokens: int = 50_000
    max_depth: int = 200
    memory_budget: int = 1 << 30
    max_result_bytes: int = 64 << 20

    @classmethod
    def from_settings(cls, settings: Any) -> SqlLimits:
        return cls(timeout_s=settings.sql_timeout_s, max_chars=settings.sql_max_chars,
                   max_tokens=settings.sql_max_tokens, max_depth=settings.sql_max_depth,
                   memory_budget=settings.sql_memory_budget,
                   max_result_bytes=settings.sql_max_result_bytes)


def resident_bytes() -> int | None:
    """This process's resident memory (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass(eq=False)
class Watch:
    """One running statement: its deadline, its memory ceiling, the cursors it runs on."""

    limits: SqlLimits
    deadline: float
    ceiling: int | None
    cursors: list[duckdb.DuckDBPyConnection] = field(default_factory=list)
    tripped: DotsearchError | None = None

    def check(self) -> None:
        """Raise the limit error now if the statement is past its deadline (between steps)."""
        if self.tripped is None and time.monotonic() > self.deadline:
            self.tripped = self._timeout()
        if self.tripped is not None:
            raise self.tripped

    def _timeout(self) -> QueryTimeout:
        return QueryTimeout(
            f"the statement ran longer than {self.limits.timeout_s:g} s and was stopped; "
            "narrow it, add a LIMIT, or raise DOTSEARCH_SQL_TIMEOUT_S")

    def _memory(self) -> QueryResourceLimit:
        return QueryResourceLimit(
            f"the statement needed more than {self.limits.memory_budget} bytes of memory and "
            "was stopped; narrow it or raise DOTSEARCH_SQL_MEMORY_BUDGET")


class Watchdog:
    """Interrupts the DuckDB cursors of statements past their deadline or memory ceiling.

    One daemon thread polls every 20 ms while any statement runs. A statement's cursors are
    interrupted only while it is registered, so a cursor never gets an interrupt meant for
    a statement that has finished.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, limits: SqlLimits, *cursors: duckdb.DuckDBPyConnection) -> Iterator[Watch]:
        """Run the body under ``limits``; a DuckDB error caused by the interrupt becomes the
        limit's own error (query_timeout or query_resource_limit)."""
        rss = resident_bytes()
        watch = Watch(limits, time.monotonic() + limits.timeout_s,
                      None if rss is None else rss + limits.memory_budget, list(cursors))
        with self._lock:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dotsearch-watchdog",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()
        try:
            yield watch
        except Exception as exc:
            if watch.tripped is not None and exc is not watch.tripped:
                raise watch.tripped from exc
            raise
        finally:
            with self._lock:
                self._watches.discard(watch)

    @contextlib.contextmanager
    def including(self, watch: Watch, cursor: duckdb.DuckDBPyConnection) -> Iterator[None]:
        """Also interrupt ``cursor`` for ``watch``, only while inside this block (a shared
        cursor, such as the writer, is someone else's again once the block ends)."""
        with self._lock:
            watch.cursors.append(cursor)
        try:
            yield
        finally:
            with self._lock:
                watch.cursors.remove(cursor)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._watches:
                    self._wake.wait()
                now = time.monotonic()
                rss = resident_bytes() if any(w.ceiling for w in self._watches) else None
                for watch in self._watches:
                    if watch.tripped is None:
                        if now > watch.deadline:
                            watch.tripped = watch._timeout()
                        elif rss is not None and watch.ceiling is not None \
                                and rss > watch.ceiling:
                            watch.tripped = watch._memory()
                    if watch.tripped is not None:
                        for cursor in watch.cursors:
                            with contextlib.suppress(duckdb.Error):
                                cursor.interrupt()
            time.sleep(POLL_S)
