"""The search batcher: merging, per-request slicing, error isolation."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.batcher import SearchBatcher


class Recorder:
    """A fake engine: the 'hits' of a query row are (row's first value, rank) pairs."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, object, object]] = []
        self.threads: set[int] = set()

    def __call__(self, name, queries, k, threshold, filter_):
        self.calls.append((name, len(queries), k, threshold, filter_))
        self.threads.add(threading.get_ident())
        if np.any(queries < 0):
            raise ValueError("negative query")
        return [[(float(q[0]), rank) for rank in range(k)] for q in queries]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_merged_and_sliced():
    engine = Recorder()

    async def main():
        batcher = SearchBatcher(engine, window_s=0.01, max_batch=100)
        q = [np.full((1, 4), i, np.float32) for i in range(5)]
        results = await asyncio.gather(
            *(batcher.search("c", q[i], k=i + 1, offset=i % 2) for i in range(5)))
        return results

    results = run(main())
    assert len(engine.calls) == 1
    name, rows, k, _, _ = engine.calls[0]
    assert (name, rows, k) == ("c", 5, 5)  # k = max(k + offset) = 4 + 1 or 5 + 0
    for i, res in enumerate(results):
        assert len(res) == 1 and len(res[0]) == i + 1
        assert res[0][0] == (float(i), i % 2)  # its own row, from its own offset
    assert threading.get_ident() not in engine.threads  # ran off the event loop


def test_different_filters_thresholds_and_collections_are_separate_calls():
    engine = Recorder()

    async def main():
        batcher = SearchBatcher(engine, window_s=0.01)
        q = np.ones((1, 4), np.float32)
        await asyncio.gather(batcher.search("a", q, 2), batcher.search("a", q, 2, filter="x"),
                             batcher.search("a", q, 2, threshold=0.5), batcher.search("b", q, 2),
                             batcher.search("a", q, 3))
    run(main())
    assert len(engine.calls) == 4
    merged = [c for c in engine.calls if c[1] == 2]
    assert merged == [("a", 2, 3, None, None)]


def test_max_batch_flushes_early():
    engine = Recorder()
    seen: list[tuple[int, int]] = []

    async def main():
        batcher = SearchBatcher(engine, window_s=10.0, max_batch=3,
                                on_batch=lambda r, n: seen.append((r, n)))
        q = np.ones((1, 4), np.float32)
        return await asyncio.wait_for(asyncio.gather(*(batcher.search("a", q, 1)
                                                       for _ in range(3))), 2.0)
    assert len(run(main())) == 3
    assert seen == [(3, 3)]


def test_a_failing_query_fails_only_its_own_request():
    engine = Recorder()

    async def main():
        batcher = SearchBatcher(engine, window_s=0.01)
        good = batcher.search("a", np.ones((1, 4), np.float32), 1)
        bad = batcher.search("a", -np.ones((1, 4), np.float32), 1)
        return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = run(main())
    assert good == [[(1.0, 0)]]
    assert isinstance(bad, ValueError)


def test_multi_row_requests_keep_their_rows():
    engine = Recorder()

    async def main():
        batcher = SearchBatcher(engine, window_s=0.01)
        a = np.array([[1, 0], [2, 0]], np.float32)
        b = np.array([[3, 0]], np.float32)
        return await asyncio.gather(batcher.search("c", a, 1), batcher.search("c", b, 1))

    ra, rb = run(main())
    assert [r[0][0] for r in ra] == [1.0, 2.0] and rb[0][0][0] == 3.0


def test_queries_must_be_2d():
    async def main():
        await SearchBatcher(Recorder()).search("c", np.ones(4, np.float32), 1)
    with pytest.raises(ValueError, match="2-d"):
        run(main())


def test_busy_key_queues_searches_for_one_next_call():
    import time

    calls: list[int] = []
    active: list[int] = [0]
    most_active: list[int] = [0]

    def slow_engine(name, queries, k, threshold, filter_):
        active[0] += 1
        most_active[0] = max(most_active[0], active[0])
        calls.append(len(queries))
        time.sleep(0.2)
        active[0] -= 1
        return [[(float(q[0]), 0)] for q in queries]

    async def main():
        batcher = SearchBatcher(slow_engine, window_s=0.0, max_batch=4)
        q = np.ones((1, 4), np.float32)
        start = time.perf_counter()
        first = asyncio.create_task(batcher.search("a", q, 1))
        await asyncio.sleep(0.05)  # the first call is now running in its thread
        assert calls == [1] and time.perf_counter() - start < 0.15  # it did not wait
        rest = [asyncio.create_task(batcher.search("a", q * i, 1)) for i in range(2, 8)]
        await asyncio.gather(first, *rest)
        return [r.result()[0][0][0] for r in rest]

    assert run(main()) == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    # the six that came while the engine was busy ran next, max_batch at a time, and
    # never two engine calls for one key at once
    assert calls == [1, 4, 2]
    assert most_active[0] == 1


def test_window_applies_only_while_the_key_has_concurrent_traffic():
    import time

    engine = Recorder()

    async def timed(batcher, *queries):
        start = time.perf_counter()
        await asyncio.gather(*(batcher.search("a", q, 1) for q in queries))
        return time.perf_counter() - start

    async def main():
        batcher = SearchBatcher(engine, window_s=0.3)
        q = np.ones((1, 4), np.float32)
        lone = await timed(batcher, q)  # a lone client never waits for company
        merged = await timed(batcher, q, q * 2)  # still no history: same turn, one call
        after_merge = await timed(batcher, q)  # concurrent traffic seen: waits the window
        lone_again = await timed(batcher, q)  # the last call was alone: no wait again
        return lone, merged, after_merge, lone_again

    lone, merged, after_merge, lone_again = run(main())
    assert lone < 0.2 and merged < 0.2 and lone_again < 0.2
    assert after_merge >= 0.25
    assert [c[1] for c in engine.calls] == [1, 2, 1, 1]
