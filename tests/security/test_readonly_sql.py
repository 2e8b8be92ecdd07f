"""The read-only key and SQL: authorised by the parsed statements (every one of them, CTEs
and EXPLAIN targets included) before any runs; reads still answer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.api_support import seed_t

RW = {"X-API-Key": "rw-key"}
RO = {"X-API-Key": "ro-key"}
ROW_9 = "(9, '[0,0,0,1]', 'pwned', 1999)"

# Scripts the read-only key must not run; True where the read-write key can run the same
# script and it changes the data (test_the_refused_writes_are_real_for_the_rw_key).
WRITES: list[tuple[str, str, bool]] = [
    ("cte-delete", "WITH a AS (SELECT 1 AS x) DELETE FROM t", False),
    ("cte-update", "WITH a AS (SELECT 1 AS x) UPDATE t SET label = 'pwned'", False),
    ("cte-insert", f"WITH a AS (SELECT 1 AS x) INSERT INTO t VALUES {ROW_9}", False),
    ("explain-delete", "EXPLAIN DELETE FROM t", False),
    ("explain-analyze-delete", "EXPLAIN ANALYZE DELETE FROM t WHERE id = 1", False),
    ("explain-cte-delete", "EXPLAIN WITH a AS (SELECT 1 AS x) DELETE FROM t", False),
    ("select-then-delete", "SELECT 1; DELETE FROM t", True),
    ("select-then-delete-semicolon", "SELECT id FROM t;\nDELETE FROM t;", True),
    ("select-then-drop", "SELECT * FROM t; DROP TABLE t", True),
    ("explain-select-then-delete", "EXPLAIN SELECT 1; DELETE FROM t", True),
    # The first statement would fail if it ran: a 403 shows that nothing ran.
    ("failing-select-then-delete", "SELECT * FROM no_such_table; DELETE FROM t", False),
    ("insert-then-select", f"INSERT INTO t VALUES {ROW_9}; SELECT 1", True),
    ("comment-mixed-case", "/* x */ wItH a AS (SELECT 1 AS x) dElEtE FROM t", False),
    ("whitespace", "\n\twith a as (select 1 as x)\n\tdelete\n\t\tfrom t\n", False),
    ("line-comment", "-- only a comment\nDELETE FROM t", True),
    ("block-comment-inside", "DELETE /* SELECT */ FROM t", True),
    ("delete", "DELETE FROM t WHERE id = 1", True),
    ("update", "UPDATE t SET label = 'pwned' WHERE id = 1", True),
    ("insert", f"INSERT INTO t VALUES {ROW_9}", True),
    ("replace-into", "REPLACE INTO t VALUES (1, '[0,0,0,1]', 'pwned', 1999)", True),
    ("create-table", "CREATE TABLE u (id BIGINT PRIMARY KEY, feature VECTOR(4))", True),
    ("drop-table", "DROP TABLE t", True),
    ("set-system-variable", "SET memory_limit = '1TB'", False),
    ("set-session-variable", "SET @@autocommit = 0", False),
    ("set-variable-then-delete", "SET @v = 1; DELETE FROM t WHERE id = @v", True),
    ("alter-rename", "ALTER TABLE t RENAME TO u", False),
    ("rename-table", "RENAME TABLE t TO u", False),
    ("insert-select", "INSERT INTO t SELECT id + 10, feature, label, year FROM t", True),
    ("dml-in-a-select-cte", "WITH d AS (DELETE FROM t RETURNING id) SELECT * FROM d", False),
    ("select-into", "SELECT * INTO u FROM t", False),
    ("truncate", "TRUNCATE TABLE t", False),
    ("alter", "ALTER TABLE t ADD COLUMN z BIGINT", False),
    ("pragma", "PRAGMA version", False),
]

# Reads the read-only key may run, and the rows they answer over the seeded data.
READS: list[tuple[str, str, list[list[Any]] | None]] = [
    ("cte", "WITH cats AS (SELECT id FROM t WHERE label = 'cat') SELECT COUNT(*) FROM cats",
     [[2]]),
    ("union", "SELECT id FROM t WHERE id = 1 UNION ALL SELECT id FROM t WHERE id = 2 "
     "ORDER BY id", [[1], [2]]),
    ("show-tables", "SHOW TABLES", [["t"]]),
    ("describe", "DESCRIBE t", None),
    ("explain-select", "EXPLAIN SELECT * FROM t WHERE label = 'cat'", None),
    ("vector-search",
     "SELECT id FROM t ORDER BY DOT_PRODUCT(feature, '[1,0,0,0]') DESC LIMIT 2", [[1], [3]]),
    ("script-of-reads", "SELECT 1; SELECT COUNT(*) FROM t", [[4]]),
    ("scalar-subquery", "SELECT (SELECT COUNT(*) FROM t) AS n", [[4]]),
    # User variables live for one request's script: setting one changes nothing stored.
    ("set-variable", "SET @n = (SELECT COUNT(*) FROM t); SELECT @n + 1 AS n", [[5]]),
]


def make_settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, load_featurizer=False, api_key="rw-key",  # type: ignore[call-arg]
                    read_only_api_key="ro-key", _env_file=None)


def seed(client: TestClient) -> None:
    """Collection `t`: 4-d cosine, label/year columns, ids 1..4 (with the rw key)."""
    for name in ("t", "u"):  # `u`: what a test's CREATE TABLE may have left
        assert client.delete(f"/v1/collections/{name}", headers=RW).status_code in (200, 404)
    seed_t(client, RW)


@contextmanager
def seeded_app(data_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(data_dir))) as client:
        seed(client)
        yield client


def rows(client: TestClient, sql: str) -> Any:
    response = client.post("/v1/query", headers=RW, json={"sql": sql})
    return response.status_code, response.json().get("rows")


def snapshot(client: TestClient) -> Any:
    """The data as the read-write key sees it: tables, row count, every row's metadata."""
    info = client.get("/v1/collections/t", headers=RW)
    return (rows(client, "SHOW TABLES"), rows(client, "SELECT COUNT(*) FROM t"),
            rows(client, "SELECT id, label, year FROM t ORDER BY id"),
            (info.status_code, info.json().get("count")))


def run_sql(client: TestClient, via: str, sql: str, headers: dict[str, str]) -> Any:
    if via == "POST":
        return client.post("/v1/query", headers=headers, json={"sql": sql})
    return client.get("/v1/query", headers=headers, params={"q": sql})


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Any]]:
    with seeded_app(tmp_path_factory.mktemp("readonly-sql") / "data") as client:
        before = snapshot(client)
        assert before == (
            (200, [["t"]]), (200, [[4]]),
            (200, [[1, "cat", 2010], [2, "dog", 2020], [3, "cat", 2021], [4, None, None]]),
            (200, 4))
        yield client, before


@pytest.mark.parametrize("via", ["POST", "GET"])
@pytest.mark.parametrize("sql", [sql for _, sql, _ in WRITES], ids=[n for n, _, _ in WRITES])
def test_read_only_key_cannot_write_through_sql(shared, via, sql):
    client, before = shared
    response = run_sql(client, via, sql, RO)
    assert response.status_code == 403, (via, sql, response.status_code, response.text)
    assert response.json()["error"] == "forbidden", response.text
    assert snapshot(client) == before


@pytest.mark.parametrize("via", ["POST", "GET"])
@pytest.mark.parametrize(("sql", "expected"), [(sql, rows) for _, sql, rows in READS],
                         ids=[n for n, _, _ in READS])
def test_read_only_key_can_read_through_sql(shared, via, sql, expected):
    client, before = shared
    response = run_sql(client, via, sql, RO)
    assert response.status_code == 200, (via, sql, response.text)
    body = response.json()
    if expected is not None:
        assert body["rows"] == expected, body
    else:
        assert body["rows"], body
    assert snapshot(client) == before


def test_read_only_key_details(shared):
    client, before = shared
    described = run_sql(client, "POST", "DESCRIBE t", RO).json()["rows"]
    assert [row[0] for row in described] == ["id", "feature", "label", "year"]
    plan = run_sql(client, "GET", "EXPLAIN SELECT id FROM t ORDER BY id <*> '[1,0,0,0]' DESC "
                   "LIMIT 1", RO)
    assert plan.status_code == 200 and plan.json()["columns"] == ["plan"], plan.text
    bound = client.post("/v1/query", headers=RO, json={
        "sql": "SELECT id FROM t WHERE id = ?", "params": [2]})
    assert bound.status_code == 200 and bound.json()["rows"] == [[2]], bound.text
    # Neither a bad key nor no key reaches the SQL at all.
    for headers in ({}, {"X-API-Key": "wrong-key"}):
        for via in ("POST", "GET"):
            response = run_sql(client, via, "DELETE FROM t", headers)
            assert response.status_code == 401, response.text
            assert response.json()["error"] == "unauthorized"
    assert snapshot(client) == before


EFFECTIVE = [(name, sql) for name, sql, effective in WRITES if effective]


@pytest.fixture(scope="module")
def writable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """An app of its own for the read-write key's real writes (reseeded by each test)."""
    with seeded_app(tmp_path_factory.mktemp("rw-sql") / "data") as client:
        yield client


@pytest.mark.parametrize("sql", [sql for _, sql in EFFECTIVE], ids=[n for n, _ in EFFECTIVE])
def test_the_refused_writes_are_real_for_the_rw_key(writable, sql):
    seed(writable)
    before = snapshot(writable)
    response = run_sql(writable, "POST", sql, RW)
    assert response.status_code == 200, (sql, response.text)
    assert snapshot(writable) != before, f"{sql!r} changed nothing for the rw key"


CTE_WRAPPED = [sql for name, sql, _ in WRITES
               if name in ("cte-delete", "cte-update", "cte-insert", "comment-mixed-case",
                           "whitespace", "dml-in-a-select-cte")]


@pytest.mark.parametrize("sql", CTE_WRAPPED)
def test_dml_with_a_cte_is_refused_for_every_key(writable, sql):
    """A CTE before (or DML inside) a statement is not silently dropped: it is refused."""
    seed(writable)
    before = snapshot(writable)
    response = run_sql(writable, "POST", sql, RW)
    assert response.status_code == 400 and response.json()["error"] == "query_error", sql
    assert snapshot(writable) == before


def test_rw_key_writes_through_post_and_get(writable):
    client = writable
    seed(client)
    deleted = run_sql(client, "POST", "DELETE FROM t WHERE id = 4", RW)
    assert deleted.status_code == 200 and deleted.json()["rows"] == [[1]], deleted.text
    updated = run_sql(client, "GET", "UPDATE t SET label = 'pwned' WHERE id = 1", RW)
    assert updated.status_code == 200 and updated.json()["rows"] == [[1]], updated.text
    inserted = run_sql(client, "POST", f"INSERT INTO t VALUES {ROW_9}", RW)
    assert inserted.status_code == 200, inserted.text
    assert rows(client, "SELECT id, label FROM t ORDER BY id") == (
        200, [[1, "pwned"], [2, "dog"], [3, "cat"], [9, "pwned"]])
    assert client.get("/v1/collections/t", headers=RW).json()["count"] == 4
