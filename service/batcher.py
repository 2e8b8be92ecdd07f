"""Merges concurrent searches on one collection into one engine call (one GEMM)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("dotsearch.batcher")

# search_fn(collection, queries (q, dim) float32, k, threshold, filter) -> q lists of hits
SearchFn = Callable[[str, npt.NDArray[np.float32], int, float | None, str | None], list[list[Any]]]
BatchKey = tuple[str, str | None, float | None, int]
MAX_TRACKED_KEYS = 4096


@dataclass
class _Request:
    queries: npt.NDArray[np.float32]
    k: int
    offset: int
    future: asyncio.Future[list[list[Any]]]


@dataclass
class _Group:
    requests: list[_Request] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class SearchBatcher:
    """Continuous batching of searches that share (collection, filter, threshold, dim).

    At most one engine call per key runs at a time. A search that finds its key idle is
    flushed at the next turn of the event loop (searches that arrived in the same turn
    merge; an idle server adds no wait). Searches that arrive while the key's call is
    running queue up, and the moment it returns they run together as the next call, so
    under load each GEMM takes everyone who waited for it (and the batch grows with the
    load) instead of many small calls fighting over the cores. ``window_s`` is how long
    an idle key waits for company before its call, while the key has concurrent traffic
    (its last call merged several searches); a lone client, whose searches come one at a
    time, never waits for company that will not come. ``max_batch`` caps the query rows
    of one call (the rest wait for the next).

    A call runs ``search_fn`` in a worker thread with k = max(k + offset) over its
    searches; each search gets its own rows, sliced to its own offset and k. If a merged
    call fails, each search is retried alone so an error reaches only the one that caused it.
    """

    def __init__(self, search_fn: SearchFn, *, window_s: float = 0.0, max_batch: int = 64,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        self.search_fn = search_fn
        self.window_s = window_s
        self.max_batch = max_batch
        self.on_batch = on_batch  # (requests, query rows) per engine call, for metrics
        self._groups: dict[BatchKey, _Group] = {}
        self._running: set[BatchKey] = set()
        self._merging: set[BatchKey] = set()  # keys whose last call merged searches

    async def search(self, collection: str, queries: npt.NDArray[np.float32], k: int, *,
                     threshold: float | None = None, filter: str | None = None,
                     offset: int = 0) -> list[list[Any]]:
        """Top-k hits for each row of ``queries`` (shape (q, dim)), merged with neighbours."""
        loop = asyncio.get_running_loop()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2:
            raise ValueError(f"queries must be 2-d (q, dim), got shape {queries.shape}")
        key: BatchKey = (collection, filter, threshold, int(queries.shape[1]))
        request = _Request(queries, k, offset, loop.create_future())
        group = self._groups.setdefault(key, _Group())
        group.requests.append(request)
        group.rows += len(queries)
        if key not in self._running:
            if group.rows >= self.max_batch:
                self._flush(key)
            elif group.timer is None:
                wait = self.window_s if key in self._merging else 0.0
                group.timer = loop.call_later(wait, self._flush, key)
        return await request.future

    def _flush(self, key: BatchKey) -> None:
        """Start the key's next engine call with up to max_batch waiting query rows."""
        group = self._groups.get(key)
        if group is None or key in self._running:
            return
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        taken: list[_Request] = []
        rows = 0
        while group.requests and (not taken or rows + len(group.requests[0].queries)
                                  <= self.max_batch):
            taken.append(group.requests.pop(0))
            rows += len(taken[-1].queries)
        group.rows -= rows
        if not group.requests:
            del self._groups[key]
        if len(taken) > 1:
            if len(self._merging) >= MAX_TRACKED_KEYS:  # many one-off filters: forget
                self._merging.clear()
            self._merging.add(key)
        else:
            self._merging.discard(key)
        self._running.add(key)
        asyncio.get_running_loop().create_task(self._run(key, taken))

    async def _run(self, key: BatchKey, requests: list[_Request]) -> None:
        try:
            await self._execute(key, requests)
        finally:
            self._running.discard(key)
            if key in self._groups:  # those who waited go next, at once
                self._flush(key)

    async def _execute(self, key: BatchKey, requests: list[_Request]) -> None:
        collection, filter_, threshold, _ = key
        queries = (requests[0].queries if len(requests) == 1
                   else np.concatenate([r.queries for r in requests]))
        k_total = max(r.k + r.offset for r in requests)
        if self.on_batch is not None:
            self.on_batch(len(requests), len(queries))
        try:
            hits = await asyncio.to_thread(self.search_fn, collection, queries, k_total,
                                           threshold, filter_)
        except Exception as exc:
            if len(requests) == 1:
                _settle(requests[0], exc=exc)
                return
            for request in requests:
                await self._execute(key, [request])
            return
        start = 0
        for request in requests:
            rows = hits[start:start + len(request.queries)]
            start += len(request.queries)
            _settle(request, result=[row[request.offset:request.offset + request.k]
                                     for row in rows])


def _settle(request: _Request, *, result: list[list[Any]] | None = None,
            exc: BaseException | None = None) -> None:
    if request.future.done():  # the client went away
        return
    if exc is not None:
        request.future.set_exception(exc)
    else:
        request.future.set_result(result or [])
