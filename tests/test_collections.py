"""Catalog API (what the HTTP layer calls): search against a numpy reference, concurrency."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.catalog import Catalog
from service.catalog_values import CollectionInfo, Hit
from service.errors import InvalidInput, NotFound, QueryError
from service.rwlock import RWLock

D = 12


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    with Catalog(tmp_path, backend="cpu") as cat:
        yield cat


def _reference(v: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    v64, q64 = v.astype(np.float64), q.astype(np.float64)
    if metric == "dot":
        return v64 @ q64
    if metric == "cosine":
        return (v64 @ q64) / (np.linalg.norm(v64, axis=1) * np.linalg.norm(q64))
    return np.linalg.norm(v64 - q64, axis=1)


@pytest.mark.parametrize("metric", ["dot", "cosine", "l2"])
def test_search_matches_reference(catalog: Catalog, metric: str) -> None:
    rng = np.random.default_rng(11)
    v = rng.standard_normal((400, D)).astype(np.float32)
    ids = rng.permutation(10_000)[:400]
    cat_info = catalog.create_collection("c", D, metric, columns={"g": "BIGINT"})
    assert isinstance(cat_info, CollectionInfo) and cat_info.to_dict()["metric"] == metric
    catalog.upsert("c", ids, v, [{"g": int(i % 5)} for i in ids])
    queries = rng.standard_normal((3, D)).astype(np.float32)
    results = catalog.search("c", queries, 7, filter="g = 2 OR g = 4", offset=2)
    higher = metric != "l2"
    for q, hits in zip(queries, results, strict=True):
        scores = _reference(v, q, metric)
        mask = np.isin(ids % 5, [2, 4])
        cand_ids, cand_scores = ids[mask], scores[mask]
        order = np.lexsort((cand_ids, -cand_scores if higher else cand_scores))
        assert [h.id for h in hits] == cand_ids[order][2:9].tolist()
        np.testing.assert_allclose([h.score for h in hits], cand_scores[order][2:9], rtol=1e-4,
                                   atol=1e-5)
        assert all(isinstance(h, Hit) and h.metadata["g"] in (2, 4) for h in hits)
    # Threshold (inclusive) with a 1-d query.
    t = 0.0 if metric != "l2" else 4.0
    hits = catalog.search("c", queries[0], 1000, threshold=t)[0]
    scores = _reference(v, queries[0], metric)
    expect = np.flatnonzero(scores >= t) if higher else np.flatnonzero(scores <= t)
    assert sorted(h.id for h in hits) == sorted(ids[expect].tolist())


def test_search_edge_cases(catalog: Catalog) -> None:
    catalog.create_collection("e", D, "dot", columns={"label": "TEXT"})
    assert catalog.search("e", np.ones(D), 5) == [[]]
    catalog.upsert("e", [1, 2, 3], np.eye(3, D), [{"label": "a"}, {"label": "b"}, {}])
    assert catalog.search("e", np.ones(D), 5, filter="label = 'zzz'") == [[]]
    assert [h.id for h in catalog.search("e", np.ones(D), 10)[0]] == [1, 2, 3]  # ties by id
    for bad in [dict(k=0), dict(k=3, offset=-1), dict(k=3, threshold=float("nan"))]:
        with pytest.raises(InvalidInput):
            catalog.search("e", np.ones(D), **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        catalog.search("e", np.ones(D + 1), 3)
    with pytest.raises(QueryError):
        catalog.search("e", np.ones(D), 3, filter="nope > 1")
    with pytest.raises(NotFound):
        catalog.search("zz", np.ones(D), 3)
    catalog.drop_collection("e")
    assert catalog.list_collections() == []
    with pytest.raises(NotFound):
        catalog.drop_collection("e")


def test_next_ids_are_fresh_under_threads(catalog: Catalog) -> None:
    catalog.create_collection("n", D)
    catalog.upsert("n", [41], np.ones((1, D)))
    got: list[np.ndarray] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(50):
            ids = catalog.next_ids("n", 3)
            with lock:
                got.append(ids)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    all_ids = np.concatenate(got)
    assert len(np.unique(all_ids)) == len(all_ids) == 600 and all_ids.min() == 42


def test_readers_never_see_half_a_batch(catalog: Catalog) -> None:
    """Each batch rewrites every row's vector and metadata to the batch number: a search or
    a query must see one batch number throughout, in the index and in DuckDB alike."""
    n = 64
    catalog.create_collection("b", D, "dot", columns={"batch": "BIGINT"})
    ids = np.arange(n)

    def batch(b: int) -> np.ndarray:
        v = np.zeros((n, D), dtype=np.float32)
        v[:, 0] = b + 1
        return v

    catalog.upsert("b", ids, batch(0), [{"batch": 0}] * n)
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        for b in range(1, 40):
            catalog.upsert("b", ids, batch(b), [{"batch": b}] * n)
        stop.set()

    def reader() -> None:
        q = np.zeros(D, dtype=np.float32)
        q[0] = 1
        while not stop.is_set():
            hits = catalog.search("b", q, n)[0]
            scores = {h.score for h in hits}
            metas = {h.metadata["batch"] for h in hits}
            if len(hits) != n or len(scores) != 1 or metas != {next(iter(scores)) - 1}:
                errors.append(f"mixed: scores {scores} metadata {metas}")
            rows = catalog.query("SELECT DISTINCT batch FROM b").rows
            if len(rows) != 1:
                errors.append(f"mixed rows {rows}")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader)
                                                   for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors[:3]


def test_rwlock_writer_reentry_and_exclusion() -> None:
    lock = RWLock()
    order: list[str] = []
    with lock.write(), lock.write(), lock.read():
        order.append("nested")
    entered = threading.Event()
    release = threading.Event()

    def hold_read() -> None:
        with lock.read():
            entered.set()
            release.wait(5)
            order.append("reader done")

    th = threading.Thread(target=hold_read)
    th.start()
    entered.wait(5)
    release.set()
    with lock.write():
        order.append("writer")
    th.join()
    assert order == ["nested", "reader done", "writer"]


def test_searches_and_sql_do_not_wait_for_a_commit(tmp_path, monkeypatch):
    """While a batch's DuckDB commit is in progress, searches (plain, filtered, with
    metadata) and SQL answer from the state before it, in full; after it, the whole batch."""
    import threading

    with Catalog(tmp_path / "d", "cpu") as cat:
        cat.create_collection("c", 2, "dot", columns={"label": "VARCHAR"})
        cat.create_collection("bare", 2, "dot")
        cat.upsert("c", [1, 2], [[1, 0], [0, 1]], [{"label": "a"}, {"label": "b"}])
        cat.upsert("bare", [1], [[1, 0]])
        storage = cat._storage
        in_commit, release = threading.Event(), threading.Event()
        real_commit = storage.commit

        def slow_commit() -> None:
            in_commit.set()
            assert release.wait(30)
            real_commit()

        monkeypatch.setattr(storage, "commit", slow_commit)
        writer = threading.Thread(target=cat.upsert, args=(
            "c", [3, 4], [[5, 0], [0, 5]], [{"label": "a"}, {"label": "b"}]))
        writer.start()
        try:
            assert in_commit.wait(30)
            # Each of these would block until the commit ended if a lock were held across it.
            hits = cat.search("c", [[1, 0]], 10)[0]
            assert [(h.id, h.metadata["label"]) for h in hits] == [(1, "a"), (2, "b")]
            assert [h.id for h in cat.search("c", [[1, 0]], 10, filter="label = 'a'")[0]] == [1]
            assert [h.id for h in cat.search("bare", [[1, 0]], 10)[0]] == [1]
            assert cat.query("SELECT count(*) FROM c").rows == [[2]]
            assert cat.query("SELECT id FROM c ORDER BY DOT_PRODUCT(feature, '[1,0]') DESC "
                             "LIMIT 1").rows == [[1]]
            assert writer.is_alive(), "the commit ended before the reads could be checked"
        finally:
            release.set()
            writer.join(30)
        hits = cat.search("c", [[1, 0]], 10, filter="label = 'a'")[0]
        assert [h.id for h in hits] == [3, 1]
        assert cat.query("SELECT id FROM c ORDER BY DOT_PRODUCT(feature, '[1,0]') DESC "
                         "LIMIT 2").rows == [[3], [1]]
