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
    """Collects searches that share (collection, filter, threshold, dim) for ``window_s``.

    While no engine call for the same key is running, a new group is flushed at the next
    turn of the event loop (an idle server adds no wait; requests that arrived in the same
    turn still merge). While one is running, a group waits ``window_s`` for company.
    When the window closes, or ``max_batch`` query rows are waiting, the group runs as one
    ``search_fn`` call in a worker thread with k = max(k + offset) over the group; each
    request gets its own rows, sliced to its own offset and k. If a merged call fails,
    each request is retried alone so that an error reaches only the request that caused it.
    """

    def __init__(self, search_fn: SearchFn, *, window_s: float = 0.001, max_batch: int = 64,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        self.search_fn = search_fn
        self.window_s = window_s
        self.max_batch = max_batch
        self.on_batch = on_batch  # (requests, query rows) per engine call, for metrics
        self._groups: dict[BatchKey, _Group] = {}
        self._running: dict[BatchKey, int] = {}

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
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
            wait = self.window_s if self._running.get(key, 0) else 0.0
            group.timer = loop.call_later(wait, self._flush, key)
        group.requests.append(request)
        group.rows += len(queries)
        if group.rows >= self.max_batch:
            self._flush(key)
        return await request.future

    def _flush(self, key: BatchKey) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        asyncio.get_running_loop().create_task(self._run(key, group.requests))

    async def _run(self, key: BatchKey, requests: list[_Request]) -> None:
        collection, filter_, threshold, _ = key
        queries = (requests[0].queries if len(requests) == 1
                   else np.concatenate([r.queries for r in requests]))
        k_total = max(r.k + r.offset for r in requests)
        if self.on_batch is not None:
            self.on_batch(len(requests), len(queries))
        self._running[key] = self._running.get(key, 0) + 1
        try:
            hits = await asyncio.to_thread(self.search_fn, collection, queries, k_total,
                                           threshold, filter_)
        except Exception as exc:
            if len(requests) == 1:
                _settle(requests[0], exc=exc)
                return
            await asyncio.gather(*(self._run(key, [r]) for r in requests))
            return
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]
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
