"""PREDICT(m, v) and PREDICT_PROBA(m, v) in SQL: a model's label (text) and its class
probabilities (a JSON map), usable wherever an expression is.

Over a collection's vector column, a scope's predictions are computed in one batched pass
over the index's vectors (torch, on the model's device) and joined in by id; a constant
vector is predicted once at planning; anything else (a vector computed per row) falls back
to row-by-row DuckDB functions, as the vector functions do.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import numpy.typing as npt
from sqlglot import exp

from service.duck_values import quote
from service.errors import InvalidInput
from service.sql.dialect import error_at
from service.sql.functions import unpack
from service.sql.vectors import Context, anonymous_name, as_float32, eval_vector, is_constant_vector

if TYPE_CHECKING:
    from service.models import ModelRegistry

PREDICT_FUNCTIONS = ("PREDICT", "PREDICT_PROBA")
UDF_PREDICT = "ds_predict"
UDF_PREDICT_PROBA = "ds_predict_proba"
# Rows whose vectors are read from the index and predicted at once.
PREDICT_ROWS = 16_384


def is_predict(node: exp.Expr) -> bool:
    return anonymous_name(node) in PREDICT_FUNCTIONS


def registry_of(catalog: Any) -> ModelRegistry:
    models: ModelRegistry | None = getattr(catalog, "models", None)
    if models is None:
        raise error_at("trained models are not available here")
    return models


def check_model_calls(stmt: exp.Expr, catalog: Any) -> None:
    """Each PREDICT call names a ready model: its first argument (a bare name or a string)
    becomes the model's canonical name, kept as a Var so that no column resolution touches
    it. Unknown models are a query_error; a model still training is 409 model_not_ready."""
    for node in list(stmt.find_all(exp.Anonymous)):
        if not is_predict(node):
            continue
        fname = anonymous_name(node)
        if len(node.expressions) != 2:
            raise error_at(f"{fname} takes two arguments: a model name and a vector", node)
        arg = node.expressions[0]
        if isinstance(arg, exp.Column) and not arg.table and isinstance(arg.this,
                                                                          exp.Identifier):
            name = arg.name
        elif (isinstance(arg, exp.Literal) and arg.is_string) or isinstance(arg, exp.Var):
            name = str(arg.this)
        else:
            raise error_at(f"{fname}'s first argument names a model: {fname}(m, feature)", arg)
        models = registry_of(catalog)
        found = models.resolve(name)
        if found is None:
            known = ", ".join(m.name for m in models.list()) or "none"
            raise error_at(f"unknown model {name!r} (models: {known})", arg)
        models.ready(found)
        arg.replace(exp.var(found))


def model_of(node: exp.Expr) -> str:
    return str(node.expressions[0].this)


def plan_predictions(select: exp.Select, ctx: Context, tables: list[tuple[exp.Table, Any]]
                     ) -> None:
    """Rewrite this scope's PREDICT calls over a collection's vector column (one batched
    pass and a join per model and table) or over a constant vector (one prediction)."""
    models = registry_of(ctx.catalog)
    joined: dict[tuple[str, str], str] = {}
    for node in [n for n in select.find_all(exp.Anonymous)
                 if is_predict(n) and n.parent_select is select]:
        model = model_of(node)
        info, net = models.ready(model)
        vec = node.expressions[1]
        owner = _vector_table(vec, tables)
        if owner is not None:
            table, coll = owner
            if coll.record.dim != info.dim:
                raise error_at(f"model {model!r} takes {info.dim}-d vectors; column "
                               f"{vec.sql()} holds {coll.record.dim}-d ones", vec)
            alias = table.alias_or_name
            key = (model, alias)
            if key not in joined:
                joined[key] = _join_predictions(select, ctx, model, alias, coll, net)
            node.replace(_from_join(node, joined[key], info.classes))
        elif is_constant_vector(vec, {c.record.vector_column for _, c in tables}):
            packed = eval_vector(vec, ctx)
            try:
                labels, probs, classes = models.predict(model, as_float32(packed))
            except InvalidInput as exc:
                raise error_at(exc.message, vec) from exc
            node.replace(_literal(node, labels[0], probs[0], classes))


def _vector_table(vec: exp.Expr, tables: list[tuple[exp.Table, Any]]
                  ) -> tuple[exp.Table, Any] | None:
    if not isinstance(vec, exp.Column) or isinstance(vec.this, exp.Star):
        return None
    for table, coll in tables:
        if vec.name.lower() == coll.record.vector_column.lower() and (
                not vec.table or vec.table == table.alias_or_name):
            return table, coll
    return None


def _join_predictions(select: exp.Select, ctx: Context, model: str, alias: str, coll: Any,
                      net: Any) -> str:
    """Predict every row of the collection (as of the statement's snapshot) and LEFT JOIN
    the result into the scope by id; the joined relation's alias."""
    models = registry_of(ctx.catalog)
    info, _ = models.ready(model)
    ids = np.empty(0, np.int64)
    probs = np.empty((0, len(info.classes)), np.float32)
    if not ctx.explain:
        id_parts: list[npt.NDArray[np.int64]] = []
        parts: list[npt.NDArray[np.float32]] = []
        try:  # the index's blocks in place: no lookups by id, no copies of float32 rows
            with ctx.index_access():
                for chunk_ids, vectors in coll.index.scan(PREDICT_ROWS):
                    if ctx.watch is not None:
                        ctx.watch.check()
                    id_parts.append(chunk_ids)
                    parts.append(models.proba(net, vectors))
        except NotImplementedError:  # a sharded index: its rows by id, chunk by chunk
            got = ctx.cur.execute(f"SELECT id FROM {quote(coll.record.name)}").fetchnumpy()
            all_ids = np.asarray(got["id"], dtype=np.int64)
            for start in range(0, len(all_ids), PREDICT_ROWS):
                if ctx.watch is not None:
                    ctx.watch.check()
                id_parts.append(all_ids[start:start + PREDICT_ROWS])
                with ctx.index_access():
                    vectors = coll.index.get(id_parts[-1])
                parts.append(models.proba(net, vectors))
        if parts:
            ids, probs = np.concatenate(id_parts), np.concatenate(parts)
    best = probs.argmax(axis=1) if len(probs) else np.empty(0, np.int64)
    # Its column names are its own (unique), so no column of the scope becomes ambiguous.
    joined = ctx.catalog.unique_name("pm")
    columns: dict[str, npt.NDArray[Any]] = {
        f"{joined}_id": ids, f"{joined}_label": np.asarray(info.classes, dtype=object)[best]}
    for i in range(len(info.classes)):
        columns[f"{joined}_p{i}"] = probs[:, i].astype(np.float64)
    view = ctx.register("pred", columns)
    on = exp.EQ(this=exp.column(f"{joined}_id", joined), expression=exp.column("id", alias))
    target = exp.Table(this=exp.to_identifier(view),
                       alias=exp.TableAlias(this=exp.to_identifier(joined)))
    select.join(target, on=on, join_type="LEFT", copy=False)
    return joined


def _from_join(node: exp.Expr, joined: str, classes: list[str]) -> exp.Expr:
    if anonymous_name(node) == "PREDICT":
        return exp.column(f"{joined}_label", joined)
    pairs: list[exp.Expr] = []
    for i, label in enumerate(classes):
        pairs += [exp.Literal.string(label), exp.column(f"{joined}_p{i}", joined)]
    return exp.Anonymous(this="json_object", expressions=pairs)


def _literal(node: exp.Expr, label: str, probs: npt.NDArray[np.float32],
             classes: list[str]) -> exp.Expr:
    if anonymous_name(node) == "PREDICT":
        return exp.Literal.string(label)
    text = json.dumps({c: float(p) for c, p in zip(classes, probs, strict=True)})
    return exp.cast(exp.Literal.string(text), exp.DType.JSON)


def rewrite_predict_slow(node: exp.Expr, slow_arg: Any) -> None:
    """A PREDICT call no plan served, onto the row-by-row DuckDB functions."""
    udf = UDF_PREDICT if anonymous_name(node) == "PREDICT" else UDF_PREDICT_PROBA
    node.replace(exp.Anonymous(this=udf, expressions=[
        exp.Literal.string(model_of(node)), slow_arg(node.expressions[1])]))


def register_model_functions(con: duckdb.DuckDBPyConnection, models: ModelRegistry) -> None:
    """The row-by-row fallbacks of PREDICT and PREDICT_PROBA (model name, packed vector)."""

    def one(model: str | None, blob: bytes | None) -> tuple[str, dict[str, float]] | None:
        vector = unpack(blob)
        if model is None or vector is None:
            return None
        try:
            labels, probs, classes = models.predict(model, vector.reshape(1, -1))
        except InvalidInput as exc:
            raise ValueError(exc.message) from exc
        return labels[0], {c: float(p) for c, p in zip(classes, probs[0], strict=True)}

    def predict(model: str | None, blob: bytes | None) -> str | None:
        got = one(model, blob)
        return None if got is None else got[0]

    def predict_proba(model: str | None, blob: bytes | None) -> str | None:
        got = one(model, blob)
        return None if got is None else json.dumps(got[1])

    create: Any = con.create_function
    create(UDF_PREDICT, predict, ["VARCHAR", "BLOB"], "VARCHAR", null_handling="special",
           side_effects=True)
    create(UDF_PREDICT_PROBA, predict_proba, ["VARCHAR", "BLOB"], "JSON",
           null_handling="special", side_effects=True)
