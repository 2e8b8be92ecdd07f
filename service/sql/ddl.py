"""DDL and DML: CREATE/DROP TABLE, SHOW TABLES, DESCRIBE, INSERT/REPLACE, UPDATE, DELETE."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlglot import exp

from service.catalog_values import QueryResult
from service.duck_values import first_row, quote
from service.errors import InvalidInput, QueryError
from service.index_protocol import METRICS
from service.limits import Watch
from service.sql.dialect import error_at, parse_script, to_duckdb
from service.sql.vectors import Context, as_float32, bind_parameters, eval_vector

if TYPE_CHECKING:
    from service.collections import CollectionStore


def _result(columns: list[str], types: list[str], rows: list[list[Any]]) -> QueryResult:
    return QueryResult(columns, types, rows)


def _affected(n: int) -> QueryResult:
    return _result(["rows_affected"], ["BIGINT"], [[int(n)]])


def reparse_replace(stmt: exp.Command) -> exp.Expr:
    """`REPLACE INTO ...` (SingleStore upsert) parsed as an INSERT marked replace."""
    rest = stmt.expression
    text = "INSERT " + (rest.name if isinstance(rest, exp.Expr) else str(rest or ""))
    parsed = parse_script(text)
    if len(parsed) != 1 or not isinstance(parsed[0], exp.Insert):
        raise error_at("REPLACE must be REPLACE INTO table [(columns)] VALUES (...)", stmt)
    parsed[0].meta["replace"] = True
    return parsed[0]


def execute_other(catalog: CollectionStore, stmt: exp.Expr, params: Any, positional: list[int],
                  watch: Watch | None = None) -> Any:
    from service.sql.executor import check_statement

    if isinstance(stmt, exp.Create):
        return create_table(catalog, stmt)
    if isinstance(stmt, exp.Drop):
        return drop_table(catalog, stmt)
    if isinstance(stmt, exp.Show):
        if str(stmt.name).upper() != "TABLES":
            raise error_at("only SHOW TABLES is supported", stmt)
        names = [[info.name] for info in catalog.list_collections()]
        return _result(["table"], ["VARCHAR"], names)
    if isinstance(stmt, exp.Describe) and isinstance(stmt.this, exp.Table):
        return describe(catalog, stmt.this)
    if isinstance(stmt, exp.Insert | exp.Update | exp.Delete):
        check_statement(stmt, catalog)
        with catalog.write_order():
            ctx = Context(catalog, catalog.reader(), watch=watch)
            from service.sql.executor import run_subquery

            ctx.run_subquery = run_subquery
            try:
                bind_parameters(stmt, params, ctx, positional)
                if isinstance(stmt, exp.Insert):
                    return insert(catalog, stmt, ctx)
                if isinstance(stmt, exp.Delete):
                    return delete(catalog, stmt, ctx)
                return update(catalog, stmt, ctx)
            finally:
                ctx.cleanup()
    raise error_at(
        f"unsupported statement {type(stmt).__name__.upper()}; supported: SELECT, EXPLAIN, "
        "CREATE TABLE, DROP TABLE, SHOW TABLES, DESCRIBE, INSERT, REPLACE, UPDATE, DELETE",
        stmt,
    )


def create_table(catalog: CollectionStore, stmt: exp.Create) -> Any:
    schema = stmt.this
    if str(stmt.args.get("kind", "")).upper() != "TABLE" or not isinstance(schema, exp.Schema):
        raise error_at("only CREATE TABLE name (columns...) is supported", stmt)
    table = schema.this
    if not isinstance(table, exp.Table) or table.args.get("db"):
        raise error_at("CREATE TABLE needs a plain table name", stmt)
    name = table.name
    vector: tuple[str, int, str] | None = None
    columns: dict[str, str] = {}
    has_id = False
    for col in schema.expressions:
        if not isinstance(col, exp.ColumnDef) or not isinstance(col.kind, exp.DataType):
            raise error_at("expected a column definition: name TYPE", col)
        cname, kind = col.name, col.kind
        if kind.is_type(exp.DType.VECTOR):
            if vector is not None:
                raise error_at("a table holds exactly one VECTOR column", col)
            args = kind.expressions
            dim = _vector_dim(args, col)
            dtype = "float16" if len(args) > 2 and args[2].name.upper() == "F16" else "float32"
            if args and isinstance(args[0], exp.DataType) and not args[0].is_type(
                exp.DType.FLOAT
            ):
                raise error_at("VECTOR element type must be F32 or F16", col)
            vector = (cname, dim, dtype)
        elif cname.lower() == "id":
            if not kind.is_type(exp.DType.BIGINT, exp.DType.INT):
                raise error_at("the id column must be BIGINT", col)
            has_id = True
        else:
            columns[cname] = kind.this.name
    if vector is None:
        raise error_at("a table needs one column of type VECTOR(d) or VECTOR(d, F16)", stmt)
    if not has_id:
        raise error_at("a table needs an `id BIGINT PRIMARY KEY` column", stmt)
    if stmt.args.get("exists") and catalog.resolve(name) is not None:
        return _affected(0)
    metric = _metric_option(stmt)
    try:
        catalog.create_collection(name, vector[1], metric, vector[2], columns,
                                  vector_column=vector[0])
    except InvalidInput as exc:
        raise error_at(exc.message, stmt) from exc
    return _affected(0)


def _metric_option(stmt: exp.Create) -> str:
    """`COMMENT = 'metric=cosine'` picks the index metric; SQL-made tables default to dot."""
    props = stmt.args.get("properties")
    for prop in props.expressions if props is not None else []:
        if isinstance(prop, exp.SchemaCommentProperty):
            text = prop.this.name.strip().lower().replace(" ", "")
            if text.startswith("metric="):
                metric = text.split("=", 1)[1]
                if metric not in METRICS:
                    raise error_at(f"metric must be one of {', '.join(METRICS)}", prop)
                return metric
    return "dot"


def _vector_dim(args: list[exp.Expr], col: exp.Expr) -> int:
    size = args[1] if len(args) > 1 else (args[0] if args else None)
    if isinstance(size, exp.DataTypeParam):
        size = size.this
    try:
        dim = int(str(size.name if size is not None else ""))
    except ValueError:
        raise error_at("VECTOR needs a dimension: VECTOR(d) or VECTOR(d, F16)", col) from None
    if dim <= 0:
        raise error_at("VECTOR dimension must be positive", col)
    return dim


def drop_table(catalog: CollectionStore, stmt: exp.Drop) -> Any:
    if str(stmt.args.get("kind", "")).upper() != "TABLE":
        raise error_at("only DROP TABLE is supported", stmt)
    tables = list(stmt.args.get("tables") or []) or [stmt.this]
    for table in tables:
        if not isinstance(table, exp.Table) or table.args.get("db"):
            raise error_at("DROP TABLE takes plain table names", stmt)
        canonical = catalog.resolve(table.name)
        if canonical is None:
            if stmt.args.get("exists"):
                continue
            raise error_at(f"unknown table {table.name!r}", table)
        catalog.drop_collection(canonical)
    return _affected(0)


def describe(catalog: CollectionStore, table: exp.Table) -> Any:
    canonical = catalog.resolve(table.name)
    if canonical is None:
        raise error_at(f"unknown table {table.name!r}", table)
    info = catalog.get_collection(canonical)
    vec_type = f"VECTOR({info.dim}{', F16' if info.dtype == 'float16' else ''})"
    rows = [["id", "BIGINT", "PRI"], [info.vector_column, vec_type, ""]]
    rows += [[c, t, ""] for c, t in info.columns.items()]
    return _result(["Field", "Type", "Key"], ["VARCHAR"] * 3, rows)


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


def insert(catalog: CollectionStore, stmt: exp.Insert, ctx: Context) -> Any:
    target = stmt.this
    names: list[str] | None = None
    if isinstance(target, exp.Schema):
        names = [c.name for c in target.expressions]
        target = target.this
    coll = catalog.collection(target.name)
    rec = coll.record
    if names is None:
        names = ["id", rec.vector_column, *rec.columns]
    lowered = {c.lower(): c for c in ["id", rec.vector_column, *rec.columns]}
    for n in names:
        if n.lower() not in lowered:
            raise error_at(f"unknown column {n!r} in table {rec.name!r}", stmt)
    names = [lowered[n.lower()] for n in names]
    if "id" not in names or rec.vector_column not in names:
        raise error_at(f"INSERT must give id and {rec.vector_column}", stmt)
    values = stmt.expression
    if not isinstance(values, exp.Values):
        raise error_at("INSERT supports VALUES (...) rows only", stmt)
    ids: list[int] = []
    vectors: list[np.ndarray] = []
    metadata: list[dict[str, Any]] = []
    for row in values.expressions:
        cells = row.expressions if isinstance(row, exp.Tuple) else [row]
        if len(cells) != len(names):
            raise error_at(f"expected {len(names)} values, got {len(cells)}", row)
        meta: dict[str, Any] = {}
        for name, cell in zip(names, cells, strict=True):
            if name == rec.vector_column:
                vectors.append(as_float32(eval_vector(cell, ctx, rec.dim)))
                continue
            value = _constant(cell, ctx)
            if name == "id":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise error_at("id must be an integer", cell)
                ids.append(value)
            elif rec.columns[name] == "JSON" and isinstance(value, str):
                try:
                    meta[name] = json.loads(value)
                except ValueError as exc:
                    raise error_at(f"column {name!r}: not valid JSON", cell) from exc
            else:
                meta[name] = value
        metadata.append(meta)
    if len(set(ids)) != len(ids) and not stmt.meta.get("replace"):
        raise error_at("duplicate id in INSERT; use REPLACE INTO to upsert", stmt)
    try:
        written = catalog.upsert(rec.name, np.array(ids, dtype=np.int64), np.stack(vectors),
                                 metadata, replace=bool(stmt.meta.get("replace")))
    except InvalidInput as exc:
        raise QueryError(exc.message, position=error_at("", stmt).position) from exc
    return _affected(written)


def _matching_ids(ctx: Context, table: exp.Table, where: exp.Expr | None) -> np.ndarray:
    query = exp.select(exp.column("id", table=table.alias_or_name)).from_(table.copy())
    if where is not None:
        query.set("where", where.copy())
    with ctx.catalog.reading():
        return ctx.subquery_ids(query)


def delete(catalog: CollectionStore, stmt: exp.Delete, ctx: Context) -> Any:
    table = stmt.this
    if not isinstance(table, exp.Table):
        raise error_at("DELETE FROM table [WHERE ...]", stmt)
    ids = _matching_ids(ctx, table, stmt.args.get("where"))
    return _affected(catalog.delete(table.name, ids) if len(ids) else 0)


def update(catalog: CollectionStore, stmt: exp.Update, ctx: Context) -> Any:
    table = stmt.this
    if not isinstance(table, exp.Table) or stmt.args.get("from_") or stmt.args.get("joins"):
        raise error_at("UPDATE table SET column = value [WHERE ...] (one table)", stmt)
    coll = catalog.collection(table.name)
    rec = coll.record
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
        return _affected(0)
    sets = ", ".join(
        f"{quote(a.this.name)} = CAST(({to_duckdb(a.expression)}) AS {rec.columns[a.this.name]})"
        for a in stmt.expressions
    )
    used = {str(p.this) for a in stmt.expressions for p in a.find_all(exp.Placeholder)}
    values = {k: v for k, v in ctx.bound.items() if k in used}
    return _affected(catalog.update_metadata(rec.name, ids, sets, values, ctx.watch))
