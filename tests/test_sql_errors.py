"""Malformed and hostile SQL: always a QueryError (or a plain result), never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.catalog import Catalog
from service.catalog_values import QueryResult
from service.errors import DotsearchError, QueryError

D = 4


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    cat = Catalog(tmp_path_factory.mktemp("sqlerr"), backend="cpu")
    cat.create_collection("features", D, "dot", columns={"label": "TEXT", "year": "BIGINT"})
    rng = np.random.default_rng(1)
    cat.upsert("features", np.arange(20), rng.standard_normal((20, D)),
               [{"label": f"l{i % 3}", "year": 2000 + i} for i in range(20)])
    yield cat
    cat.close()


Q = [0.1, 0.2, 0.3, 0.4]

MALFORMED: list[tuple[str, object]] = [
    ("SELEC id FROM features", None),
    ("SELECT id FROM", None),
    ("SELECT id FROM features WHERE", None),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, :q DESC LIMIT 3", {"q": Q}),
    ("SELECT nope FROM features", None),
    ("SELECT id FROM missing_table", None),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, '[1,2]') DESC LIMIT 3", None),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, '[1,2,3,\"x\"]') DESC LIMIT 3", None),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, 'not json') DESC LIMIT 3", None),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, 0x0102) DESC LIMIT 3", None),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, 42) DESC LIMIT 3", None),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 3", None),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 3", {"q": [1e39] * D}),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 3", {"q": {"a": 1}}),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, ?) DESC LIMIT 3", []),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT -1", {"q": Q}),
    ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature) DESC LIMIT 3", None),
    ("CREATE TABLE t (id BIGINT, label TEXT)", None),
    ("CREATE TABLE t (id BIGINT, f VECTOR(0))", None),
    ("CREATE TABLE t (id BIGINT, f VECTOR(3, I8))", None),
    ("CREATE TABLE features (id BIGINT, f VECTOR(3))", None),
    ("INSERT INTO features VALUES (1, '[1,2,3]', 'x', 1)", None),
    ("INSERT INTO features VALUES (100, '[1,2,3,4]', 5, 1)", None),
    ("INSERT INTO features VALUES (-1, '[1,2,3,4]', 'x', 1)", None),
    ("INSERT INTO features (id, feature, bogus) VALUES (101, '[1,2,3,4]', 1)", None),
    ("INSERT INTO features SELECT * FROM features", None),
    ("UPDATE features SET id = 5", None),
    ("DROP TABLE nothere", None),
    ("DROP VIEW features", None),
    ("SHOW DATABASES", None),
    ("ALTER TABLE features DROP COLUMN feature", None),
    ("ALTER TABLE features MODIFY label INT", None),
    ("CREATE INDEX i ON features (label)", None),
    ("TRUNCATE TABLE features", None),
    ("GRANT ALL ON features TO bob", None),
]

HOSTILE: list[tuple[str, object]] = [
    ("SELECT * FROM read_csv('/etc/passwd')", None),
    ("SELECT * FROM '/etc/passwd'", None),
    ("SELECT read_text('/etc/passwd')", None),
    ("SELECT * FROM _dotsearch_collections", None),
    ("SELECT * FROM _dotsearch_meta", None),
    ("SELECT * FROM main.features", None),
    ("SELECT * FROM duckdb_settings()", None),
    ("SELECT current_setting('memory_limit')", None),
    ("SELECT getenv('HOME')", None),
    ("ATTACH '/tmp/x.db' AS x", None),
    ("COPY features TO '/tmp/out.csv'", None),
    ("INSTALL httpfs", None),
    ("LOAD httpfs", None),
    ("PRAGMA database_list", None),
    ("SET enable_external_access = true", None),
    ("EXPORT DATABASE '/tmp/dump'", None),
    ("CALL pragma_version()", None),
    ("SELECT 1; DROP TABLE _dotsearch_meta", None),
    ("DROP TABLE _dotsearch_collections", None),
    ("CREATE TABLE _dotsearch_x (id BIGINT, f VECTOR(3))", None),
    ("CREATE TABLE \"evil\"\"name\" (id BIGINT, f VECTOR(3))", None),
]

INJECTIONS = [
    "cat'; DROP TABLE features; --",
    "' OR 1=1 --",
    "l0' UNION SELECT name FROM _dotsearch_collections --",
    "\"; ATTACH '/tmp/x' AS y; --",
]


@pytest.mark.parametrize(("sql", "params"), MALFORMED + HOSTILE)
def test_bad_queries_are_query_errors(catalog: Catalog, sql: str, params: object) -> None:
    with pytest.raises(DotsearchError) as info:
        catalog.query(sql, params)  # type: ignore[arg-type]
    assert info.value.status_code in (400, 409, 422), (sql, info.value)
    assert info.value.message
    # The table is intact afterwards.
    assert catalog.get_collection("features").count >= 20


@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_through_params_is_just_a_value(catalog: Catalog, value: str) -> None:
    res = catalog.query("SELECT id FROM features WHERE label = :l", {"l": value})
    assert res.rows == []
    res = catalog.query("SELECT id FROM features WHERE label = ?", [value])
    assert res.rows == []
    with pytest.raises(QueryError):
        catalog.query("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 1",
                      {"q": value})
    assert catalog.get_collection("features").count == 20
    assert [c.name for c in catalog.list_collections()] == ["features"]


def test_search_filter_cannot_escape(catalog: Catalog) -> None:
    for bad in ["label = 'x'; DROP TABLE features", "id IN (SELECT id FROM features)",
                "nope = 1", "label = ", "read_text('/etc/passwd') = 'x'",
                "DOT_PRODUCT(feature, '[1,2,3,4]') > 0"]:
        with pytest.raises(QueryError):
            catalog.search("features", np.ones(D), 3, filter=bad)
    hits = catalog.search("features", np.ones(D), 3, filter="label = 'l1' AND year > 2003")
    assert hits[0] and all(h.metadata["label"] == "l1" for h in hits[0])


TOKENS = ["SELECT", "id", "label", "feature", "FROM", "features", "WHERE", "ORDER BY", "LIMIT",
          "DOT_PRODUCT(", "feature <*>", "<->", ":q", "?", "'[1,2,3,4]'", ",", "(", ")", ";",
          "=", ">", "0.5", "3", "DESC", "GROUP BY", "COUNT(*)", "AND", "OR", "NULL", "'x'",
          "JSON_ARRAY_PACK(", "0x00", "EXPLAIN", "INSERT INTO", "VALUES", "DELETE", "*", "-",
          "UNION", "JOIN", "ON", "AS", "s", "CREATE TABLE", "VECTOR(4)", "DROP TABLE", "t"]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(
    st.lists(st.sampled_from(TOKENS), min_size=1, max_size=14).map(" ".join),
    st.text(max_size=60),
))
def test_fuzz_result_or_query_error(tmp_path_factory: pytest.TempPathFactory, sql: str) -> None:
    global _FUZZ
    if _FUZZ is None:
        _FUZZ = Catalog(tmp_path_factory.mktemp("fuzz"), backend="cpu")
        _FUZZ.create_collection("features", D, "dot", columns={"label": "TEXT"})
        _FUZZ.upsert("features", [1, 2, 3], np.eye(3, D), [{"label": "x"}] * 3)
    try:
        out = _FUZZ.query(sql, {"q": Q})
    except DotsearchError as exc:
        assert exc.status_code in (400, 404, 409, 422), exc
        return
    assert isinstance(out, QueryResult)


_FUZZ: Catalog | None = None


@pytest.fixture(scope="module", autouse=True)
def _close_fuzz() -> Iterator[None]:
    yield
    global _FUZZ
    if _FUZZ is not None:
        _FUZZ.close()
        _FUZZ = None


def test_positional_params_span_a_script(tmp_path: Path) -> None:
    with Catalog(tmp_path, backend="cpu") as cat:
        cat.query("CREATE TABLE t (id BIGINT, f VECTOR(2), n BIGINT); "
                  "INSERT INTO t VALUES (?, ?, ?); INSERT INTO t VALUES (?, ?, ?)",
                  [1, [1, 0], 10, 2, [0, 1], 20])
        assert cat.query("SELECT id, n FROM t ORDER BY id").rows == [[1, 10], [2, 20]]
