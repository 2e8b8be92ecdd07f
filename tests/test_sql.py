"""Every SQL form against a float64 numpy reference, through Catalog.query (as HTTP calls it)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.catalog import Catalog
from service.catalog_values import QueryResult
from service.errors import Conflict, QueryError

N, D = 300, 16
LABELS = ("cat", "dog", "bird")


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "vectors": rng.standard_normal((N, D)).astype(np.float32),
        "queries": rng.standard_normal((4, D)).astype(np.float32),
        "years": rng.integers(1990, 2025, N),
    }


@pytest.fixture(scope="module")
def catalog(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, np.ndarray]
) -> Iterator[Catalog]:
    cat = Catalog(tmp_path_factory.mktemp("sql"), backend="cpu")
    meta = [
        {"label": LABELS[i % 3], "year": int(data["years"][i]), "score_hint": float(i) / 10}
        for i in range(N)
    ]
    cols = {"label": "TEXT", "year": "BIGINT", "score_hint": "DOUBLE"}
    for metric in ("dot", "cosine", "l2"):
        name = {"dot": "features", "cosine": "cosfeat", "l2": "l2feat"}[metric]
        cat.create_collection(name, D, metric, columns=cols)
        cat.upsert(name, np.arange(N), data["vectors"], meta)
    yield cat
    cat.close()


def labels() -> np.ndarray:
    return np.array([LABELS[i % 3] for i in range(N)])


def ref_scores(data: dict[str, np.ndarray], q: np.ndarray, fn: str) -> np.ndarray:
    v = data["vectors"].astype(np.float64)
    q64 = q.astype(np.float64)
    if fn == "dot":
        return v @ q64
    if fn == "l2":
        return np.linalg.norm(v - q64, axis=1)
    sim = (v @ q64) / (np.linalg.norm(v, axis=1) * np.linalg.norm(q64))
    return sim if fn == "cos_sim" else 1.0 - sim


def ref_topk(scores: np.ndarray, k: int, higher: bool, mask: np.ndarray | None = None) -> list[int]:
    ids = np.arange(len(scores))
    if mask is not None:
        ids, scores = ids[mask], scores[mask]
    order = np.lexsort((ids, -scores if higher else scores))
    return ids[order][:k].tolist()


def col(result: QueryResult, name: str) -> list[Any]:
    i = result.columns.index(name)
    return [row[i] for row in result.rows]


def test_topk_by_expression_alias_infix_and_params(
    catalog: Catalog, data: dict[str, np.ndarray]
) -> None:
    q = data["queries"][0]
    expected = ref_topk(ref_scores(data, q, "dot"), 10, True)
    queries: list[tuple[str, Any]] = [
        ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 10",
         {"q": q.tolist()}),
        ("SELECT id, DOT_PRODUCT(feature, ?) AS score FROM features ORDER BY score DESC LIMIT 10",
         [q.tolist()]),
        ("SELECT id, feature <*> :q AS s FROM features ORDER BY s DESC LIMIT 10",
         {"q": q.tolist()}),
        ("SELECT id FROM features ORDER BY :q <*> feature DESC LIMIT 10", {"q": q.tolist()}),
    ]
    for sql, params in queries:
        assert col(catalog.query(sql, params), "id") == expected, sql
    res = catalog.query(queries[1][0], queries[1][1])
    np.testing.assert_allclose(col(res, "score"), ref_scores(data, q, "dot")[expected], rtol=1e-5,
                               atol=1e-5)


def test_every_query_vector_form(catalog: Catalog, data: dict[str, np.ndarray]) -> None:
    q = data["queries"][1]
    expected = ref_topk(ref_scores(data, q, "dot"), 5, True)
    text = json.dumps([float(x) for x in q])
    hexed = q.astype("<f4").tobytes().hex()
    base = "SELECT id FROM features ORDER BY DOT_PRODUCT(feature, {}) DESC LIMIT 5"
    forms: list[tuple[str, Any]] = [
        (base.format(":q"), {"q": q.tolist()}),
        (base.format(":q"), {"q": text}),
        (base.format(":q"), {"q": q.astype("<f4").tobytes()}),
        (base.format("?"), [q]),
        (base.format(f"'{text}'"), None),
        (base.format(f"JSON_ARRAY_PACK('{text}')"), None),
        (base.format("JSON_ARRAY_PACK(:t)"), {"t": text}),
        (base.format(f"0x{hexed}"), None),
        (base.format(f"X'{hexed}'"), None),
    ]
    for sql, params in forms:
        assert col(catalog.query(sql, params), "id") == expected, sql[:80]


def test_more_like_this_subquery(catalog: Catalog, data: dict[str, np.ndarray]) -> None:
    res = catalog.query(
        "SELECT id FROM features ORDER BY DOT_PRODUCT(feature, "
        "(SELECT feature FROM features WHERE id = 42)) DESC LIMIT 6"
    )
    assert col(res, "id") == ref_topk(ref_scores(data, data["vectors"][42], "dot"), 6, True)
    with pytest.raises(QueryError, match="exactly one"):
        catalog.query("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, "
                      "(SELECT feature FROM features WHERE id > 5)) DESC LIMIT 6")


def test_threshold_strict_and_inclusive(catalog: Catalog, data: dict[str, np.ndarray]) -> None:
    q = data["queries"][2].tolist()
    top = catalog.query(
        "SELECT id, DOT_PRODUCT(feature, :q) AS s FROM features ORDER BY s DESC LIMIT 7", {"q": q}
    )
    fifth = col(top, "s")[4]
    gt = catalog.query("SELECT id FROM features WHERE DOT_PRODUCT(feature, :q) > :t ORDER BY id",
                       {"q": q, "t": fifth})
    ge = catalog.query("SELECT id FROM features WHERE DOT_PRODUCT(feature, :q) >= :t ORDER BY id",
                       {"q": q, "t": fifth})
    assert sorted(col(top, "id")[:4]) == col(gt, "id")
    assert sorted(col(top, "id")[:5]) == col(ge, "id")
    flipped = catalog.query("SELECT id FROM features WHERE :t < feature <*> :q ORDER BY id",
                            {"q": q, "t": fifth})
    assert col(flipped, "id") == col(gt, "id")
    # A threshold well inside the distribution, against the reference.
    ref = ref_scores(data, data["queries"][2], "dot")
    res = catalog.query("SELECT id FROM features WHERE DOT_PRODUCT(feature, :q) > 1.5", {"q": q})
    assert sorted(col(res, "id")) == np.flatnonzero(ref > 1.5).tolist()


def test_l2_distance_shapes(catalog: Catalog, data: dict[str, np.ndarray]) -> None:
    q = data["queries"][0]
    ref = ref_scores(data, q, "l2")
    for expr in ("EUCLIDEAN_DISTANCE(feature, :q)", "feature <-> :q"):
        res = catalog.query(f"SELECT id, {expr} AS d FROM l2feat ORDER BY d LIMIT 8",
                            {"q": q.tolist()})
        assert col(res, "id") == ref_topk(ref, 8, False)
        np.testing.assert_allclose(col(res, "d"), ref[col(res, "id")], rtol=1e-4)
    t = float(np.sort(ref)[20]) + 1e-3
    for op in ("<", "<="):
        res = catalog.query(f"SELECT id FROM l2feat WHERE feature <-> :q {op} :t",
                            {"q": q.tolist(), "t": t})
        assert sorted(col(res, "id")) == np.flatnonzero(ref < t).tolist()


def test_cosine_functions(catalog: Catalog, data: dict[str, np.ndarray]) -> None:
    q = data["queries"][3]
    sim = ref_scores(data, q, "cos_sim")
    res = catalog.query("SELECT id, COSINE_SIMILARITY(feature, :q) AS s FROM cosfeat "
                        "ORDER BY s DESC LIMIT 9", {"q": q.tolist()})
    assert col(res, "id") == ref_topk(sim, 9, True)
    np.testing.assert_allclose(col(res, "s"), sim[col(res, "id")], rtol=1e-4, atol=1e-5)
    res = catalog.query("SELECT id, COSINE_DISTANCE(feature, :q) AS d FROM cosfeat "
                        "ORDER BY d ASC LIMIT 9", {"q": q.tolist()})
    assert col(res, "id") == ref_topk(sim, 9, True)
    np.testing.assert_allclose(col(res, "d"), 1 - sim[col(res, "id")], rtol=1e-4, atol=1e-5)
    # DOT_PRODUCT on a cosine collection: stored vectors are unit length.
    dot = sim * np.linalg.norm(q.astype(np.float64))
    res = catalog.query("SELECT id, DOT_PRODUCT(feature, :q) AS s FROM cosfeat "
                        "WHERE DOT_PRODUCT(feature, :q) > 1.0 ORDER BY s DESC", {"q": q.tolist()})
    assert col(res, "id") == ref_topk(dot, N, True, dot > 1.0)
    np.testing.assert_allclose(col(res, "s"), dot[col(res, "id")], rtol=1e-4, atol=1e-5)


def test_filtered_topk_is_exact(catalog: Catalog, data: dict[str, np.ndarray]) -> None:
    q = data["queries"][0]
    ref = ref_scores(data, q, "dot")
    mask = (labels() == "bird") & (data["years"] > 2010)
    res = catalog.query(
        "SELECT id, label, year FROM features WHERE label = 'bird' AND year > :y "
        "ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 10", {"q": q.tolist(), "y": 2010})
    assert col(res, "id") == ref_topk(ref, 10, True, mask)
    assert set(col(res, "label")) == {"bird"}
    # Fewer matches than k: all of them, never fewer.
    rare = data["years"] == data["years"][0]
    res = catalog.query("SELECT id FROM features WHERE year = :y "
                        "ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 50",
                        {"q": q.tolist(), "y": int(data["years"][0])})
    assert col(res, "id") == ref_topk(ref, 50, True, rare)
    # A threshold and a metadata predicate together, with LIMIT.
    both = mask & (ref > 0.5)
    res = catalog.query(
        "SELECT id FROM features WHERE label = 'bird' AND DOT_PRODUCT(feature, :q) > 0.5 "
        "AND year > 2010 ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 3", {"q": q.tolist()})
    assert col(res, "id") == ref_topk(ref, 3, True, both)


def test_repeated_statement_text_plans_afresh(catalog: Catalog,
                                             data: dict[str, np.ndarray]) -> None:
    """Parsed trees are cached by text: each run must still bind and plan its own copy."""
    text = ("SELECT id FROM features WHERE year > :y AND label = 'bird' "
            "ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 7")
    for q, year in [(data["queries"][2], 2005), (data["queries"][3], 2015),
                    (data["queries"][2], 2005)]:
        mask = (labels() == "bird") & (data["years"] > year)
        res = catalog.query(text, {"q": q.tolist(), "y": year})
        assert col(res, "id") == ref_topk(ref_scores(data, q, "dot"), 7, True, mask)
    for _ in range(2):
        with pytest.raises(QueryError, match="unknown table") as info:
            catalog.query("SELECT id FROM nowhere")
        assert info.value.position == {"line": 1, "column": 16}


def test_offset_pages_are_stable(catalog: Catalog, data: dict[str, np.ndarray]) -> None:
    q = data["queries"][1].tolist()
    pages = []
    for page in range(4):
        res = catalog.query("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, :q) DESC "
                            "LIMIT 5 OFFSET :o", {"q": q, "o": page * 5})
        pages += col(res, "id")
    assert pages == ref_topk(ref_scores(data, data["queries"][1], "dot"), 20, True)


def test_knn_vote_and_aggregates(catalog: Catalog, data: dict[str, np.ndarray]) -> None:
    q = data["queries"][2]
    res = catalog.query(
        "SELECT label, COUNT(*) FROM (SELECT label FROM features "
        "ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 10) GROUP BY label", {"q": q.tolist()})
    got = {row[0]: row[1] for row in res.rows}
    near = ref_topk(ref_scores(data, q, "dot"), 10, True)
    assert got == dict(Counter(labels()[near].tolist()))
    res = catalog.query(
        "SELECT label, COUNT(*) AS n, MAX(DOT_PRODUCT(feature, :q)) AS best FROM features "
        "WHERE DOT_PRODUCT(feature, :q) > 0 GROUP BY label ORDER BY label", {"q": q.tolist()})
    ref = ref_scores(data, q, "dot")
    for label, n, best in res.rows:
        sel = (labels() == label) & (ref > 0)
        assert n == int(sel.sum())
        assert best == pytest.approx(ref[sel].max(), rel=1e-5)


def test_join_with_another_collection(catalog: Catalog, data: dict[str, np.ndarray]) -> None:
    q = data["queries"][0]
    res = catalog.query(
        "SELECT a.id, b.label FROM features a JOIN l2feat b ON a.id = b.id "
        "WHERE b.year < 2000 ORDER BY DOT_PRODUCT(a.feature, :q) DESC LIMIT 5", {"q": q.tolist()})
    mask = data["years"] < 2000
    assert col(res, "id") == ref_topk(ref_scores(data, q, "dot"), 5, True, mask)


def test_general_path_functions(catalog: Catalog, data: dict[str, np.ndarray]) -> None:
    q = data["queries"][3]
    # EUCLIDEAN_DISTANCE on a dot collection is not an index metric: computed row by row.
    ref = ref_scores(data, q, "l2")
    res = catalog.query("SELECT id, EUCLIDEAN_DISTANCE(feature, :q) AS d FROM features "
                        "ORDER BY d LIMIT 4", {"q": q.tolist()})
    assert col(res, "id") == ref_topk(ref, 4, False)
    res = catalog.query("SELECT id, JSON_ARRAY_UNPACK(feature) AS v, VECTOR_NUM_ELEMENTS(feature) "
                        "AS n FROM features WHERE id = 3")
    np.testing.assert_array_equal(np.array(res.rows[0][1], dtype=np.float32), data["vectors"][3])
    assert res.rows[0][2] == D
    res = catalog.query("SELECT DOT_PRODUCT(JSON_ARRAY_PACK('[1,2]'), JSON_ARRAY_PACK('[3,4]'))")
    assert res.rows == [[11.0]]
    # A scored scan: the function in the projection only, every row.
    res = catalog.query("SELECT id, DOT_PRODUCT(feature, :q) AS s FROM features WHERE id < 5 "
                        "ORDER BY id", {"q": q.tolist()})
    np.testing.assert_allclose(col(res, "s"), ref_scores(data, q, "dot")[:5], rtol=1e-5)
    # OR with a vector predicate: correct, not pre-filtered.
    dot = ref_scores(data, q, "dot")
    res = catalog.query("SELECT id FROM features WHERE DOT_PRODUCT(feature, :q) > 2 OR id = 0",
                        {"q": q.tolist()})
    assert sorted(col(res, "id")) == sorted(set(np.flatnonzero(dot > 2).tolist()) | {0})


def test_explain(catalog: Catalog, data: dict[str, np.ndarray]) -> None:
    res = catalog.query("EXPLAIN SELECT id FROM features WHERE label = 'cat' "
                        "ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 10",
                        {"q": data["queries"][0].tolist()})
    text = res.explain or ""
    assert "exact top-k" in text and "backend cpu" in text
    assert f"rows scanned: {N}" in text and "selectivity 33.33%" in text
    res = catalog.query("EXPLAIN SELECT id FROM features WHERE feature <*> :q > 0.9",
                        {"q": data["queries"][0].tolist()})
    assert "exact range" in (res.explain or "")


def test_ddl_dml_roundtrip(tmp_path: Path) -> None:
    with Catalog(tmp_path, backend="cpu") as cat:
        cat.query("CREATE TABLE imgs (id BIGINT PRIMARY KEY, feature VECTOR(3, F16), "
                  "label TEXT, n INT, meta JSON)")
        info = cat.get_collection("imgs")
        assert (info.dim, info.dtype, info.metric) == (3, "float16", "dot")
        assert info.columns == {"label": "VARCHAR", "n": "BIGINT", "meta": "JSON"}
        cat.query(
            "INSERT INTO imgs (id, feature, label, n, meta) VALUES "
            "(1, '[1, 0, 0]', 'a', 1, '{\"k\": 1}'), "
            "(2, JSON_ARRAY_PACK('[0, 1, 0]'), 'b', 2, NULL), "
            "(3, X'0000803f0000803f00000000', 'c', -3, NULL), (4, :v, :l, 4, NULL)",
            {"v": [0, 0, 1], "l": "d"},
        )
        vec, _ = cat.get_vector("imgs", 3)
        np.testing.assert_array_equal(vec, [1, 1, 0])
        assert cat.get_vector("imgs", 1)[1] == {"label": "a", "n": 1, "meta": {"k": 1}}
        with pytest.raises(Conflict):
            cat.query("INSERT INTO imgs VALUES (1, '[1,1,1]', 'x', 0, NULL)")
        cat.query("REPLACE INTO imgs VALUES (1, '[1,1,1]', 'x', 0, NULL)")
        assert cat.get_vector("imgs", 1)[1]["label"] == "x"
        res = cat.query("UPDATE imgs SET label = :l WHERE n > 1", {"l": "big"})
        assert res.rows == [[2]]
        res = cat.query("SELECT id, label FROM imgs ORDER BY id")
        assert res.rows == [[1, "x"], [2, "big"], [3, "c"], [4, "big"]]
        res = cat.query("DELETE FROM imgs WHERE feature <*> '[0, 0, 1]' > 0.5")
        assert res.rows == [[2]]  # ids 1 and 4
        assert cat.query("SELECT id FROM imgs ORDER BY id").rows == [[2], [3]]
        assert cat.query("SHOW TABLES").rows == [["imgs"]]
        desc = cat.query("DESCRIBE imgs").rows
        assert desc[1] == ["feature", "VECTOR(3, F16)", "NO", "", None, ""]
        with pytest.raises(QueryError, match="metadata columns only"):
            cat.query("UPDATE imgs SET feature = '[1,2,3]'")
        # A script runs in order and answers with its last statement.
        res = cat.query("DELETE FROM imgs WHERE id = 2; SELECT COUNT(*) FROM imgs")
        assert res.rows == [[1]]
        cat.query("DROP TABLE imgs")
        assert cat.query("SHOW TABLES").rows == []


def test_create_table_metric_option(tmp_path: Path) -> None:
    with Catalog(tmp_path, backend="cpu") as cat:
        cat.query("CREATE TABLE c (id BIGINT, v VECTOR(2)) COMMENT = 'metric=cosine'")
        assert cat.get_collection("c").metric == "cosine"
        cat.query("INSERT INTO c VALUES (1, '[3, 4]'), (2, '[1, 0]')")
        res = cat.query("SELECT id, COSINE_SIMILARITY(v, '[1, 0]') AS s FROM c ORDER BY s DESC "
                        "LIMIT 2")
        assert [r[0] for r in res.rows] == [2, 1]
        assert res.rows[1][1] == pytest.approx(0.6, rel=1e-6)
        with pytest.raises(QueryError, match="metric must be"):
            cat.query("CREATE TABLE d (id BIGINT, v VECTOR(2)) COMMENT = 'metric=manhattan'")


def test_rest_collection_is_a_table(tmp_path: Path) -> None:
    with Catalog(tmp_path, backend="cpu") as cat:
        cat.create_collection("photos", 2, "cosine", columns={"label": "VARCHAR"})
        cat.upsert("photos", [5, 6], [[1, 0], [0, 2]], [{"label": "x"}, {"label": "y"}])
        res = cat.query("SELECT id, label, JSON_ARRAY_UNPACK(feature) AS f FROM photos ORDER BY id")
        assert res.rows == [[5, "x", [1.0, 0.0]], [6, "y", [0.0, 1.0]]]
        assert res.columns == ["id", "label", "f"]


def test_vector_errors_have_positions(catalog: Catalog) -> None:
    with pytest.raises(QueryError, match="3 elements") as info:
        catalog.query(
            "SELECT id FROM features\nORDER BY DOT_PRODUCT(feature, '[1,2,3]') DESC LIMIT 1"
        )
    assert info.value.position == {"line": 2, "column": 31}
    with pytest.raises(QueryError, match="NaN"):
        catalog.query("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 1",
                      {"q": [float("nan")] * D})
    with pytest.raises(QueryError, match="unknown table") as info:
        catalog.query("SELECT id FROM nowhere")
    assert info.value.position == {"line": 1, "column": 16}


def test_table_and_column_names_are_case_insensitive(tmp_path: Path) -> None:
    with Catalog(tmp_path, backend="cpu") as cat:
        cat.create_collection("Photos", 2, "dot", columns={"Label": "TEXT"})
        cat.query("INSERT INTO photos (ID, Feature, label) VALUES (1, '[1, 0]', 'a')")
        cat.query("UPDATE PHOTOS SET LABEL = 'b' WHERE id = 1")
        res = cat.query("SELECT id, label FROM PHOTOS ORDER BY feature <*> '[1, 0]' DESC LIMIT 1")
        assert res.rows == [[1, "b"]]
        assert cat.query("DESCRIBE photos").rows[0] == ["id", "BIGINT", "NO", "PRI", None, ""]
        cat.query("DROP TABLE photos")
        assert cat.list_collections() == []
