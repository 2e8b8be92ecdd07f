"""DML: INSERT and REPLACE (VALUES or SELECT, AUTO_INCREMENT ids), UPDATE and DELETE."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlglot import exp

from service.catalog_values import QueryResult
from service.duck_values import first_row, quote
from service.errors import InvalidInput, QueryError
from service.limits import Watch
from service.sql.dialect import error_at, to_duckdb
from service.sql.names import Resolver
from service.sql.planner import _slow_arg as slow_arg
from service.sql.predict import is_predict, rewrite_predict_slow
from service.sql.vectors import (
    Context,
    Session,
    as_float32,
    eval_vector,
    from_value,
    resolve_vector_casts,
)

if TYPE_CHECKING:
    from service.collections import CollectionStore
    from service.storage import CollectionRecord

# INSERT ... SELECT copies at most this many rows in one (atomic) statement.
MAX_COPY_ROWS = 100_000
FETCH_ROWS = 1024


def execute_dml(catalog: CollectionStore, stmt: exp.Expr, params: Any, positional: list[int],
                watch: Watch | None, session: Session) -> QueryResult:
    """INSERT/REPLACE, UPDATE or DELETE: one write, in the catalog's write order."""
    from service.sql.executor import check_statement, prepare_query, run_subquery

    check_statement(stmt, catalog)
    with catalog.write_order():
        ctx = Context(catalog, catalog.reader(), watch=watch, run_subquery=run_subquery,
                      session=session)
        try:
            prepare_query(stmt, ctx, params, positional)
            if isinstance(stmt, exp.Insert):
                return insert(catalog, stmt, ctx)
            if isinstance(stmt, exp.Delete):
                return delete(catalog, stmt, ctx)
            assert isinstance(stmt, exp.Update)
            return update(catalog, stmt, ctx)
        finally:
            ctx.cleanup()


def _constant(node: exp.Expr, ctx: Context) -> Any:
    if isinstance(node, exp.Paren):
        return _constant(node.this, ctx)
    if isinstance(node, exp.Null):
        return None
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Placeholder):
        return ctx.bound[str(node.this)]
    if isinstance(node, exp.Literal):
        if node.is_string:
            return node.this
        text = str(node.this)
        value: int | float = float(text) if any(c in text for c in ".eE") else int(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise error_at("number out of range", node)
        return value
    if isinstance(node, exp.Neg):
        inner = _constant(node.this, ctx)
        if isinstance(inner, int | float) and not isinstance(inner, bool):
            return -inner
    row = first_row(ctx.cur.execute(
        "SELECT " + to_duckdb(node),
        {str(p.this): ctx.bound[str(p.this)] for p in node.find_all(exp.Placeholder)},
    ))
    return None if row is None else row[0]


def _target_columns(stmt: exp.Insert, rec: CollectionRecord) -> list[str]:
    """The INSERT's column list (declared order when none is given), spelled as stored."""
    target = stmt.this
    given = [c.name for c in target.expressions] if isinstance(target, exp.Schema) else None
    if given is None:
        return list(rec.column_order)
    stored = {c.lower(): c for c in rec.column_order}
    names: list[str] = []
    for name in given:
        if name.lower() not in stored:
            raise error_at(f"unknown column {name!r} in table {rec.name!r}", stmt)
        if stored[name.lower()] in names:
            raise error_at(f"column {name!r} given twice", stmt)
        names.append(stored[name.lower()])
    if rec.vector_column not in names:
        raise error_at(f"INSERT must give the vector column {rec.vector_column}", stmt)
    if "id" not in names and not rec.auto_increment:
        raise error_at("INSERT must give id (the table's id is not AUTO_INCREMENT)", stmt)
    return names


def insert(catalog: CollectionStore, stmt: exp.Insert, ctx: Context) -> QueryResult:
    """INSERT or REPLACE rows given as VALUES or by a query; ids left out (or NULL) of an
    AUTO_INCREMENT table are assigned, the first of them returned as last_insert_id."""
    if stmt.args.get("ignore") or stmt.args.get("conflict") or stmt.args.get("overwrite"):
        raise error_at("INSERT IGNORE, ON DUPLICATE KEY and OVERWRITE are not supported; "
                       "use REPLACE INTO to upsert", stmt)
    replace = str(stmt.args.get("alternative") or "").upper() == "REPLACE"
    table = stmt.this.this if isinstance(stmt.this, exp.Schema) else stmt.this
    rec = catalog.collection(table.name).record
    names = _target_columns(stmt, rec)
    resolve_vector_casts(stmt, ctx, Resolver(stmt, catalog, ctx))
    source = stmt.expression
    if isinstance(source, exp.Values):
        rows = [_values_row(row, names, rec, ctx) for row in source.expressions]
    elif isinstance(source, exp.Query | exp.Subquery):
        rows = _selected_rows(source, names, rec, ctx)
    else:
        raise error_at("INSERT takes VALUES (...) rows or a SELECT", stmt)
    ids: list[int | None] = [row.get("id") for row in rows]
    vectors = [row.pop(rec.vector_column) for row in rows]
    for row in rows:
        row.pop("id", None)
    last_insert_id = None
    missing = [i for i, v in enumerate(ids) if v is None]
    if missing:
        if not rec.auto_increment:
            raise error_at("id must not be NULL (the table's id is not AUTO_INCREMENT)", stmt)
        assigned = catalog.next_ids(rec.name, len(missing))
        if assigned[0] == 0:  # AUTO_INCREMENT counts from 1, as in MySQL
            assigned = np.concatenate([assigned[1:], catalog.next_ids(rec.name, 1)])
        for i, new_id in zip(missing, assigned.tolist(), strict=True):
            ids[i] = new_id
        last_insert_id = int(assigned[0])
    if not rows:
        return QueryResult.affected(0)
    if len(set(ids)) != len(ids) and not replace:
        raise error_at("duplicate id in INSERT; use REPLACE INTO to upsert", stmt)
    try:
        written = catalog.upsert(rec.name, np.array(ids, dtype=np.int64), np.stack(vectors),
                                 rows, replace=replace)
    except InvalidInput as exc:
        raise QueryError(exc.message, position=error_at("", stmt).position) from exc
    if last_insert_id is not None:
        ctx.session.last_insert_id = last_insert_id
    return QueryResult.affected(written, last_insert_id)


def _values_row(row: exp.Expr, names: list[str], rec: CollectionRecord,
                ctx: Context) -> dict[str, Any]:
    cells = row.expressions if isinstance(row, exp.Tuple) else [row]
    if len(cells) != len(names):
        raise error_at(f"expected {len(names)} values ({', '.join(names)}), got {len(cells)}",
                       row)
    out: dict[str, Any] = {}
    for name, cell in zip(names, cells, strict=True):
        if name == rec.vector_column:
            out[name] = as_float32(eval_vector(cell, ctx, rec.dim))
        else:
            out[name] = _cell_value(name, _constant(cell, ctx), rec, cell)
    return out


def _selected_rows(query: exp.Expr, names: list[str], rec: CollectionRecord,
                   ctx: Context) -> list[dict[str, Any]]:
    """The rows of INSERT's query (planned like any query, vector search included)."""
    assert ctx.run_subquery is not None
    with ctx.catalog.reading():
        cur = ctx.run_subquery(ctx, query)
        width = len(cur.description or [])
        if width != len(names):
            raise error_at(f"the SELECT gives {width} columns, but the INSERT takes "
                           f"{len(names)} ({', '.join(names)})", query)
        rows: list[dict[str, Any]] = []
        while batch := cur.fetchmany(FETCH_ROWS):
            if len(rows) + len(batch) > MAX_COPY_ROWS:
                raise error_at(f"INSERT ... SELECT copies at most {MAX_COPY_ROWS} rows at once; "
                               "copy in id ranges (WHERE id BETWEEN ...)", query)
            if ctx.watch is not None:
                ctx.watch.check()
            for values in batch:
                row: dict[str, Any] = {}
                for name, value in zip(names, values, strict=True):
                    if name == rec.vector_column:
                        if value is None:
                            raise error_at(f"the SELECT gives a NULL {name}", query)
                        if isinstance(value, bytearray | memoryview):
                            value = bytes(value)
                        vector = from_value(value, query)
                        if len(vector) != 4 * rec.dim:
                            raise error_at(f"the SELECT gives a vector of {len(vector) // 4} "
                                           f"elements for VECTOR({rec.dim})", query)
                        row[name] = as_float32(vector)
                    else:
                        row[name] = _cell_value(name, value, rec, query)
                rows.append(row)
    return rows


def _cell_value(name: str, value: Any, rec: CollectionRecord, node: exp.Expr) -> Any:
    """A non-vector value for column ``name``: ids as integers (None: to be assigned),
    JSON text parsed for JSON columns."""
    if name == "id":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise error_at("id must be an integer", node)
        return value
    if isinstance(value, Decimal):
        return float(value)
    if rec.columns.get(name) == "JSON" and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise error_at(f"column {name!r}: not valid JSON", node) from exc
    return value


def _matching_ids(ctx: Context, table: exp.Table, where: exp.Expr | None) -> np.ndarray:
    query = exp.select(exp.column("id", table=table.alias_or_name)).from_(table.copy())
    if where is not None:
        query.set("where", where.copy())
    with ctx.catalog.reading():
        return ctx.subquery_ids(query)


def delete(catalog: CollectionStore, stmt: exp.Delete, ctx: Context) -> QueryResult:
    table = stmt.this
    if not isinstance(table, exp.Table):
        raise error_at("DELETE FROM table [WHERE ...]", stmt)
    ids = _matching_ids(ctx, table, stmt.args.get("where"))
    return QueryResult.affected(catalog.delete(table.name, ids) if len(ids) else 0)


def update(catalog: CollectionStore, stmt: exp.Update, ctx: Context) -> QueryResult:
    table = stmt.this
    if not isinstance(table, exp.Table) or stmt.args.get("from_") or stmt.args.get("joins"):
        raise error_at("UPDATE table SET column = value [WHERE ...] (one table)", stmt)
    rec = catalog.collection(table.name).record
    by_lower = {c.lower(): c for c in rec.columns}
    for assignment in stmt.expressions:
        col = assignment.this if isinstance(assignment, exp.EQ) else None
        if isinstance(col, exp.Column) and col.name.lower() in by_lower:
            col.set("this", exp.to_identifier(by_lower[col.name.lower()]))
        if not isinstance(col, exp.Column) or col.name not in rec.columns:
            raise error_at(
                f"UPDATE can set metadata columns only ({', '.join(rec.columns) or 'none'})",
                assignment,
            )
    ids = _matching_ids(ctx, table, stmt.args.get("where"))
    if len(ids) == 0:
        return QueryResult.affected(0)
    for node in [n for a in stmt.expressions for n in a.expression.find_all(exp.Anonymous)]:
        if is_predict(node):  # SET label = PREDICT(m, feature): the row-by-row functions
            rewrite_predict_slow(node, lambda arg: slow_arg(arg, ctx))
    sets = ", ".join(
        f"{quote(a.this.name)} = CAST(({to_duckdb(a.expression)}) AS {rec.columns[a.this.name]})"
        for a in stmt.expressions
    )
    used = {str(p.this) for a in stmt.expressions for p in a.find_all(exp.Placeholder)}
    values = {k: v for k, v in ctx.bound.items() if k in used}
    return QueryResult.affected(catalog.update_metadata(rec.name, ids, sets, values, ctx.watch))
