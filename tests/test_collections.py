"""Catalog API (what the HTTP layer calls): search against a numpy reference, concurrency."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.catalog import Catalog
from service.catalog_values import CollectionInfo, Hit
from service.errors import Conflict, InvalidInput, NotFound, QueryError
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


# -- declared column order, ALTER operations, renames ---------------------------------------


def _raw_columns(cat: Catalog, table: str) -> list[str]:
    """The DuckDB table's columns as ``SELECT *`` gives them."""
    cur = cat.reader()
    cur.execute(f'SELECT * FROM "{table}" LIMIT 0')
    return [d[0] for d in cur.description]


def _unit_rows(n: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def test_declared_column_order_is_the_table_order(tmp_path: Path) -> None:
    order = ["label", "id", "year", "vec"]
    vectors = _unit_rows(20)
    with Catalog(tmp_path, backend="cpu") as cat:
        info = cat.create_collection("o", D, "dot", columns={"year": "INT", "label": "TEXT"},
                                     thumbnails=True, vector_column="vec", column_order=order,
                                     vector_type="VECTOR(12, F32)", auto_increment=True)
        assert info.column_order == order and list(info.columns) == ["label", "year"]
        assert (info.vector_type, info.auto_increment) == ("VECTOR(12, F32)", True)
        assert info.columns == {"label": "VARCHAR", "year": "BIGINT"}
        assert _raw_columns(cat, "o") == [*order, "_thumbnail"]
        meta = [{"year": 2000 + i, "label": f"l{i}"} for i in range(20)]
        cat.upsert("o", np.arange(20), vectors, meta, [b"t"] * 20)
        vec, got = cat.get_vector("o", 3)
        np.testing.assert_array_equal(vec, vectors[3])
        assert got == {"label": "l3", "year": 2003} and list(got) == ["label", "year"]
        assert cat.get_thumbnail("o", 3) == b"t"
        row = cat.reader().execute('SELECT * FROM "o" WHERE id = 3').fetchone()
        assert row is not None and row[:3] == ("l3", 3, 2003)
        before = cat.search("o", vectors[:2], 5)
    with Catalog(tmp_path, backend="cpu") as cat:  # reloaded from storage in any order
        info = cat.get_collection("o")
        assert info.column_order == order and list(info.columns) == ["label", "year"]
        assert (info.vector_type, info.auto_increment, info.count) == ("VECTOR(12, F32)", True, 20)
        assert cat.search("o", vectors[:2], 5) == before
        assert cat.create_collection("d", D).column_order == ["id", "feature"]


@pytest.mark.parametrize("order", [
    ["id", "feature"], ["id", "feature", "a", "b"], ["id", "feature", "a", "a"],
    ["id", "feature", "a", "A"], ["ID", "feature", "a"], ["id", "feature", "a", "_thumbnail"],
    "id,feature,a", [1, "feature", "a"]])
def test_column_order_must_name_each_column_once(catalog: Catalog, order: object) -> None:
    with pytest.raises(InvalidInput, match="column order"):
        catalog.create_collection("x", D, columns={"a": "INT"}, column_order=order)  # type: ignore[arg-type]
    assert catalog.names() == []


@pytest.mark.parametrize("vector_type", ["", "1VECTOR", "VECTOR(4);DROP", "V" * 41, "VECTOR\n",
                                         4, "VECTOR'4'"])
def test_vector_type_is_checked(catalog: Catalog, vector_type: object) -> None:
    with pytest.raises(InvalidInput, match="vector type"):
        catalog.create_collection("x", D, vector_type=vector_type)  # type: ignore[arg-type]


def test_vector_types_as_declared(catalog: Catalog) -> None:
    for i, spelled in enumerate(["VECTOR(4)", "VECTOR(4, F16)", "binary(4096)", "varbinary(64)",
                                 "BLOB", "V" * 40]):
        assert catalog.create_collection(f"v{i}", D, vector_type=spelled).vector_type == spelled
    # Undeclared (a REST collection): the VECTOR type its dimension and storage make.
    assert catalog.create_collection("r", D).vector_type == f"VECTOR({D})"
    assert catalog.create_collection("h", D, dtype="float16").vector_type == f"VECTOR({D}, F16)"
    with pytest.raises(InvalidInput, match="reserved"):
        catalog.create_collection("w", D, vector_column="id")


def test_alter_columns_persist_and_the_index_keeps_answering(tmp_path: Path) -> None:
    vectors = _unit_rows(30)
    with Catalog(tmp_path, backend="cpu") as cat:
        cat.create_collection("c", D, "dot", columns={"label": "VARCHAR", "year": "BIGINT"},
                              thumbnails=True)
        cat.upsert("c", np.arange(30), vectors, [{"label": f"l{i}", "year": i} for i in range(30)])
        expected = [h.id for h in cat.search("c", vectors[4], 5)[0]]
        info = cat.add_column("c", "score", "real")
        assert info.column_order == ["id", "feature", "label", "year", "score"]
        assert info.columns["score"] == "DOUBLE" and info.count == 30
        assert cat.get_vector("c", 4)[1] == {"label": "l4", "year": 4, "score": None}
        cat.upsert("c", [4], vectors[4:5], [{"label": "x", "year": 1, "score": 0.5}])
        info = cat.drop_column("c", "year")
        assert info.column_order == ["id", "feature", "label", "score"]
        info = cat.rename_column("c", "label", "tag")
        assert info.column_order == ["id", "feature", "tag", "score"]
        info = cat.rename_column("c", "feature", "emb")
        assert (info.vector_column, info.column_order) == ("emb", ["id", "emb", "tag", "score"])
        hits = cat.search("c", vectors[4], 5)[0]
        assert [h.id for h in hits] == expected
        assert hits[0].metadata == {"tag": "x", "score": 0.5}
        assert set(_raw_columns(cat, "c")) == {"id", "emb", "tag", "score", "_thumbnail"}
        assert cat.reader().execute("SELECT tag, score FROM c WHERE id = 4").fetchall() == [
            ("x", 0.5)]
    with Catalog(tmp_path, backend="cpu") as cat:
        info = cat.get_collection("c")
        assert (info.vector_column, info.column_order) == ("emb", ["id", "emb", "tag", "score"])
        assert info.columns == {"tag": "VARCHAR", "score": "DOUBLE"} and info.count == 30
        assert [h.id for h in cat.search("c", vectors[4], 5)[0]] == expected
        vec, meta = cat.get_vector("c", 4)
        np.testing.assert_array_equal(vec, vectors[4])
        assert meta == {"tag": "x", "score": 0.5}
        cat.upsert("c", [99], vectors[:1], [{"tag": "new"}])
        assert cat.get_vector("c", 99)[1] == {"tag": "new", "score": None}


def test_alter_errors_change_nothing(catalog: Catalog) -> None:
    catalog.create_collection("c", D, columns={"label": "VARCHAR"})
    before = catalog.get_collection("c")
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: catalog.drop_column("c", "feature"), InvalidInput,
         "the vector column 'feature' cannot be dropped"),
        (lambda: catalog.drop_column("c", "id"), InvalidInput, "the id column cannot be dropped"),
        (lambda: catalog.rename_column("c", "id", "key"), InvalidInput, "cannot be renamed"),
        (lambda: catalog.drop_column("c", "nope"), NotFound, "no column 'nope'"),
        (lambda: catalog.drop_column("c", "Label"), NotFound, "no column 'Label'"),
        (lambda: catalog.rename_column("c", "nope", "x"), NotFound, "no column 'nope'"),
        (lambda: catalog.add_column("c", "LABEL", "INT"), Conflict, "already has a column"),
        (lambda: catalog.add_column("c", "ID", "INT"), Conflict, "already has a column"),
        (lambda: catalog.add_column("c", "Feature", "INT"), Conflict, "already has a column"),
        (lambda: catalog.rename_column("c", "label", "feature"), Conflict, "already has"),
        (lambda: catalog.rename_column("c", "label", "label"), Conflict, "already has"),
        (lambda: catalog.add_column("c", "rowid", "INT"), InvalidInput, "reserved"),
        (lambda: catalog.add_column("c", "_thumbnail", "BLOB"), InvalidInput, "column name"),
        (lambda: catalog.add_column("c", "bad name", "INT"), InvalidInput, "column name"),
        (lambda: catalog.add_column("c", "x", "BLOB"), InvalidInput, "type must be one of"),
        (lambda: catalog.rename_column("c", "label", "rowid"), InvalidInput, "reserved"),
        (lambda: catalog.rename_column("c", "label", 3), InvalidInput, "column name"),
        (lambda: catalog.add_column("nope", "x", "INT"), NotFound, "no collection"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert catalog.get_collection("c") == before
    assert _raw_columns(catalog, "c") == ["id", "feature", "label"]
    info = catalog.rename_column("c", "label", "Label")  # a change of case alone is fine
    assert info.column_order == ["id", "feature", "Label"]


def test_a_failed_alter_commit_changes_nothing(catalog: Catalog, monkeypatch) -> None:
    import duckdb

    from service.errors import DotsearchError

    catalog.create_collection("c", D, columns={"label": "VARCHAR"})
    storage = catalog._storage

    def failing_commit() -> duckdb.Error:
        storage.rollback()
        return duckdb.TransactionException("simulated commit failure")

    monkeypatch.setattr(storage, "try_commit", failing_commit)
    with pytest.raises(DotsearchError):
        catalog.add_column("c", "year", "INT")
    with pytest.raises(DotsearchError):
        catalog.rename_collection("c", "d")
    monkeypatch.undo()
    assert catalog.get_collection("c").column_order == ["id", "feature", "label"]
    assert catalog.names() == ["c"] and _raw_columns(catalog, "c") == ["id", "feature", "label"]
    assert catalog.add_column("c", "year", "INT").column_order[-1] == "year"


def test_rename_collection_end_to_end(tmp_path: Path) -> None:
    vectors = _unit_rows(10)
    with Catalog(tmp_path, backend="cpu") as cat:
        cat.create_collection("old", D, "dot", columns={"label": "VARCHAR"}, thumbnails=True)
        cat.create_collection("other", D)
        cat.upsert("old", np.arange(10), vectors, [{"label": f"l{i}"} for i in range(10)],
                   [b"x"] * 10)
        coll = cat.collection("old")
        with pytest.raises(Conflict, match="already exists"):
            cat.rename_collection("old", "OTHER")
        with pytest.raises(Conflict, match="already exists"):
            cat.rename_collection("old", "old")
        for bad in ["bad name", "_dotsearch_x", "duckdb_x", ""]:
            with pytest.raises(InvalidInput):
                cat.rename_collection("old", bad)
        with pytest.raises(NotFound):
            cat.rename_collection("nope", "x")
        info = cat.rename_collection("old", "new")
        assert (info.name, info.count, info.column_order) == ("new", 10, ["id", "feature",
                                                                          "label"])
        assert cat.collection("new") is coll  # the index object is kept: nothing reloaded
        assert cat.names() == ["new", "other"] and cat.resolve("NEW") == "new"
        assert cat.resolve("old") is None
        for call in [lambda: cat.get_collection("old"), lambda: cat.search("old", vectors[0], 1),
                     lambda: cat.get_vector("old", 1), lambda: cat.upsert("old", [1], vectors[:1]),
                     lambda: cat.delete("old", [1]), lambda: cat.next_ids("old", 1)]:
            with pytest.raises(NotFound):
                call()
        hits = cat.search("new", vectors[3], 2)[0]
        assert hits[0].id == 3 and hits[0].metadata == {"label": "l3"}
        cat.upsert("new", [20], vectors[:1], [{"label": "added"}])
        assert cat.get_vector("new", 20)[1] == {"label": "added"}
        assert cat.get_thumbnail("new", 1) == b"x"
        assert cat.next_ids("new", 1).tolist() == [21]
        assert cat.delete("new", [0]) == 1
        assert cat.reader().execute("SELECT count(*) FROM new").fetchall() == [(10,)]
        info = cat.rename_collection("new", "New")  # a change of case alone is fine
        assert info.name == "New"
    with Catalog(tmp_path, backend="cpu") as cat:
        assert cat.names() == ["New", "other"] and cat.get_collection("New").count == 10
        assert cat.search("New", vectors[3], 1)[0][0].id == 3
        assert cat.get_vector("New", 20)[1] == {"label": "added"}


def test_reader_snapshot_open_across_an_add_column(catalog: Catalog) -> None:
    """A snapshot pinned before an ALTER keeps the old layout (its index reads retry);
    the ALTER does not wait for it, and nothing fails with an internal error."""
    from service.snapshots import StaleSnapshot

    catalog.create_collection("c", D, "dot", columns={"label": "VARCHAR"})
    catalog.upsert("c", [1, 2], _unit_rows(2), [{"label": "a"}, {"label": "b"}])
    pinned, altered = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def reader() -> None:
        try:
            with catalog.snapshot() as snap:
                seen["before"] = snap.cursor.execute("SELECT * FROM c ORDER BY id").fetchall()
                pinned.set()
                assert altered.wait(30)
                seen["after"] = snap.cursor.execute("SELECT * FROM c ORDER BY id").fetchall()
                try:
                    with catalog.index_access(snap):
                        seen["index"] = "read"
                except StaleSnapshot:
                    seen["index"] = "stale"
        except BaseException as exc:  # reported below
            seen["error"] = exc

    th = threading.Thread(target=reader)
    th.start()
    assert pinned.wait(30)
    info = catalog.add_column("c", "year", "BIGINT")  # must not wait for the reader
    altered.set()
    th.join(30)
    assert "error" not in seen, seen.get("error")
    assert info.column_order == ["id", "feature", "label", "year"]
    assert seen["after"] == seen["before"] and len(seen["before"][0]) == 3
    assert seen["index"] == "stale"
    hits = catalog.search("c", _unit_rows(1), 2)[0]
    assert sorted(h.metadata["label"] for h in hits) == ["a", "b"]
    assert all(h.metadata["year"] is None for h in hits)


def test_searches_and_reads_go_on_while_columns_change(catalog: Catalog) -> None:
    """ALTERs against concurrent searches (with metadata) and point reads: every answer
    matches one layout, and none fails."""
    vectors = _unit_rows(50)
    catalog.create_collection("c", D, "dot", columns={"label": "VARCHAR"})
    catalog.upsert("c", np.arange(50), vectors, [{"label": f"l{i}"} for i in range(50)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def search() -> None:
        try:
            while not stop.is_set():
                for hits in catalog.search("c", vectors[:2], 3):
                    assert len(hits) == 3 and all("label" in h.metadata for h in hits)
                catalog.get_vector("c", 7)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=search) for _ in range(3)]
    for th in threads:
        th.start()
    try:
        for i in range(15):
            if stop.is_set():
                break
            catalog.add_column("c", f"x{i}", "INT")
            catalog.rename_column("c", f"x{i}", f"y{i}")
            catalog.drop_column("c", f"y{i}")
    finally:
        stop.set()
        for th in threads:
            th.join(30)
    import traceback
    assert not errors, "".join(traceback.format_exception(errors[0]))
    assert catalog.get_collection("c").column_order == ["id", "feature", "label"]
