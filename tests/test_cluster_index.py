"""The ray backend: routing, exact merges against one CpuIndex, and shards that die or hang."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from cpu_fallback import CpuIndex
from cpu_fallback.core import METRICS, IndexUnavailable
from service.cluster import ShardActor, ShardedIndex, shard_of_ids
from tests.index_support import RAY_OK, RAY_POOL

pytestmark = [pytest.mark.skipif(not RAY_OK, reason="ray is not installed (the `cluster` "
                                 "extra)"), pytest.mark.usefixtures("ray_cluster")]

MAGIC_QUERY = 999.0  # FaultyShard sleeps on a query starting with this value
MAGIC_ID = 424242  # and fails to add a batch holding this id
HANG_S = 3.0


class FaultyShard(ShardActor):
    """A shard that hangs on one query and runs out of memory on one id (test-only)."""

    def search(self, epoch, queries, k, threshold, allow):
        if float(np.asarray(queries)[0, 0]) == MAGIC_QUERY:
            time.sleep(HANG_S)
        return super().search(epoch, queries, k, threshold, allow)

    def add(self, epoch, ids, vectors):
        if MAGIC_ID in np.asarray(ids).tolist():
            raise MemoryError("no room for the magic id")
        return super().add(epoch, ids, vectors)


def tied_data(n: int, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Small-integer vectors (exact scores, many ties), random distinct ids, queries."""
    rng = np.random.default_rng(seed)
    vectors = rng.integers(-2, 3, (n, dim)).astype(np.float32)
    vectors[(vectors == 0).all(axis=1), 0] = 1  # no zero rows (cosine)
    ids = rng.choice(50 * n, n, replace=False).astype(np.int64)
    queries = rng.integers(-2, 3, (7, dim)).astype(np.float32) + np.float32(0.5)
    return ids, vectors, queries


def assert_same_search(got, want):
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


def assert_same_ranges(got, want):
    for name, a, b in zip(("lims", "scores", "ids", "totals"), got, want, strict=True):
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_shard_of_is_a_stable_hash():
    """splitmix64 mod shards: fixed values (the same in every process), evenly spread."""
    assert shard_of_ids(np.arange(10), 3).tolist() == [1, 2, 1, 0, 1, 2, 2, 0, 1, 1]
    counts = np.bincount(shard_of_ids(np.arange(30000), 3), minlength=3)
    assert counts.min() > 9500


def test_rows_go_only_to_their_owning_shards():
    ids, vectors, _ = tied_data(600)
    index = RAY_POOL(6, "dot", block_rows=64)
    index.add(ids, vectors)
    owner = index.shard_of(ids)
    expected = np.bincount(owner, minlength=3).tolist()
    assert [s["rows"] for s in index.shard_states()] == expected
    assert [s["vectors"] for s in index.memory_info()["shards"]] == expected
    import ray

    for i, handle in enumerate(index.handles):  # ask each actor what it holds
        held = ray.get(handle.contains.remote(1, ids))
        np.testing.assert_array_equal(held, owner == i)
    assert index.remove(ids[owner == 1]) == expected[1]
    assert [s["rows"] for s in index.shard_states()] == [expected[0], 0, expected[2]]
    assert len(index) == expected[0] + expected[2]


@pytest.mark.parametrize("metric", METRICS)
def test_answers_equal_one_cpu_index(metric):
    """Same ids in the same order, scores within 1e-5: top-k (ties, k past the size),
    threshold, allow-lists, range search with caps and totals."""
    ids, vectors, queries = tied_data(700)
    one = CpuIndex(6, metric)
    index = RAY_POOL(6, metric, block_rows=100)
    for target in (one, index):
        target.add(ids, vectors)
    assert len(index) == len(one) == 700
    for k in (1, 10, 77, 700, 1000):
        assert_same_search(index.search(queries, k), one.search(queries, k))
    limit = {"dot": 1.5, "cosine": 0.4, "l2": 3.5}[metric]
    assert_same_search(index.search(queries, 50, threshold=limit),
                       one.search(queries, 50, threshold=limit))
    rng = np.random.default_rng(1)
    for allow in (ids[:5], rng.choice(ids, 400, replace=False), [7, 10**12],
                  np.array([], np.int64), np.concatenate([ids[::9], [3, 5]])):
        assert_same_search(index.search(queries, 30, allow=allow),
                           one.search(queries, 30, allow=allow))
        assert_same_ranges(index.range_search(queries, limit, allow=allow, max_results=8),
                           one.range_search(queries, limit, allow=allow, max_results=8))
    for cap in (None, 0, 3, 10**6):
        assert_same_ranges(index.range_search(queries, limit, max_results=cap),
                           one.range_search(queries, limit, max_results=cap))
    np.testing.assert_array_equal(index.get(ids[::50]), one.get(ids[::50]))
    assert int(ids[3]) in index and 10**12 not in index and "x" not in index


def test_random_float_data_matches_one_cpu_index():
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    ids = rng.choice(10**9, 3000, replace=False).astype(np.int64)
    queries = rng.standard_normal((20, 32)).astype(np.float32)
    one, index = CpuIndex(32, "cosine"), RAY_POOL(32, "cosine", block_rows=512)
    for target in (one, index):
        target.add(ids, vectors)
    assert_same_search(index.search(queries, 25), one.search(queries, 25))
    assert_same_ranges(index.range_search(queries, 0.3, max_results=20),
                       one.range_search(queries, 0.3, max_results=20))


def test_killed_shard_answers_nothing_until_reloaded():
    import ray

    ids, vectors, queries = tied_data(900, seed=3)
    one = CpuIndex(6, "l2")
    one.add(ids, vectors)
    index = RAY_POOL(6, "l2", name="photos", block_rows=128)
    index.add(ids, vectors)
    want = one.search(queries, 40)
    ray.kill(index.handles[1], no_restart=False)
    deadline = time.monotonic() + 30
    while True:  # the kill lands a moment later: until then answers are whole, never partial
        try:
            assert_same_search(index.search(queries, 40), want)
        except IndexUnavailable as exc:
            assert "shard 1 of 'photos'" in str(exc)
            break
        assert time.monotonic() < deadline, "the killed shard kept answering"
        time.sleep(0.05)
    assert index.shard_states()[1]["state"] in ("down", "restarting")
    with pytest.raises(IndexUnavailable, match="shard 1"):
        index.range_search(queries, 3.0)
    while (stale := index.refresh()) != [1]:  # Ray restarts it: a new, empty incarnation
        assert time.monotonic() < deadline, f"no restart seen: {index.shard_states()}"
        time.sleep(0.2)
    states = index.shard_states()
    assert [s["state"] for s in states] == ["ready", "restarting", "ready"]
    with pytest.raises(IndexUnavailable, match=r"shard 1 .* restarting"):
        index.check_ready()
    with pytest.raises(IndexUnavailable, match="shard 1"):
        index.search(queries, 5)
    chunks = [(ids[i:i + 100].copy(), vectors[i:i + 100].copy()) for i in range(0, 900, 100)]
    assert index.reload_shard(stale[0], chunks) == int((index.shard_of(ids) == 1).sum())
    assert index.refresh() == [] and index.shard_states()[1]["state"] == "ready"
    index.check_ready()
    assert_same_search(index.search(queries, 40), want)
    assert_same_ranges(index.range_search(queries, 3.0, max_results=9),
                       one.range_search(queries, 3.0, max_results=9))
    assert len(index) == 900


def test_hung_shard_is_unresponsive_within_the_timeout():
    import ray

    index = ShardedIndex(4, "dot", shards=2, timeout_s=0.5, name="slow",
                         actor_class=FaultyShard)
    index.add(np.arange(50), np.ones((50, 4), np.float32))
    assert index.search(np.ones((1, 4), np.float32), 3)[1].tolist() == [[0, 1, 2]]
    start = time.monotonic()
    with pytest.raises(IndexUnavailable, match="shard 0 of 'slow' is unresponsive"):
        index.search(np.full((1, 4), MAGIC_QUERY, np.float32), 3)
    assert time.monotonic() - start < 0.5 + 1.0
    assert {s["state"] for s in index.shard_states()} == {"unresponsive"}
    with pytest.raises(IndexUnavailable):  # writes wait for a ready shard
        index.add([1], [[1, 1, 1, 1]])
    assert index.refresh(timeout_s=HANG_S + 5) == []  # it answers again: the same shard
    assert {s["state"] for s in index.shard_states()} == {"ready"}
    assert index.search(np.ones((1, 4), np.float32), 3)[1].tolist() == [[0, 1, 2]]
    handles = index.handles
    index.close()  # kills the actors it started (Ray carries the kill out a moment later)
    deadline = time.monotonic() + 30
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(handles[0].status.remote(), timeout=30)
            time.sleep(0.05)


def test_failed_write_marks_the_shard_stale_until_reloaded():
    index = ShardedIndex(4, "dot", shards=2, name="w", actor_class=FaultyShard)
    try:
        ids = np.arange(40)
        vectors = np.arange(160, dtype=np.float32).reshape(40, 4)
        index.add(ids, vectors)
        owner_of_magic = int(index.shard_of([MAGIC_ID])[0])
        with pytest.raises(MemoryError):  # only the failing shard touched: nothing changed
            index.add([MAGIC_ID], [[1, 2, 3, 4]])
        assert {s["state"] for s in index.shard_states()} == {"ready"}
        batch = np.array([MAGIC_ID, *ids[index.shard_of(ids) != owner_of_magic][:3]])
        unchanged = np.vstack([[1, 2, 3, 4], vectors[np.isin(ids, batch)]]).astype(np.float32)
        with pytest.raises(IndexUnavailable, match=rf"shard {owner_of_magic} .* stale"):
            index.add(batch, unchanged)  # the other shard applies its rows: the same values
        assert index.refresh() == [owner_of_magic]
        with pytest.raises(IndexUnavailable, match="stale"):
            index.search(np.ones((1, 4), np.float32), 3)
        loaded = index.reload_shard(owner_of_magic, [(ids, vectors)])
        assert loaded == int((index.shard_of(ids) == owner_of_magic).sum())
        index.check_ready()
        np.testing.assert_array_equal(index.get(ids), vectors)
    finally:
        index.close()


def test_bad_input_raises_what_a_cpu_index_raises():
    index, one = RAY_POOL(3, "cosine", "float16"), CpuIndex(3, "cosine", "float16")
    for target in (index, one):
        target.add([1, 2], [[1, 0, 0], [0, 1, 0]])
    calls = [
        lambda t: t.add([1, 2], [[1, 2, 3], [np.nan, 0, 0]]),
        lambda t: t.add([3], [[0, 0, 0]]),
        lambda t: t.add([1.5], [[1, 2, 3]]),
        lambda t: t.add([3], np.full((1, 3), 1e6, np.float32), prepared=True),
        lambda t: t.search([[1, 2]], 1),
        lambda t: t.search([[0, 0, 0]], 1),
        lambda t: t.search([[1, 2, 3]], -1),
        lambda t: t.search([[1, 2, 3]], 1, threshold=float("inf")),
        lambda t: t.search([[1, 2, 3]], 1, allow=[-1]),
        lambda t: t.range_search([[1, 2, 3]], None),
        lambda t: t.remove([[1]]),
        lambda t: t.get([2, 77]),
    ]
    for call in calls:
        with pytest.raises((ValueError, TypeError, KeyError)) as want:
            call(one)
        with pytest.raises(type(want.value)) as got:
            call(index)
        assert str(got.value) == str(want.value)
    assert len(index) == 2 and 3 not in index
    for bad in ({"dim": 0}, {"metric": "hamming"}, {"dtype": "int8"}, {"block_rows": 0},
                {"shards": 0}, {"timeout_s": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ShardedIndex(**{"dim": 3, "metric": "dot", **bad})


def test_errors_inside_a_shard_come_back_unwrapped():
    """A shard's own ValueError or KeyError is raised as itself, not as Ray's wrapper."""
    from service.cluster.calls import gather

    index = RAY_POOL(3, "dot")
    handle = index.handles[0]
    outcome = gather({0: handle.search.remote(1, np.ones((1, 3)), -1, None, None),
                      1: handle.get.remote(1, [5]),
                      2: handle.search.remote(7, np.ones((1, 3)), 1, None, None)}, 10.0)
    assert type(outcome.errors[0]) is ValueError and "k must be" in str(outcome.errors[0])
    assert type(outcome.errors[1]) is KeyError
    assert outcome.unavailable == {2: "restarting"}  # another epoch: refused, not answered


def test_the_package_imports_without_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import service.cluster as c\n"
            "try:\n    c.ensure_ray()\nexcept RuntimeError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "pip install 'dotsearch[cluster]'" in out
