"""Hypothesis properties of SQL tables declared with their columns in any order: positional and
named INSERT, `SELECT *`, DESCRIBE, search and range with an alias in WHERE, and
`INSERT ... SELECT *`, through Catalog.query (as HTTP POST /v1/sql calls it)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.catalog import Catalog
from service.catalog_values import QueryResult
from service.sql.dialect import Dotsearch

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# Names the generated columns must not take: SQL keywords of either parser (prefixed instead),
# the reserved columns, and the score alias the search statements use.
KEYWORDS = {str(row[0]).upper() for row in
            duckdb.execute("SELECT keyword_name FROM duckdb_keywords()").fetchall()}
KEYWORDS |= {str(word).upper() for word in Dotsearch.Tokenizer.KEYWORDS if " " not in str(word)}
RESERVED = {"id", "rowid", "_thumbnail", "score"}

META_TYPES = ("BIGINT", "DOUBLE", "TEXT", "VARCHAR(20)", "BOOLEAN")
ID_DECLS = ("BIGINT PRIMARY KEY", "INT NOT NULL PRIMARY KEY")

_names = itertools.count()


def fresh_name() -> str:
    return f"t{next(_names)}"


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str  # as declared
    kind: str  # "id", "vector" or one of META_TYPES


@dataclass(frozen=True)
class Schema:
    columns: list[Column]
    dim: int

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def vector(self) -> str:
        return next(c.name for c in self.columns if c.kind == "vector")

    def create(self, table: str) -> str:
        cols = ", ".join(f"{c.name} {c.sql_type}" for c in self.columns)
        return f"CREATE TABLE {table} ({cols})"


def safe_name(raw: str) -> str:
    return "c_" + raw if raw.upper() in KEYWORDS or raw in RESERVED else raw


@st.composite
def schemas(draw: st.DrawFn) -> Schema:
    n_meta = draw(st.integers(0, 4))
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).map(safe_name),
                          min_size=n_meta + 1, max_size=n_meta + 1,
                          unique_by=str.lower))
    dim = draw(st.integers(1, 8))
    columns = [Column("id", draw(st.sampled_from(ID_DECLS)), "id"),
               Column(names[0], f"VECTOR({dim})", "vector")]
    for name in names[1:]:
        kind = draw(st.sampled_from(META_TYPES))
        columns.append(Column(name, kind, kind))
    return Schema(draw(st.permutations(columns)), dim)


def meta_values(kind: str) -> st.SearchStrategy[Any]:
    values: st.SearchStrategy[Any]
    if kind == "BIGINT":
        values = st.integers(-(2**63), 2**63 - 1)
    elif kind == "DOUBLE":
        values = st.floats(allow_nan=False, allow_infinity=False)
    elif kind == "BOOLEAN":
        values = st.booleans()
    else:
        values = st.text(st.characters(codec="utf-8"), max_size=20)
    return st.none() | values


@st.composite
def tables(draw: st.DrawFn, int_vectors: bool = False) -> tuple[Schema, list[dict[str, Any]]]:
    """A schema and its rows: each row maps every column name to the value inserted."""
    schema = draw(schemas())
    n = draw(st.integers(1, 25))
    ids = draw(st.lists(st.integers(0, 2**31 - 1) | st.integers(0, 60), min_size=n,
                        max_size=n, unique=True))
    element: st.SearchStrategy[float] = (
        st.integers(-6, 6).map(lambda v: v / 2) if int_vectors
        else st.floats(-1e30, 1e30, allow_nan=False) | st.integers(-9, 9).map(float))
    rows = []
    for row_id in ids:
        row: dict[str, Any] = {}
        for c in schema.columns:
            if c.kind == "id":
                row[c.name] = row_id
            elif c.kind == "vector":
                row[c.name] = draw(st.lists(element, min_size=schema.dim, max_size=schema.dim))
            else:
                row[c.name] = draw(meta_values(c.kind))
        rows.append(row)
    return schema, rows


def literal(kind: str, value: Any) -> str:
    """A SQL literal for a value (SingleStore strings: quotes doubled, backslashes escaped)."""
    if value is None:
        return "NULL"
    if kind == "vector":
        return "'" + json.dumps(value) + "'"
    if kind == "BOOLEAN":
        return "TRUE" if value else "FALSE"
    if kind == "DOUBLE":
        return format(value, ".17e")  # a DOUBLE literal, never a rounded DECIMAL one
    if kind in ("id", "BIGINT"):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def values_clause(columns: list[Column], rows: list[dict[str, Any]]) -> str:
    return ", ".join(
        "(" + ", ".join(literal(c.kind, row[c.name]) for c in columns) + ")" for row in rows)


def assert_rows_equal(schema: Schema, got: QueryResult, rows: list[dict[str, Any]]) -> None:
    """`got` is `SELECT * ... ORDER BY id`: declared columns, the inserted values."""
    assert got.columns == schema.names
    assert got.types[schema.names.index(schema.vector)] == f"VECTOR({schema.dim})"
    want = sorted(rows, key=lambda r: r["id"])
    assert len(got.rows) == len(want)
    for got_row, want_row in zip(got.rows, want, strict=True):
        for c, value in zip(schema.columns, got_row, strict=True):
            expected = want_row[c.name]
            if c.kind == "vector":
                assert isinstance(value, list)
                assert all(isinstance(v, float) for v in value)
                np.testing.assert_array_equal(np.array(value, dtype=np.float32),
                                              np.array(expected, dtype=np.float32))
            elif expected is None:
                assert value is None, (c, value)
            else:
                kind_type = {"DOUBLE": float, "BOOLEAN": bool, "TEXT": str,
                             "VARCHAR(20)": str}.get(c.kind, int)
                assert type(value) is kind_type, (c, value)
                assert value == expected, (c, value, expected)


@contextmanager
def created(catalog: Catalog, schema: Schema) -> Iterator[str]:
    """A fresh table of ``schema``, dropped afterwards."""
    name = fresh_name()
    catalog.query(schema.create(name))
    try:
        yield name
    finally:
        catalog.query(f"DROP TABLE {name}")


def half_steps(data: st.DataObject, dim: int) -> np.ndarray:
    """A query of multiples of 0.5: dot products with integer vectors are exact."""
    values = data.draw(st.lists(st.integers(-6, 6), min_size=dim, max_size=dim))
    return np.array(values, dtype=np.float32) / 2


def vectors_of(schema: Schema, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    vecs = np.array([r[schema.vector] for r in rows], dtype=np.float32).reshape(len(rows), -1)
    return ids, vecs


@pytest.fixture
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    cat = Catalog(tmp_path_factory.mktemp("sqlorder"), backend="cpu")
    yield cat
    cat.close()


@SETTINGS
@given(table=tables())
def test_positional_insert_select_star_and_describe_follow_declared_order(
    catalog: Catalog, table: tuple[Schema, list[dict[str, Any]]]
) -> None:
    schema, rows = table
    with created(catalog, schema) as name:
        res = catalog.query(f"INSERT INTO {name} VALUES {values_clause(schema.columns, rows)}")
        assert res.rows == [[len(rows)]]
        assert_rows_equal(schema, catalog.query(f"SELECT * FROM {name} ORDER BY id"), rows)
        assert [r[0] for r in catalog.query(f"DESCRIBE {name}").rows] == schema.names


@SETTINGS
@given(table=tables(int_vectors=True), data=st.data())
def test_topk_search_equals_numpy_with_ties_by_id(
    catalog: Catalog, table: tuple[Schema, list[dict[str, Any]]], data: st.DataObject
) -> None:
    schema, rows = table
    ids, vecs = vectors_of(schema, rows)
    q = half_steps(data, schema.dim)
    k = data.draw(st.integers(1, len(rows) + 2))
    with created(catalog, schema) as name:
        catalog.query(f"INSERT INTO {name} VALUES {values_clause(schema.columns, rows)}")
        res = catalog.query(f"SELECT id, {schema.vector} <*> :q AS score FROM {name} "
                            f"ORDER BY score DESC LIMIT {k}", {"q": q.tolist()})
        assert res.columns == ["id", "score"]
        scores = vecs.astype(np.float64) @ q.astype(np.float64)
        order = np.lexsort((ids, -scores))[:k]
        assert [r[0] for r in res.rows] == ids[order].tolist()
        np.testing.assert_allclose([r[1] for r in res.rows], scores[order], rtol=0, atol=1e-5)


@SETTINGS
@given(table=tables(int_vectors=True), data=st.data())
def test_range_with_score_alias_in_where_equals_numpy(
    catalog: Catalog, table: tuple[Schema, list[dict[str, Any]]], data: st.DataObject
) -> None:
    schema, rows = table
    ids, vecs = vectors_of(schema, rows)
    q = half_steps(data, schema.dim)
    scores = vecs.astype(np.float64) @ q.astype(np.float64)
    # Thresholds at an exact score test the strict `>`; the others fall anywhere.
    th = data.draw(st.sampled_from(sorted(set(scores.tolist())))
                   | st.integers(-80, 80).map(lambda v: v / 4))
    with created(catalog, schema) as name:
        catalog.query(f"INSERT INTO {name} VALUES {values_clause(schema.columns, rows)}")
        res = catalog.query(f"SELECT id, {schema.vector} <*> :q AS score FROM {name} "
                            "WHERE score > :th ORDER BY id", {"q": q.tolist(), "th": th})
        keep = scores > th
        order = np.argsort(ids[keep], kind="stable")
        assert [r[0] for r in res.rows] == ids[keep][order].tolist()
        np.testing.assert_allclose([r[1] for r in res.rows], scores[keep][order],
                                   rtol=0, atol=1e-5)


@SETTINGS
@given(table=tables(), data=st.data())
def test_named_insert_in_any_column_order_round_trips(
    catalog: Catalog, table: tuple[Schema, list[dict[str, Any]]], data: st.DataObject
) -> None:
    schema, rows = table
    # Any order of id, the vector and any subset of the metadata; left-out columns are NULL.
    required = [c for c in schema.columns if c.kind in ("id", "vector")]
    meta = [c for c in schema.columns if c.kind not in ("id", "vector")]
    chosen = data.draw(st.lists(st.sampled_from(meta), unique=True)) if meta else []
    listed = data.draw(st.permutations(required + chosen))
    written = [{c.name: (row[c.name] if c in listed else None) for c in schema.columns}
               for row in rows]
    with created(catalog, schema) as name:
        cols = ", ".join(c.name for c in listed)
        res = catalog.query(f"INSERT INTO {name} ({cols}) VALUES {values_clause(listed, rows)}")
        assert res.rows == [[len(rows)]]
        assert_rows_equal(schema, catalog.query(f"SELECT * FROM {name} ORDER BY id"), written)


@SETTINGS
@given(table=tables())
def test_insert_select_star_copies_every_row(
    catalog: Catalog, table: tuple[Schema, list[dict[str, Any]]]
) -> None:
    schema, rows = table
    source, target = fresh_name(), fresh_name()
    catalog.query(schema.create(source))
    catalog.query(schema.create(target))
    try:
        catalog.query(f"INSERT INTO {source} VALUES {values_clause(schema.columns, rows)}")
        res = catalog.query(f"INSERT INTO {target} SELECT * FROM {source}")
        assert res.rows == [[len(rows)]]
        assert_rows_equal(schema, catalog.query(f"SELECT * FROM {target} ORDER BY id"), rows)
        assert_rows_equal(schema, catalog.query(f"SELECT * FROM {source} ORDER BY id"), rows)
    finally:
        catalog.query(f"DROP TABLE {source}")
        catalog.query(f"DROP TABLE {target}")
