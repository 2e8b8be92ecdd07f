"""Runs SQL scripts: checks each statement, plans vector scopes, executes the rest in DuckDB."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import duckdb
from sqlglot import exp

from cpu_fallback.core import IndexUnavailable
from service.auth import Access
from service.catalog_values import QueryResult
from service.duck_values import json_value, map_duckdb_error
from service.errors import (
    DotsearchError,
    NotReady,
    QueryError,
    QueryResourceLimit,
    QueryTooLarge,
)
from service.limits import Watch
from service.snapshots import SNAPSHOT_ATTEMPTS, ReadSnapshot, StaleSnapshot
from service.sql.access import authorize_script
from service.sql.dialect import error_at, parse_script, to_duckdb
from service.sql.functions import vector_values
from service.sql.guards import check_depth, guard_error, guard_functions
from service.sql.models import execute_model_statement, is_model_statement
from service.sql.names import (
    Resolver,
    expand_aliases,
    expand_stars,
    name_outputs,
    vector_outputs,
)
from service.sql.planner import ScopePlan, plan_select, rewrite_all_slow
from service.sql.predict import check_model_calls
from service.sql.vectors import (
    MAX_VARIABLES,
    Context,
    Session,
    Variable,
    bind_parameters,
    resolve_vector_casts,
)

if TYPE_CHECKING:
    from service.collections import CollectionStore

log = logging.getLogger(__name__)

MAX_RESULT_ROWS = 100_000
FETCH_ROWS = 1024
QUERY_TYPES = (exp.Select, exp.SetOperation)
DENIED_FUNCTION_PREFIXES = ("duckdb_", "pragma_", "read_", "current_setting", "getenv",
                            "glob", "query", "sniff_", "parquet_", "iceberg_", "delta_")


def execute_script(catalog: CollectionStore, sql: str,
                   params: dict[str, Any] | list[Any] | None,
                   access: Access = "write") -> QueryResult:
    """Parse and authorise every statement, then run each in order under the SQL limits;
    the result of the last one."""
    limits = catalog.sql_limits
    if params is not None and not isinstance(params, dict | list | tuple):
        raise QueryError("params must be an object (for :name) or a list (for ?)")
    if isinstance(sql, str) and len(sql) > limits.max_chars:
        raise QueryTooLarge(f"the SQL text has {len(sql)} characters; the limit is "
                            f"{limits.max_chars} (DOTSEARCH_SQL_MAX_CHARS)")
    statements = parse_script(sql, max_tokens=limits.max_tokens)
    authorize_script(statements, access)
    positional = [0]
    session = Session()
    result = QueryResult([], [], [])
    for number, stmt in enumerate(statements):

        def reparse(number: int = number) -> exp.Expr:
            return parse_script(sql, max_tokens=limits.max_tokens)[number]

        check_depth(stmt, limits.max_depth)
        if is_model_statement(stmt):
            # Its query runs under the limits; training (bounded by the model limits) after.
            with statement_errors(stmt):
                result = execute_model_statement(catalog, stmt, params, positional, session,
                                                 reparse)
            continue
        with catalog.watchdog.watch(limits, catalog.reader()) as watch, statement_errors(stmt):
            result = execute_statement(catalog, stmt, params, positional, watch, reparse,
                                       session)
    return result


@contextlib.contextmanager
def statement_errors(stmt: exp.Expr) -> Iterator[None]:
    """Every failure of a statement as a DotsearchError (never a traceback to the user)."""
    try:
        yield
    except DotsearchError:
        raise
    except IndexUnavailable as exc:  # a shard down: 503, never a partial answer
        raise NotReady(str(exc)) from exc
    except duckdb.Error as exc:
        raise _duckdb_query_error(exc, stmt) from exc
    except RecursionError as exc:
        raise error_at("statement nested too deeply", stmt) from exc
    except Exception as exc:
        log.exception("unexpected failure running SQL")
        raise QueryError(f"could not run statement: {type(exc).__name__}") from exc


def _duckdb_query_error(exc: duckdb.Error, stmt: exp.Expr) -> DotsearchError:
    guarded = guard_error(exc)
    if guarded is not None:
        return guarded
    err = map_duckdb_error(exc, "query failed")
    message = str(exc)
    if '"' in message:
        name = message.split('"')[1]
        for col in stmt.find_all(exp.Column, exp.Table, exp.Identifier):
            if col.name == name:
                err.position = error_at("", col).position
                break
    return err


def check_statement(stmt: exp.Expr, catalog: CollectionStore) -> None:
    """Refuse what is not ours to run: unknown tables, table functions, internal tables."""
    if isinstance(stmt, exp.DML) and stmt.args.get("with_"):
        raise error_at(f"WITH before {type(stmt).__name__.upper()} is not supported; put the "
                       "query in its WHERE clause", stmt)
    for node in stmt.walk():
        if node is not stmt and isinstance(node, exp.DML):
            raise error_at(f"{type(node).__name__.upper()} inside another statement is not "
                           "supported", node)
    cte_names = {cte.alias_or_name.lower() for cte in stmt.find_all(exp.CTE)}
    for table in stmt.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            raise error_at("table functions are not supported; name a collection", table)
        if table.args.get("db") or table.args.get("catalog"):
            raise error_at("qualified table names are not supported", table)
        name = table.name
        if name.lower() in cte_names:
            table.meta["cte"] = True
            continue
        canonical = catalog.resolve(name)
        if canonical is None:
            known = ", ".join(catalog.names()) or "none"
            raise error_at(f"unknown table {name!r} (collections: {known})", table)
        if canonical != name:
            table.set("this", exp.to_identifier(canonical))
    for func in stmt.find_all(exp.Func):
        fname = (func.this if isinstance(func, exp.Anonymous) else func.sql_name()) or ""
        if isinstance(fname, str) and fname.lower().startswith(DENIED_FUNCTION_PREFIXES):
            raise error_at(f"function {fname} is not allowed", func)
    for node in stmt.find_all(exp.Command, exp.Pragma, exp.Set, exp.Copy, exp.Attach):
        raise error_at("unsupported statement", node)
    guard_functions(stmt)
    check_model_calls(stmt, catalog)


def _new_context(catalog: CollectionStore, watch: Watch | None, session: Session,
                 snap: ReadSnapshot | None = None, explain: bool = False) -> Context:
    return Context(catalog, catalog.reader(), explain=explain, run_subquery=run_subquery,
                   watch=watch, index_access=lambda: catalog.index_access(snap),
                   session=session)


def prepare_query(stmt: exp.Expr, ctx: Context, params: Any, positional: list[int]) -> None:
    """Outputs named as written, values bound, then names as SingleStore resolves them
    (`*`, aliases): an alias copied into WHERE shares its bound values (a `?` in it is
    still one parameter, and the copy equals the projection for the planner)."""
    name_outputs(stmt)
    bind_parameters(stmt, params, ctx, positional)
    resolver = Resolver(stmt, ctx.catalog, ctx)
    expand_stars(stmt, resolver)
    expand_aliases(stmt, resolver)


def execute_statement(catalog: CollectionStore, stmt: exp.Expr, params: Any,
                      positional: list[int],
                      watch: Watch | None = None,
                      reparse: Callable[[], exp.Expr] | None = None,
                      session: Session | None = None, *, raw: bool = False) -> Any:
    """Run one statement. A query runs in a DuckDB snapshot without holding the catalog's
    lock; if a write changes an index mid-way, it runs again on a fresh copy (``reparse``),
    the last time holding the lock throughout. ``raw``: values as DuckDB gives them."""
    from service.sql import ddl, dml

    session = session if session is not None else Session()
    stmt = _unwrapped(stmt)
    if isinstance(stmt, exp.Describe) and isinstance(stmt.this, QUERY_TYPES):
        return explain_query(catalog, stmt.this, params, positional, session)
    if isinstance(stmt, exp.Set):
        return set_variables(catalog, stmt, params, positional, watch, session)
    if isinstance(stmt, exp.Insert | exp.Update | exp.Delete):
        return dml.execute_dml(catalog, stmt, params, positional, watch, session)
    if not isinstance(stmt, QUERY_TYPES):
        return ddl.execute_ddl(catalog, stmt)
    first_positional = positional[0]
    for attempt in range(SNAPSHOT_ATTEMPTS):
        last = attempt == SNAPSHOT_ATTEMPTS - 1 or reparse is None
        if attempt:
            stmt, positional[0] = _unwrapped(reparse()), first_positional  # type: ignore[misc]
        check_statement(stmt, catalog)
        with catalog.snapshot(exclude_writers=last) as snap:
            ctx = _new_context(catalog, watch, session, snap)
            try:
                prepare_query(stmt, ctx, params, positional)
                return run_query(ctx, stmt, raw=raw)
            except StaleSnapshot:
                continue
            finally:
                ctx.cleanup()
    raise AssertionError("unreachable: the last attempt excludes writers")


def set_variables(catalog: CollectionStore, stmt: exp.Set, params: Any, positional: list[int],
                  watch: Watch | None, session: Session) -> QueryResult:
    """`SET @a = expr[, @b = expr]`: each expression is evaluated as `SELECT expr` (under
    the SQL limits) and kept for the rest of the request's script."""
    for item in stmt.expressions:
        eq = item.this if isinstance(item, exp.SetItem) else None
        if not isinstance(eq, exp.EQ) or not isinstance(eq.this, exp.Parameter) or isinstance(
            eq.this, exp.SessionParameter
        ):
            raise error_at("only user variables can be set: SET @name = expression", item)
        name = eq.this.name.lower()
        if name not in session.variables and len(session.variables) >= MAX_VARIABLES:
            raise error_at(f"a script may set at most {MAX_VARIABLES} variables", item)
        pristine = exp.select(eq.expression.copy())
        got = execute_statement(catalog, pristine.copy(), params, positional, watch,
                                _copier(pristine), session, raw=True)
        if len(got.rows) != 1 or len(got.rows[0]) != 1:
            raise error_at(f"SET @{eq.this.name} needs exactly one value, got "
                           f"{len(got.rows)} rows", item)
        value = got.rows[0][0]
        vector = got.types[0] if got.types[0].startswith("VECTOR") else None
        session.held_bytes += _cell_bytes(value)
        if session.held_bytes > catalog.sql_limits.max_result_bytes:
            raise QueryResourceLimit(
                f"the script's variables hold more than {catalog.sql_limits.max_result_bytes} "
                "bytes (DOTSEARCH_SQL_MAX_RESULT_BYTES)")
        session.variables[name] = Variable(
            bytes(value) if isinstance(value, bytearray | memoryview) else value, vector)
    return QueryResult.affected()


def _copier(tree: exp.Expr) -> Callable[[], exp.Expr]:
    return lambda: tree.copy()


def _unwrapped(stmt: exp.Expr) -> exp.Expr:
    """`(SELECT ...)` written as a statement is that SELECT."""
    while isinstance(stmt, exp.Subquery) and not stmt.alias:
        stmt = stmt.this
    return stmt


def plan_statement(ctx: Context, stmt: exp.Expr) -> list[ScopePlan]:
    """Plan every SELECT scope (outermost first) and rewrite the leftovers for DuckDB."""
    plans: list[ScopePlan] = []
    root = stmt.root()
    resolve_vector_casts(stmt, ctx, Resolver(root, ctx.catalog, ctx))
    selects = [s for s in stmt.walk(bfs=False) if isinstance(s, exp.Select)]
    for select in selects:
        if select.meta.get("ds_internal") or select.root() is not root:
            continue
        plans.extend(plan_select(select, ctx))
    rewrite_all_slow(stmt, ctx)
    return plans


def _execute(ctx: Context, stmt: exp.Expr) -> duckdb.DuckDBPyConnection:
    if ctx.watch is not None:
        ctx.watch.check()
    used = {str(p.this) for p in stmt.find_all(exp.Placeholder)}
    sql = to_duckdb(stmt)
    values = {k: v for k, v in ctx.bound.items() if k in used}
    return ctx.cur.execute(sql, values)


def run_subquery(ctx: Context, node: exp.Expr) -> duckdb.DuckDBPyConnection:
    """Plan and run a nested query (a vector subquery, an allow-list) on a copy."""
    query = node.copy()
    plan_statement(ctx, query)
    return _execute(ctx, query)


def run_query(ctx: Context, stmt: exp.Expr, *, raw: bool = False) -> QueryResult:
    """Run a query: JSON-friendly rows (VECTOR outputs as arrays of numbers), or with
    ``raw`` the values as DuckDB gives them (VECTOR outputs as packed bytes)."""
    vectors = vector_outputs(stmt, Resolver(stmt, ctx.catalog, ctx))
    plan_statement(ctx, stmt)
    cur = _execute(ctx, stmt)
    names = [d[0] for d in cur.description or []]
    types = [vectors.get(i, str(d[1])) for i, d in enumerate(cur.description or [])]
    max_bytes = ctx.catalog.sql_limits.max_result_bytes
    converted: list[list[Any]] = []
    size = 0
    while batch := cur.fetchmany(FETCH_ROWS):
        if len(converted) + len(batch) > MAX_RESULT_ROWS:
            raise error_at(f"result has more than {MAX_RESULT_ROWS} rows; add a LIMIT", stmt)
        for row in batch:
            size += sum(_cell_bytes(v) for v in row)
            if raw:
                converted.append(list(row))
                continue
            converted.append([_cell(v, t, i in vectors)
                              for i, (v, t) in enumerate(zip(row, types, strict=True))])
        if size > max_bytes:
            raise QueryResourceLimit(
                f"the result is larger than {max_bytes} bytes; add a LIMIT, select fewer "
                "columns, or raise DOTSEARCH_SQL_MAX_RESULT_BYTES")
    return QueryResult(names, types, converted)


def _cell_bytes(value: Any) -> int:
    """About what a value takes in the JSON answer (exact for text and bytes)."""
    if isinstance(value, str | bytes | bytearray | memoryview):
        return len(value) + 2
    if isinstance(value, list | tuple | dict):
        return 16 * len(value) + 2
    return 16


def _cell(value: Any, sql_type: str, vector: bool = False) -> Any:
    if vector and isinstance(value, bytes | bytearray | memoryview):
        return vector_values(bytes(value))
    if sql_type == "JSON" and isinstance(value, str):
        import json

        try:
            return json.loads(value)
        except ValueError:
            return value
    return json_value(value)


def explain_query(catalog: CollectionStore, query: exp.Expr, params: Any,
                  positional: list[int], session: Session) -> QueryResult:
    """EXPLAIN: what would run, without running the vector search."""
    from service.sql.explain import describe_plan

    check_statement(query, catalog)
    with catalog.reading():
        ctx = _new_context(catalog, None, session, explain=True)
        try:
            prepare_query(query, ctx, params, positional)
            plans = plan_statement(ctx, query)
            text = describe_plan(catalog, plans, to_duckdb(query))
        finally:
            ctx.cleanup()
    lines = text.splitlines()
    return QueryResult(["plan"], ["VARCHAR"], [[line] for line in lines], explain=text)
