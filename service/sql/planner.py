"""The planner: vector calls go to the index (top-k, range, scored scan), the rest to DuckDB."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlglot import exp

from service.errors import InvalidInput
from service.sql.dialect import error_at
from service.sql.functions import UDF_NAMES
from service.sql.predict import is_predict, plan_predictions, rewrite_predict_slow
from service.sql.vectors import (
    HIGHER_IS_CLOSER,
    Context,
    anonymous_name,
    as_float32,
    eval_vector,
    is_constant_vector,
    numeric_constant,
    vector_args,
    vector_kind,
)
from service.storage import POINT_LOOKUP_MAX, CollectionRecord

# (call kind, collection metric) pairs the index answers exactly.
SERVABLE = {("dot", "dot"), ("l2", "l2"), ("cos_sim", "cosine"), ("cos_dist", "cosine"),
            ("dot", "cosine")}
COMPARISONS: dict[type[exp.Expr], str] = {exp.GT: ">", exp.GTE: ">=", exp.LT: "<", exp.LTE: "<="}
FLIPPED = {">": "<", ">=": "<=", "<": ">", "<=": ">="}


@dataclass
class ScopePlan:
    """What runs on the index for one SELECT scope (for EXPLAIN and for execution)."""

    table: str
    mode: str  # "top-k", "range", "scored scan"
    function: str
    rows: int
    allowed: int | None
    k: int | None = None
    threshold: str | None = None
    candidates: int | None = None
    shards: tuple[int, int] | None = None  # (asked, in all) on a sharded index


def _conjuncts(where: exp.Expr | None) -> list[exp.Expr]:
    if where is None:
        return []
    node = where.this if isinstance(where, exp.Where) else where
    return list(node.flatten()) if isinstance(node, exp.And) else [node]


def _scope_nodes(select: exp.Select, klass: Any) -> list[Any]:
    return [n for n in select.find_all(klass) if n.parent_select is select]


def _collection_tables(select: exp.Select, ctx: Context) -> list[tuple[exp.Table, Any]]:
    """(table node, Collection) for every collection in this SELECT's FROM and JOINs."""
    out: list[tuple[exp.Table, Any]] = []
    sources = [select.args.get("from_"), *(select.args.get("joins") or [])]
    for src in sources:
        table = src.this if src is not None else None
        if isinstance(table, exp.Table) and not table.meta.get("cte"):
            coll = ctx.catalog.find(table.name)
            if coll is not None:
                out.append((table, coll))
    return out


def _vector_column_of(node: exp.Expr, tables: list[tuple[exp.Table, Any]]) -> Any:
    """The (table, collection) whose vector column ``node`` names, or None."""
    if not isinstance(node, exp.Column) or isinstance(node.this, exp.Star):
        return None
    for table, coll in tables:
        if node.name.lower() != coll.record.vector_column.lower():
            continue
        if not node.table or node.table == table.alias_or_name:
            return table, coll
    return None


def _order_target(select: exp.Select, key: exp.Expr) -> exp.Expr:
    """Resolve an ORDER BY alias to its projection."""
    if isinstance(key, exp.Column) and not key.table:
        for proj in select.expressions:
            if isinstance(proj, exp.Alias) and proj.alias == key.name:
                return proj.this
    return key


def _limit_value(select: exp.Select, ctx: Context, arg: str) -> int | None:
    node = select.args.get(arg)
    if node is None:
        return None
    value = numeric_constant(node.expression if node.expression else node.this, ctx)
    if value is None or value < 0 or value != int(value):
        raise error_at(f"{arg.upper()} must be a non-negative integer", node)
    return int(value)


def plan_select(select: exp.Select, ctx: Context) -> list[ScopePlan]:
    """Rewrite one SELECT scope in place; returns what the index does for it."""
    tables = _collection_tables(select, ctx)
    calls = [n for n in select.find_all(exp.Func, exp.Distance)
             if vector_kind(n) and n.parent_select is select]
    served: list[tuple[exp.Expr, str, Any, bytes]] = []
    for call in calls:
        kind = vector_kind(call)
        assert kind is not None
        a, b = vector_args(call)
        hit_a, hit_b = _vector_column_of(a, tables), _vector_column_of(b, tables)
        vector_columns = {c.record.vector_column for _, c in tables}
        if hit_a and hit_b is None and is_constant_vector(b, vector_columns):
            served.append((call, kind, hit_a, eval_vector(b, ctx, hit_a[1].record.dim)))
        elif hit_b and hit_a is None and is_constant_vector(a, vector_columns):
            served.append((call, kind, hit_b, eval_vector(a, ctx, hit_b[1].record.dim)))
    from_node = select.args.get("from_")
    main = from_node.this if from_node is not None else None
    driving = None
    reason = ""
    order = select.args.get("order")
    candidates = [s for s in served if s[2][0] is main
                  and (s[1], s[2][1].record.metric) in SERVABLE
                  and not (s[1] == "dot" and s[2][1].record.metric == "cosine"
                           and not np.any(as_float32(s[3])))]
    thresholds: list[tuple[Any, str, float]] = []
    closer_conjuncts: dict[int, Any] = {}
    vector_conjuncts: list[exp.Expr] = []
    for conj in _conjuncts(select.args.get("where")):
        if any(vector_kind(n) for n in conj.find_all(exp.Func, exp.Distance)):
            vector_conjuncts.append(conj)
        op = COMPARISONS.get(type(conj))
        if op is None:
            continue
        left, right = conj.this, conj.expression
        for s in candidates:
            found = None
            if left == s[0] and (t := numeric_constant(right, ctx)) is not None:
                found = (s, op, t)
            elif right == s[0] and (t := numeric_constant(left, ctx)) is not None:
                found = (s, FLIPPED[op], t)
            if found and (found[1] in (">", ">=")) == HIGHER_IS_CLOSER[s[1]]:
                thresholds.append(found)
                closer_conjuncts[id(conj)] = s
    if order is not None and order.expressions and _topk_safe(select):
        first = order.expressions[0]
        target = _order_target(select, first.this)
        for s in candidates:
            if (
                target == s[0]
                and bool(first.args.get("desc")) == HIGHER_IS_CLOSER[s[1]]
                and all(closer_conjuncts.get(id(c)) is s for c in vector_conjuncts)
            ):
                driving, reason = s, "top-k"
                break
    if driving is None and thresholds:
        driving, reason = thresholds[0][0], "range"
    if driving is None and candidates:
        driving, reason = candidates[0], "scored scan"
    plans: list[ScopePlan] = []
    if driving is not None:
        plans.append(_run_driving(select, ctx, driving, reason, thresholds))
    for call in calls:
        if driving is not None and call == driving[0]:
            continue
        if call.parent_select is select and call.root() is select.root():
            rewrite_slow(call, ctx)
    if any(is_predict(n) and n.parent_select is select for n in select.find_all(exp.Anonymous)):
        plan_predictions(select, ctx, tables)
    return plans


def _topk_safe(select: exp.Select) -> bool:
    """LIMIT keeps the k closest rows only when nothing adds, merges or drops rows first."""
    if any(select.args.get(a) for a in ("joins", "laterals", "group", "having", "distinct",
                                        "qualify", "windows")):
        return False
    return not any(
        n.parent_select is select for n in select.find_all(exp.AggFunc, exp.Window, exp.Unnest,
                                                           exp.Explode)
    )


def _allow_ids(select: exp.Select, ctx: Context, table: exp.Table) -> np.ndarray | None:
    """Ids passing the scope's metadata conjuncts (single-table scopes only), or None.

    The conjuncts move from the scope's WHERE into the allow-list query: the candidates
    already satisfy them, and left in place DuckDB would push them into a full scan of
    the table instead of finding the few candidates through its primary-key index."""
    if select.args.get("joins") or select.args.get("laterals"):
        return None
    metadata: list[exp.Expr] = []
    vector: list[exp.Expr] = []
    for conj in _conjuncts(select.args.get("where")):
        has_vector = any(vector_kind(n) for n in conj.find_all(exp.Func, exp.Distance))
        (vector if has_vector else metadata).append(conj)
    if not metadata:
        return None
    select.set("where", exp.Where(this=exp.and_(*vector, copy=False)) if vector else None)
    cond = metadata[0] if len(metadata) == 1 else exp.and_(*metadata, copy=False)
    for node in list(cond.find_all(exp.Func, exp.Distance)):
        if anonymous_name(node) in ("JSON_ARRAY_PACK", "JSON_ARRAY_UNPACK",
                                    "VECTOR_NUM_ELEMENTS"):
            rewrite_slow(node, ctx)
    query = exp.select(exp.column("id", table=table.alias_or_name)).from_(table.copy()).where(cond)
    return ctx.subquery_ids(query)


def _run_driving(select: exp.Select, ctx: Context, driving: Any, mode: str,
                 thresholds: list[tuple[Any, str, float]]) -> ScopePlan:
    call, kind, (table, coll), packed = driving
    rec: CollectionRecord = coll.record
    index = coll.index
    query = as_float32(packed).reshape(1, -1)
    qnorm = float(np.linalg.norm(query.astype(np.float64)))
    allow = _allow_ids(select, ctx, table)
    plan = ScopePlan(rec.name, mode, kind, len(index), None if allow is None else len(allow))
    plan.shards = index.shards_touched(allow)
    k = None
    if mode == "top-k":
        limit = _limit_value(select, ctx, "limit")
        offset = _limit_value(select, ctx, "offset") or 0
        if limit is None:
            mode = plan.mode = "scored scan"
        else:
            k = plan.k = limit + offset
    threshold = None
    for s, op, t in thresholds:
        if s is driving:
            threshold = _index_threshold(kind, rec.metric, t, qnorm)
            plan.threshold = f"{op} {t:g}"
            break
    if mode == "range" and threshold is None:
        mode = plan.mode = "scored scan"
    with ctx.index_access():
        ids, scores = _search_index(ctx, index, query, mode, k, threshold, allow)
    plan.candidates = len(ids)
    values = scores.astype(np.float64)
    if kind == "dot" and rec.metric == "cosine":
        values = values * qnorm
    elif kind == "cos_dist":
        values = 1.0 - values
    score_col = ctx.catalog.unique_name("ds_score")
    inner = _candidate_rows(ctx, rec.name, ids, values, score_col)
    alias = table.alias_or_name
    derived = exp.Subquery(this=inner, alias=exp.TableAlias(this=exp.to_identifier(alias)))
    derived.meta["ds_internal"] = True
    inner.meta["ds_internal"] = True
    for node in list(select.find_all(type(call))):
        if node == call and node.parent_select is select:
            node.replace(exp.column(score_col, alias))
    table.replace(derived)
    for proj in select.expressions:
        star = proj if isinstance(proj, exp.Star) else (
            proj.this if isinstance(proj, exp.Column) and isinstance(proj.this, exp.Star)
            and proj.table == alias else None)
        if isinstance(star, exp.Star):
            star.set("except_", [exp.column(score_col)])
    if mode == "top-k" and not select.args.get("distinct") and not select.args.get("group"):
        select.args["order"].append("expressions", exp.Ordered(this=exp.column("id", alias)))
    return plan


def _search_index(ctx: Context, index: Any, query: np.ndarray, mode: str, k: int | None,
                  threshold: float | None, allow: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The engine's candidate (ids, scores) for one scope (none when explaining)."""
    ids = np.empty(0, dtype=np.int64)
    scores = np.empty(0, dtype=np.float32)
    n_rows = len(index) if allow is None else len(allow)
    if not ctx.explain and n_rows > 0 and len(index) > 0:
        try:
            if mode == "range":
                assert threshold is not None
                _, scores, ids, _ = index.range_search(query, threshold, allow=allow)
            else:
                kk = n_rows if k is None else min(k, n_rows)
                if kk > 0:
                    s2, i2 = index.search(query, kk, threshold=threshold, allow=allow)
                    keep = i2[0] >= 0
                    scores, ids = s2[0][keep], i2[0][keep]
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"vector search failed: {exc}") from exc
    return ids, scores


def _candidate_rows(ctx: Context, table_name: str, ids: np.ndarray, values: np.ndarray,
                    score_col: str) -> exp.Select:
    """SELECT the table's rows for the engine's candidates, with their scores as score_col."""
    rows = exp.Table(this=exp.to_identifier(table_name, quoted=True),
                     alias=exp.TableAlias(this=exp.to_identifier("__t")))
    row_id = exp.column("id", "__t")
    if ctx.explain or not 0 < len(ids) <= POINT_LOOKUP_MAX:
        # Many (or no) candidates: a registered relation, joined on id.
        view = ctx.register("cand", {"id": np.asarray(ids, dtype=np.int64), "score": values})
        cand = exp.Table(this=exp.to_identifier(view),
                         alias=exp.TableAlias(this=exp.to_identifier("__c")))
        return (exp.select(exp.column(exp.Star(), "__t"),
                           exp.alias_(exp.column("score", "__c"), score_col), copy=False)
                .from_(rows, copy=False)
                .join(cand, on=exp.EQ(this=row_id, expression=exp.column("id", "__c")),
                      copy=False))
    # A few candidates travel as two list parameters. No join: DuckDB finds the rows
    # through its primary-key index, and each row's score by its id's position.
    id_list, score_list = ctx.bind([int(i) for i in ids]), ctx.bind([float(v) for v in values])
    score = exp.Anonymous(this="list_extract", expressions=[
        score_list, exp.Anonymous(this="list_position", expressions=[id_list, row_id.copy()])])
    where = exp.In(this=row_id.copy(), expressions=[ctx.bind(int(i)) for i in ids])
    return (exp.select(exp.column(exp.Star(), "__t"), exp.alias_(score, score_col), copy=False)
            .from_(rows, copy=False).where(where, copy=False))


def _index_threshold(kind: str, metric: str, t: float, qnorm: float) -> float:
    """The index-score bound equivalent to ``call op t``, loosened so the index over-selects."""
    if kind == "dot" and metric == "cosine":
        t = t / qnorm
    elif kind == "cos_dist":
        t = 1.0 - t
    slack = 1e-5 * max(1.0, abs(t))
    return t + slack if metric == "l2" else t - slack


def rewrite_slow(node: exp.Expr, ctx: Context) -> None:
    """Rewrite a vector function for DuckDB's row-by-row UDFs (the exact general path)."""
    kind = vector_kind(node)
    name = anonymous_name(node)
    if kind is not None:
        a, b = vector_args(node)
        args = [_slow_arg(x, ctx) for x in (a, b)]
        node.replace(exp.Anonymous(this=UDF_NAMES[kind], expressions=args))
    elif name == "JSON_ARRAY_PACK":
        if len(node.expressions) != 1:
            raise error_at("JSON_ARRAY_PACK takes one argument", node)
        node.replace(_slow_arg(node, ctx))
    elif name == "JSON_ARRAY_UNPACK":
        if len(node.expressions) != 1:
            raise error_at("JSON_ARRAY_UNPACK takes one argument", node)
        node.replace(exp.Anonymous(this=UDF_NAMES["unpack"],
                                   expressions=[_slow_arg(node.expressions[0], ctx)]))
    elif name == "VECTOR_NUM_ELEMENTS":
        if len(node.expressions) != 1:
            raise error_at("VECTOR_NUM_ELEMENTS takes one argument", node)
        arg = _slow_arg(node.expressions[0], ctx)
        length = exp.Anonymous(this="octet_length", expressions=[arg])
        node.replace(exp.Cast(this=exp.Div(this=length, expression=exp.Literal.number(4)),
                              to=exp.DataType.build("BIGINT")))


def _slow_arg(node: exp.Expr, ctx: Context) -> exp.Expr:
    if is_constant_vector(node, set()) and not isinstance(node, exp.Subquery):
        if isinstance(node, exp.Literal) and not node.is_string:
            raise error_at("expected a vector, got a number", node)
        if isinstance(node, exp.Placeholder) and not isinstance(
            ctx.bound.get(str(node.this)), str | list | bytes
        ):
            return node
        return ctx.bind(eval_vector(node, ctx))
    if anonymous_name(node) == "JSON_ARRAY_PACK" and len(node.expressions) == 1:
        return exp.Anonymous(this=UDF_NAMES["pack"], expressions=[node.expressions[0]])
    return node


def rewrite_all_slow(stmt: exp.Expr, ctx: Context) -> None:
    """Every remaining vector function (outside planned scopes) onto the UDFs."""
    for node in list(stmt.find_all(exp.Func, exp.Distance)):
        if node.root() is not stmt.root():
            continue
        if is_predict(node):
            rewrite_predict_slow(node, lambda arg: _slow_arg(arg, ctx))
            continue
        if vector_kind(node) or anonymous_name(node) in (
            "JSON_ARRAY_PACK", "JSON_ARRAY_UNPACK", "VECTOR_NUM_ELEMENTS"
        ):
            rewrite_slow(node, ctx)
