"""SingleStore's own vector examples and the MemSQL talk's DDL and query, verbatim over HTTP,
each answer checked against numpy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api_support import make_client

# SingleStore's "Working with Vector Data" example, as its documentation writes it.
COMMENTS_DDL = """CREATE TABLE comments(id INT NOT NULL PRIMARY KEY,
    comment TEXT,
    comment_embedding VECTOR(4) NOT NULL,
    category VARCHAR(256));"""
COMMENTS_INSERT = """INSERT INTO comments VALUES
 (1, "The cafeteria in building 35 has a great salad bar",
  '[0.45, 0.55, 0.495, 0.5]',
  "Food"),
 (2, "I love the taco bar in the B16 cafeteria.",
  '[0.01111, 0.01111, 0.1, 0.999]',
  "Food"),
 (3, "The B24 restaurant salad bar is quite good.",
  '[0.1, 0.8, 0.2, 0.555]',
  "Food");"""
COMMENTS = {1: [0.45, 0.55, 0.495, 0.5], 2: [0.01111, 0.01111, 0.1, 0.999],
            3: [0.1, 0.8, 0.2, 0.555]}
QUERY_VEC = [0.44, 0.554, 0.34, 0.62]
SET_QUERY_VEC = "SET @query_vec = ('[0.44, 0.554, 0.34, 0.62]'):>VECTOR(4);"
TOP_K = """SELECT id, comment, category,
    comment_embedding <*> @query_vec AS score
FROM comments
ORDER BY score DESC
LIMIT 2;"""
RANGE = """SELECT id, comment, category,
    comment_embedding <*> @query_vec AS score
FROM comments
WHERE score > 0.7
ORDER BY score DESC;"""

# The MemSQL talk (../shared/seeds/000_0cdbd56a74af7f9b.txt), slide 11, verbatim.
FEATURES_DDL = ("CREATE TABLE features ( id bigint(11) NOT NULL AUTO_INCREMENT, image "
                "binary(4096) DEFAULT NULL, KEY id (id)USING CLUSTERED COLUMNSTORE )")


def sql(client: TestClient, text: str, params: Any = None, status: int = 200) -> Any:
    body: dict[str, Any] = {"sql": text}
    if params is not None:
        body["params"] = params
    r = client.post("/v1/query", json=body)
    assert r.status_code == status, r.text
    return r.json()


@pytest.fixture()
def client(tmp_path: Path) -> TestClient:
    with make_client(tmp_path) as c:
        yield c


@pytest.fixture()
def comments(client: TestClient) -> TestClient:
    sql(client, COMMENTS_DDL)
    assert sql(client, COMMENTS_INSERT)["rows"] == [[3]]
    return client


def dots(query: list[float]) -> dict[int, float]:
    q = np.asarray(query, np.float32).astype(np.float64)
    return {i: float(np.asarray(v, np.float32).astype(np.float64) @ q)
            for i, v in COMMENTS.items()}


def test_documentation_top_k_with_a_variable(comments: TestClient) -> None:
    got = sql(comments, SET_QUERY_VEC + "\n" + TOP_K)
    assert got["columns"] == ["id", "comment", "category", "score"]
    ref = sorted(dots(QUERY_VEC).items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    assert [r[0] for r in got["rows"]] == [i for i, _ in ref]
    np.testing.assert_allclose([r[3] for r in got["rows"]], [s for _, s in ref], rtol=1e-6)
    assert got["rows"][0][1:3] == ["The cafeteria in building 35 has a great salad bar", "Food"]


def test_documentation_range_with_an_alias_in_where(comments: TestClient) -> None:
    got = sql(comments, SET_QUERY_VEC + "\n" + RANGE)
    ref = sorted(((i, s) for i, s in dots(QUERY_VEC).items() if s > 0.7),
                 key=lambda kv: (-kv[1], kv[0]))
    assert [r[0] for r in got["rows"]] == [i for i, _ in ref]
    assert len(ref) == 2  # the example keeps two of three
    # The alias became an index range search, not a row-by-row scan.
    plan = sql(comments, SET_QUERY_VEC + "EXPLAIN " + RANGE.replace("ORDER BY score DESC", ""))
    assert "exact range on collection comments" in plan["explain"]
    assert "threshold: score > 0.7" in plan["explain"]


def test_declared_order_everywhere(comments: TestClient) -> None:
    got = sql(comments, "SELECT * FROM comments ORDER BY id")
    assert got["columns"] == ["id", "comment", "comment_embedding", "category"]
    assert got["types"][2] == "VECTOR(4)"
    for row in got["rows"]:
        # JSON arrays of the stored float32 values, printed short enough to read back.
        np.testing.assert_array_equal(np.asarray(row[2], np.float32),
                                      np.asarray(COMMENTS[row[0]], np.float32))
    assert got["rows"][0][2] == [0.45, 0.55, 0.495, 0.5]
    desc = sql(comments, "DESCRIBE comments")
    assert [r[0] for r in desc["rows"]] == ["id", "comment", "comment_embedding", "category"]
    assert [r[1] for r in desc["rows"]] == ["BIGINT", "VARCHAR", "VECTOR(4)", "VARCHAR"]
    info = comments.get("/v1/collections/comments").json()
    assert info["column_order"] == ["id", "comment", "comment_embedding", "category"]
    assert list(info["columns"]) == ["comment", "category"]
    # REST get is unchanged: the vector as numbers, metadata by name.
    vec = comments.get("/v1/collections/comments/vectors/1").json()
    np.testing.assert_allclose(vec["vector"], COMMENTS[1], rtol=1e-6)


def test_vector_functions_and_packed_bytes_keep_working(comments: TestClient) -> None:
    got = sql(comments, "SELECT HEX(comment_embedding) AS h, VECTOR_NUM_ELEMENTS("
                        "comment_embedding), JSON_ARRAY_UNPACK(comment_embedding) AS j "
                        "FROM comments WHERE id = 1")
    packed = np.asarray(COMMENTS[1], "<f4").tobytes()
    assert got["columns"] == ["h", "VECTOR_NUM_ELEMENTS(comment_embedding)", "j"]
    assert got["rows"] == [[packed.hex().upper(), 4, COMMENTS[1]]]
    # A cast to BLOB keeps the packed bytes; to JSON or text, the array.
    got = sql(comments, "SELECT comment_embedding :> BLOB AS b, comment_embedding :> JSON AS j"
                        " FROM comments WHERE id = 1")
    assert got["rows"] == [["0x" + packed.hex(), COMMENTS[1]]]


def test_casts_and_variables(comments: TestClient) -> None:
    got = sql(comments, "SET @v = '[1, 2, 3, 4]' :> VECTOR(4), @n = 2 :> BIGINT; "
                        "SELECT @v AS v, @n + 1 AS n, '7' :> INT AS i, 3 :> TEXT AS t")
    assert got["rows"] == [[[1.0, 2.0, 3.0, 4.0], 3, 7, "3"]]
    assert got["types"][0] == "VECTOR(4)"
    # `!:>` gives NULL where `:>` refuses.
    assert sql(comments, "SELECT '[1, 2]' !:> VECTOR(4) AS v")["rows"] == [[None]]
    err = sql(comments, "SELECT '[1, 2]' :> VECTOR(4)", status=400)
    assert err["error"] == "query_error"
    assert "cannot cast a vector of 2 elements to VECTOR(4)" in err["message"]
    assert err["position"] == {"line": 1, "column": 8}
    err = sql(comments, "SET @q = '[1, 2, 3]' :> VECTOR(3); "
                        "SELECT id FROM comments ORDER BY comment_embedding <*> @q LIMIT 1",
              status=400)
    assert "3 elements" in err["message"] and "VECTOR(4)" in err["message"]
    err = sql(comments, "SELECT @missing", status=400)
    assert "@missing is not set" in err["message"]
    # A variable lives for one request only.
    sql(comments, "SET @x = 1")
    assert "@x is not set" in sql(comments, "SELECT @x", status=400)["message"]


def test_select_list_aliases_in_group_by_and_having(comments: TestClient) -> None:
    sql(comments, "INSERT INTO comments VALUES (4, 'Tea', '[1, 0, 0, 0]', 'Drink')")
    got = sql(comments, "SELECT category AS c, COUNT(*) AS n FROM comments GROUP BY c "
                        "HAVING n > 1")
    assert got["rows"] == [["Food", 3]]
    # A table column wins over an alias of the same name, as in SingleStore.
    got = sql(comments, "SELECT id, 0 AS category FROM comments WHERE category = 'Drink'")
    assert got["rows"] == [[4, 0]]


def test_insert_select_copies_vectors_and_is_searchable_at_once(comments: TestClient) -> None:
    sql(comments, "CREATE TABLE picked (id BIGINT PRIMARY KEY, v VECTOR(4), note TEXT)")
    got = sql(comments, "INSERT INTO picked SELECT id, comment_embedding, category FROM "
                        "comments WHERE comment_embedding <*> '[0, 0, 0, 1]' > 0.5")
    ref = [i for i, v in COMMENTS.items() if np.float32(v[3]) > 0.5]
    assert got["rows"] == [[len(ref)]]
    top = sql(comments, "SELECT id FROM picked ORDER BY v <*> '[0, 0, 0, 1]' DESC LIMIT 5")
    assert sorted(r[0] for r in top["rows"]) == ref
    # REPLACE ... SELECT upserts; INSERT ... SELECT of existing ids is refused, atomically.
    sql(comments, "REPLACE INTO picked SELECT id, comment_embedding, 'again' FROM comments")
    rows = sql(comments, "SELECT id, note FROM picked ORDER BY id")["rows"]
    assert rows == [[1, "again"], [2, "again"], [3, "again"]]
    sql(comments, "DELETE FROM picked WHERE id = 3")
    r = comments.post("/v1/query", json={"sql": "INSERT INTO picked SELECT id, comment_embedding,"
                                              " 'x' FROM comments"})
    assert r.status_code == 409
    assert sql(comments, "SELECT COUNT(*) FROM picked")["rows"] == [[2]]
    # A vector of the wrong length is refused in our words.
    sql(comments, "CREATE TABLE small (id BIGINT PRIMARY KEY, v VECTOR(2))")
    err = sql(comments, "INSERT INTO small SELECT id, comment_embedding FROM comments",
              status=400)
    assert "4 elements for VECTOR(2)" in err["message"]


def test_alter_table_and_rename(comments: TestClient) -> None:
    sql(comments, "ALTER TABLE comments ADD COLUMN stars INT")
    sql(comments, "UPDATE comments SET stars = id * 2")
    sql(comments, "ALTER TABLE comments RENAME COLUMN stars TO rating")
    sql(comments, "ALTER TABLE comments DROP COLUMN comment")
    sql(comments, "ALTER TABLE comments RENAME TO remarks")
    sql(comments, "RENAME TABLE remarks TO notes")
    got = sql(comments, "SELECT * FROM notes ORDER BY id")
    assert got["columns"] == ["id", "comment_embedding", "category", "rating"]
    assert [r[3] for r in got["rows"]] == [2, 4, 6]
    top = sql(comments, SET_QUERY_VEC + TOP_K.replace("comment, ", "").replace(
        "comments", "notes"))
    assert [r[0] for r in top["rows"]] == [1, 3]
    assert comments.get("/v1/collections/comments").status_code == 404
    for statement, words in [
        ("ALTER TABLE notes DROP COLUMN comment_embedding", "vector column"),
        ("ALTER TABLE notes DROP COLUMN id", "id column"),
        ("ALTER TABLE notes MODIFY comment_embedding VECTOR(8)", "vector column"),
        ("ALTER TABLE notes ADD COLUMN v2 VECTOR(4)", "exactly one vector column"),
    ]:
        assert words in sql(comments, statement, status=400)["message"]


def test_memsql_talk_ddl_and_query_verbatim(client: TestClient) -> None:
    assert sql(client, FEATURES_DDL)["rows"] == [[0]]
    desc = sql(client, "DESCRIBE features")["rows"]
    assert desc == [["id", "BIGINT", "NO", "PRI", None, "auto_increment"],
                    ["image", "BINARY(4096)", "NO", "", None, ""]]
    rng = np.random.default_rng(11)
    base = rng.standard_normal((30, 1024)).astype(np.float32)
    base[10:14] = base[3] + 0.05 * rng.standard_normal((4, 1024)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    values = ", ".join(f"(0x{v.astype('<f4').tobytes().hex()})" for v in base)
    got = sql(client, f"INSERT INTO features (image) VALUES {values}")
    assert got["columns"] == ["rows_affected", "last_insert_id"]
    assert got["rows"] == [[30, 1]]  # AUTO_INCREMENT counts from 1
    assert sql(client, "INSERT INTO features (image) VALUES (0x"
               + base[0].astype("<f4").tobytes().hex() + "); SELECT LAST_INSERT_ID() AS last"
               )["rows"] == [[31]]
    query = base[3]
    hex_query = query.astype("<f4").tobytes().hex()
    got = sql(client, f"SELECT id FROM features WHERE DOT_PRODUCT(image, 0x{hex_query}) > 0.9")
    stored = np.vstack([base, base[:1]]).astype(np.float64)
    ref = sorted(int(i) + 1 for i in np.flatnonzero(stored @ query.astype(np.float64) > 0.9))
    assert sorted(r[0] for r in got["rows"]) == ref
    assert len(ref) == 5  # the row itself and its four near-duplicates
    # A binary column projects packed bytes, as in SingleStore.
    row = sql(client, "SELECT image FROM features WHERE id = 4")["rows"][0][0]
    assert row == "0x" + hex_query


@pytest.mark.parametrize("ddl", [
    "CREATE TABLE t (id BIGINT, v VECTOR(4), SHARD KEY (id), SORT KEY (id))",
    "CREATE TABLE t (id BIGINT PRIMARY KEY, v varbinary(16), label varchar(10) DEFAULT NULL)",
    "CREATE TABLE t (id BIGINT, v BLOB COMMENT 'dim=4', PRIMARY KEY (id))",
    "CREATE TABLE t (id int(11) NOT NULL, v VECTOR(4, F16) NOT NULL, "
    "KEY (v) USING CLUSTERED COLUMNSTORE)",
])
def test_memsql_ddl_forms_are_accepted(client: TestClient, ddl: str) -> None:
    sql(client, ddl)
    sql(client, "INSERT INTO t (id, v) VALUES (1, JSON_ARRAY_PACK('[1, 2, 3, 4]'))")
    got = sql(client, "SELECT id, v <*> '[1, 1, 1, 1]' AS s FROM t")
    assert got["rows"] == [[1, 10.0]]


@pytest.mark.parametrize(("ddl", "words"), [
    ("CREATE TABLE t (id BIGINT, v binary(10))", "not a multiple of 4"),
    ("CREATE TABLE t (id BIGINT, v BLOB)", "COMMENT 'dim=N'"),
    ("CREATE TABLE t (id BIGINT, v VECTOR(4), w binary(16))", "metadata columns cannot be"),
    ("CREATE TABLE t (id BIGINT, v VECTOR(4), label TEXT DEFAULT 'x')", "DEFAULT NULL"),
    ("CREATE TABLE t (id BIGINT, v VECTOR(4), n INT AUTO_INCREMENT)", "id column"),
    ("CREATE TABLE t (id BIGINT, v VECTOR(4), KEY (nope))", "unknown column 'nope'"),
    ("CREATE TABLE t (id BIGINT, v VECTOR(4, I8))", "F32, F16 or BF16"),
])
def test_ddl_mistakes_are_clear_400s(client: TestClient, ddl: str, words: str) -> None:
    err = sql(client, ddl, status=400)
    assert err["error"] == "query_error" and words in err["message"]


@pytest.mark.parametrize("statement", [
    "SELECT nosuch FROM comments",
    "SELECT foo(1)",
    "SELECT id FROM comments WHERE category = 1 + 'a'",
    "SELECT CAST(comment AS VECTR) FROM comments",
    "SELECT id FROM comments WHERE DOT_PRODUCT(comment_embedding, comment) > 1",
])
def test_errors_in_our_own_words(comments: TestClient, statement: str) -> None:
    err = sql(comments, statement, status=400)
    for duckdb_words in ("Binder Error", "Catalog Error", "Parser Error", "Did you mean",
                         "Candidate", "ds_", "__"):
        assert duckdb_words not in err["message"], err["message"]


def test_variables_are_bounded(tmp_path: Path) -> None:
    with make_client(tmp_path, sql_max_result_bytes=4096) as c:
        err = sql(c, "SET @a = repeat('x', 3000); SET @b = repeat('y', 3000)", status=400)
        assert err["error"] == "query_resource_limit"
        many = "; ".join(f"SET @v{i} = {i}" for i in range(257))
        assert "at most 256 variables" in sql(c, many, status=400)["message"]


def test_an_alias_with_a_positional_parameter_is_one_parameter(comments: TestClient) -> None:
    got = sql(comments, "SELECT id, comment_embedding <*> ? AS score FROM comments "
                        "WHERE score > ? ORDER BY id", [QUERY_VEC, 0.7])
    assert [r[0] for r in got["rows"]] == sorted(i for i, s in dots(QUERY_VEC).items()
                                                  if s > 0.7)
    plan = sql(comments, "EXPLAIN SELECT id, comment_embedding <*> ? AS score FROM comments "
                         "WHERE score > ?", [QUERY_VEC, 0.7])
    assert "exact range" in plan["explain"]


def test_alias_copies_are_bounded(comments: TestClient) -> None:
    """An alias of a big expression used thousands of times would copy it each time."""
    big = "GREATEST(" + ", ".join(["id"] * 400) + ")"
    uses = " OR ".join(["s = 1"] * 1000)
    err = sql(comments, f"SELECT {big} AS s FROM comments WHERE {uses}", status=400)
    assert err["error"] == "query_too_large" and "aliases" in err["message"]
