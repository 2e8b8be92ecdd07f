"""The model statements: CREATE MODEL (its SELECT is the training data), DROP MODEL, SHOW
MODELS and DESCRIBE MODEL."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlglot import exp

from service.catalog_values import QueryResult
from service.errors import InvalidInput
from service.snapshots import SNAPSHOT_ATTEMPTS, StaleSnapshot
from service.sql.dialect import DIALECT, MODEL_KIND, error_at
from service.sql.predict import registry_of
from service.sql.vectors import Session

if TYPE_CHECKING:
    from service.collections import CollectionStore
    from service.models import ModelInfo

# CREATE MODEL ... WITH (option = value, ...): the training options it takes.
OPTIONS = ("holdout", "epochs", "seed", "hidden", "lr", "batch_size", "weight_decay")
FETCH_ROWS = 4096
MODEL_COLUMNS = ["name", "kind", "state", "collection", "label_column", "dim", "classes",
                 "accuracy", "macro_f1", "created_at"]


def is_model_statement(stmt: exp.Expr) -> bool:
    if isinstance(stmt, exp.Create | exp.Drop | exp.Describe):
        return str(stmt.args.get("kind") or "").upper() == MODEL_KIND
    return isinstance(stmt, exp.Show) and str(stmt.name).upper() == "MODELS"


def execute_model_statement(catalog: CollectionStore, stmt: exp.Expr, params: Any,
                            positional: list[int], session: Session,
                            reparse: Callable[[], exp.Expr]) -> QueryResult:
    models = registry_of(catalog)
    if isinstance(stmt, exp.Show):
        return QueryResult(list(MODEL_COLUMNS), ["VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR",
                                                 "VARCHAR", "INTEGER", "JSON", "DOUBLE",
                                                 "DOUBLE", "VARCHAR"],
                           [_summary(m) for m in models.list()])
    target = stmt.args["tables"][0] if isinstance(stmt, exp.Drop) else stmt.this
    name = target.name
    if isinstance(stmt, exp.Describe):
        found = models.resolve(name)
        if found is None:
            raise error_at(f"unknown model {name!r}", target)
        info = models.get(found).as_dict()
        rows = [[key, info[key]] for key in info]
        return QueryResult(["property", "value"], ["VARCHAR", "JSON"], rows)
    if isinstance(stmt, exp.Drop):
        found = models.resolve(name)
        if found is None and not stmt.args.get("exists"):
            raise error_at(f"unknown model {name!r}", target)
        if found is not None:
            models.drop(found, if_exists=True)
        return QueryResult.affected()
    assert isinstance(stmt, exp.Create)
    return create_model(catalog, stmt, params, positional, session, reparse)


def _summary(info: ModelInfo) -> list[Any]:
    metrics = info.metrics or {}
    return [info.name, info.kind, info.state, info.collection, info.label_column, info.dim,
            list(info.classes), metrics.get("accuracy"), metrics.get("macro_f1"),
            info.created_at]


def _options(stmt: exp.Create) -> tuple[str, dict[str, Any]]:
    """The KIND and the WITH options of a CREATE MODEL, as Python values."""
    kind = ""
    options: dict[str, Any] = {}
    props = stmt.args.get("properties")
    for prop in props.expressions if props is not None else []:
        key = prop.name.lower()
        value = prop.args.get("value")
        if key == "kind":
            kind = str(value.name).lower()
            continue
        if key not in OPTIONS:
            raise error_at(f"unknown model option {prop.name!r}; options: "
                           f"{', '.join(OPTIONS)}", prop)
        if key in options:
            raise error_at(f"option {key!r} is given twice", prop)
        options[key] = _constant(value)
    return kind, options


def _constant(node: exp.Expr) -> Any:
    if isinstance(node, exp.Neg):
        inner = _constant(node.this)
        if isinstance(inner, int | float) and not isinstance(inner, bool):
            return -inner
    if isinstance(node, exp.Literal):
        if node.is_string:
            return node.this
        text = str(node.this)
        try:
            return int(text)
        except ValueError:
            return float(text)
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    raise error_at("a model option's value must be a number or a string", node)


def create_model(catalog: CollectionStore, stmt: exp.Create, params: Any,
                 positional: list[int], session: Session,
                 reparse: Callable[[], exp.Expr]) -> QueryResult:
    """Read the SELECT (under the SQL limits, in one snapshot) and train synchronously,
    bounded by the model limits; the model is stored when this returns."""
    models = registry_of(catalog)
    name = stmt.this.name
    kind, options = _options(stmt)
    if stmt.args.get("exists") and models.resolve(name) is not None \
            and models.get(models.resolve(name) or name).state in ("training", "ready"):
        return QueryResult.affected()
    try:
        models.options(kind, **options)
        models.check_new(name)
    except InvalidInput as exc:
        raise error_at(exc.message, stmt) from exc
    query = stmt.expression
    x, labels, label_column = training_data(
        catalog, query, params, positional, session,
        lambda: _query_of(reparse()))
    tables = [t for t in query.find_all(exp.Table)]
    collection = catalog.resolve(tables[0].name) if len(tables) == 1 else None
    try:
        models.train(name, kind, x, labels, source=_source(name, kind, options, query),
                     collection=collection, label_column=label_column, background=False,
                     **options)
    except InvalidInput as exc:
        raise error_at(exc.message, stmt) from exc
    return QueryResult.affected()


def _source(name: str, kind: str, options: dict[str, Any], query: exp.Expr) -> str:
    """The statement as dotsearch writes it (the training query kept with the model)."""
    given = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    with_part = f" WITH ({given})" if given else ""
    return f"CREATE MODEL {name} KIND {kind}{with_part} AS {query.sql(dialect=DIALECT)}"


def _query_of(stmt: exp.Expr) -> exp.Expr:
    assert isinstance(stmt, exp.Create)
    return stmt.expression


def training_data(catalog: CollectionStore, query: exp.Expr, params: Any,
                  positional: list[int], session: Session,
                  reparse: Callable[[], exp.Expr]
                  ) -> tuple[npt.NDArray[np.float32], list[Any], str]:
    """Run a SELECT of (vector, label) like any query (checks, limits, one snapshot) and
    read its rows as a float32 matrix and a list of labels; the label output's name."""
    from service.sql.executor import (
        QUERY_TYPES,
        _execute,
        _new_context,
        _unwrapped,
        check_statement,
        plan_statement,
        prepare_query,
        statement_errors,
    )

    limits = catalog.sql_limits
    first_positional = positional[0]
    query = _unwrapped(query)
    with catalog.watchdog.watch(limits, catalog.reader()) as watch, statement_errors(query):
        for attempt in range(SNAPSHOT_ATTEMPTS):
            last = attempt == SNAPSHOT_ATTEMPTS - 1
            if attempt:
                query, positional[0] = _unwrapped(reparse()), first_positional
            if not isinstance(query, QUERY_TYPES):
                raise error_at("CREATE MODEL needs AS SELECT <vector>, <label> FROM ...", query)
            check_statement(query, catalog)
            with catalog.snapshot(exclude_writers=last) as snap:
                ctx = _new_context(catalog, watch, session, snap)
                try:
                    prepare_query(query, ctx, params, positional)
                    plan_statement(ctx, query)
                    return _read_rows(catalog, _execute(ctx, query), query)
                except StaleSnapshot:
                    continue
                finally:
                    ctx.cleanup()
    raise AssertionError("unreachable: the last attempt excludes writers")


def _read_rows(catalog: CollectionStore, cur: Any, query: exp.Expr
               ) -> tuple[npt.NDArray[np.float32], list[Any], str]:
    models = registry_of(catalog)
    names = [d[0] for d in cur.description or []]
    types = [str(d[1]).upper() for d in cur.description or []]
    if len(names) != 2:
        raise error_at(f"the training SELECT must yield two columns, a vector and a label; "
                       f"it yields {len(names)}", query)
    if types[0] not in ("BLOB", "BYTEA"):
        raise error_at(f"the first column {names[0]!r} must be a vector column (or a vector "
                       f"expression), the second the label; it is {types[0]}", query)
    if types[1] in ("BLOB", "BYTEA"):
        raise error_at(f"the label column {names[1]!r} is a vector; labels must be text, "
                       "numbers or booleans", query)
    parts: list[npt.NDArray[np.float32]] = []
    labels: list[Any] = []
    dim: int | None = None
    while batch := cur.fetchmany(FETCH_ROWS):
        blobs = [row[0] for row in batch]
        if any(b is None for b in blobs):
            raise error_at("the training SELECT yields a NULL vector", query)
        if dim is None:
            if not blobs[0] or len(blobs[0]) % 4:
                raise error_at("the first column does not hold float32 vectors", query)
            dim = len(blobs[0]) // 4
        if any(len(b) != dim * 4 for b in blobs):
            raise error_at("the training vectors differ in length", query)
        rows = len(labels) + len(batch)
        try:
            models.check_size(rows, dim)
        except InvalidInput as exc:
            raise error_at(exc.message, query) from exc
        parts.append(np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(batch), dim))
        labels.extend(row[1] for row in batch)
    if dim is None:
        raise error_at("the training SELECT returned no rows", query)
    return np.concatenate(parts).astype(np.float32, copy=False), labels, names[1]

