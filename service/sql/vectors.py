"""Binding parameters and evaluating constant query vectors in every literal form."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import numpy.typing as npt
from sqlglot import exp

from service.errors import QueryError
from service.limits import Watch
from service.sql.dialect import error_at
from service.sql.functions import pack_json, pack_values

if TYPE_CHECKING:
    from service.collections import CollectionStore
    from service.sql.names import Resolver

# Vector function kinds: name -> (kind, higher is closer).
FUNCTION_KINDS: dict[type[exp.Expr], str] = {
    exp.DotProduct: "dot",
    exp.EuclideanDistance: "l2",
    exp.Distance: "l2",
    exp.CosineDistance: "cos_dist",
}
ANONYMOUS_KINDS = {
    "DOT_PRODUCT": "dot",
    "EUCLIDEAN_DISTANCE": "l2",
    "COSINE_SIMILARITY": "cos_sim",
    "COSINE_DISTANCE": "cos_dist",
}
HIGHER_IS_CLOSER = {"dot": True, "cos_sim": True, "l2": False, "cos_dist": False}
MAX_PARAM_TEXT = 1 << 24
TEXT_TYPES = (exp.DType.JSON, exp.DType.TEXT, exp.DType.VARCHAR, exp.DType.CHAR,
              exp.DType.LONGTEXT, exp.DType.MEDIUMTEXT)


@dataclass
class Variable:
    """A user variable's value (as DuckDB takes a parameter) and, for a vector, its type."""

    value: Any
    vector: str | None = None


@dataclass
class Session:
    """One request's script state: user variables (`SET @v = ...`) and LAST_INSERT_ID()."""

    variables: dict[str, Variable] = field(default_factory=dict)
    last_insert_id: int = 0
    held_bytes: int = 0  # what the variables hold, bounded like a result


MAX_VARIABLES = 256


@dataclass
class Context:
    """Per-statement state: the DuckDB cursor, bound values, registered views, notes."""

    catalog: CollectionStore
    cur: duckdb.DuckDBPyConnection
    bound: dict[str, Any] = field(default_factory=dict)
    views: list[str] = field(default_factory=list)
    explain: bool = False
    notes: list[str] = field(default_factory=list)
    # Plans and runs a nested query; returns the cursor holding its result.
    run_subquery: Callable[[Context, exp.Expr], duckdb.DuckDBPyConnection] | None = None
    # The statement's time and memory watch, and the context for reading an index.
    watch: Watch | None = None
    index_access: Callable[[], AbstractContextManager[Any]] = nullcontext
    session: Session = field(default_factory=Session)
    # Bound placeholder -> VECTOR type, for values that are vectors (casts, vector variables).
    vector_params: dict[str, str] = field(default_factory=dict)

    def subquery_ids(self, query: exp.Expr) -> npt.NDArray[np.int64]:
        """The first column of a nested query's result as int64 ids (fetched as numpy)."""
        if self.run_subquery is None:
            return np.empty(0, np.int64)
        columns = self.run_subquery(self, query).fetchnumpy()
        return np.asarray(next(iter(columns.values())), dtype=np.int64)

    def bind(self, value: Any, vector: str | None = None) -> exp.Placeholder:
        name = f"p{len(self.bound)}"
        self.bound[name] = value
        if vector is not None:
            self.vector_params[name] = vector
        return exp.Placeholder(this=name)

    def register(self, prefix: str, columns: dict[str, npt.NDArray[Any]]) -> str:
        name = self.catalog.unique_name(prefix)
        if not self.explain:
            self.cur.register(name, columns)
            self.views.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.views:
            try:
                self.cur.unregister(name)
            except duckdb.Error:
                continue
        self.views.clear()


def vector_kind(node: exp.Expr) -> str | None:
    """The vector function a node calls ("dot", "l2", "cos_sim", "cos_dist"), or None."""
    for klass, kind in FUNCTION_KINDS.items():
        if type(node) is klass:
            return kind
    if isinstance(node, exp.Anonymous) and isinstance(node.this, str):
        return ANONYMOUS_KINDS.get(node.this.upper())
    return None


def vector_args(node: exp.Expr) -> tuple[exp.Expr, exp.Expr]:
    if isinstance(node, exp.Anonymous):
        args = node.expressions
        if len(args) != 2:
            raise error_at(f"{node.this} takes two vectors, got {len(args)} arguments", node)
        return args[0], args[1]
    return node.this, node.expression


def anonymous_name(node: exp.Expr) -> str | None:
    if isinstance(node, exp.Anonymous) and isinstance(node.this, str):
        return node.this.upper()
    return None


def check_param_value(value: Any, where: str) -> Any:
    """Only plain JSON-like values (and bytes / numpy vectors) may be bound."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "fiu":
            raise QueryError(f"parameter {where}: a numpy vector must be 1-d numeric")
        return [float(x) for x in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str | bytes):
        if isinstance(value, str | bytes) and len(value) > MAX_PARAM_TEXT:
            raise QueryError(f"parameter {where} is too large")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise QueryError(f"parameter {where}: integer out of 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise QueryError(f"parameter {where}: NaN and infinity are not allowed")
        return value
    if isinstance(value, list | tuple):
        if value and all(type(v) is float for v in value):  # a vector: check it in one go
            if not np.isfinite(np.asarray(value, dtype=np.float64)).all():
                raise QueryError(f"parameter {where}: NaN and infinity are not allowed")
            return list(value)
        return [check_param_value(v, where) for v in value]
    raise QueryError(f"parameter {where}: unsupported type {type(value).__name__}")


def bind_parameters(stmt: exp.Expr, params: dict[str, Any] | list[Any] | None, ctx: Context,
                    positional: list[int]) -> None:
    """Replace each `:name`, `?`, `@variable` and LAST_INSERT_ID() with an internal
    placeholder bound to a checked value. Every use of one name binds one placeholder, so
    equal expressions stay equal (a WHERE alias and its projection plan as one call).

    ``positional`` is a one-element counter shared across the statements of a script.
    """
    named: dict[str, exp.Placeholder] = {}
    for node in list(stmt.walk(bfs=False)):
        if isinstance(node, exp.SessionParameter):
            raise error_at(f"system variables are not supported: @@{node.name}", node)
        if isinstance(node, exp.Parameter):
            key = "@" + node.name.lower()
            if key not in named:
                var = ctx.session.variables.get(node.name.lower())
                if var is None:
                    raise error_at(f"user variable @{node.name} is not set in this request "
                                   f"(SET @{node.name} = ... earlier in the same script)", node)
                named[key] = ctx.bind(var.value, var.vector)
            node.replace(named[key].copy())
        elif anonymous_name(node) == "LAST_INSERT_ID":
            if node.expressions:
                raise error_at("LAST_INSERT_ID() takes no arguments", node)
            node.replace(ctx.bind(ctx.session.last_insert_id))
        elif isinstance(node, exp.Placeholder) and node.this:
            key = ":" + str(node.this)
            if key not in named:
                if not isinstance(params, dict) or str(node.this) not in params:
                    raise error_at(f"no value given for parameter :{node.this}", node)
                named[key] = ctx.bind(check_param_value(params[str(node.this)], key))
            node.replace(named[key].copy())
        elif isinstance(node, exp.Placeholder):
            i = positional[0]
            if not isinstance(params, list | tuple) or i >= len(params):
                raise error_at(f"no value given for positional parameter {i + 1}", node)
            value = check_param_value(params[i], f"#{i + 1}")
            positional[0] += 1
            node.replace(ctx.bind(value))


def resolve_vector_casts(stmt: exp.Expr, ctx: Context, resolver: Resolver) -> None:
    """`x :> VECTOR(n)` and `x !:> VECTOR(n)`: a constant (text, hex, parameter, variable,
    subquery) becomes a bound packed vector, checked for length and element range (`!:>`
    gives NULL instead of an error); a vector column stays itself, its length checked.
    A VECTOR value cast to JSON or text is its JSON array, as in SingleStore."""
    from service.sql.casts import cast_target, check_cast
    from service.sql.functions import UDF_NAMES

    root = stmt.root()
    for node in list(stmt.find_all(exp.Cast)):
        if node.root() is not root:
            continue
        target = cast_target(node)
        inner = node.this
        while isinstance(inner, exp.Paren):
            inner = inner.this
        if target is None:
            if node.to.is_type(*TEXT_TYPES) and resolver.vector_type(inner) is not None:
                unpacked = exp.Anonymous(this=UDF_NAMES["unpack"], expressions=[inner.copy()])
                node.replace(unpacked if node.to.is_type(exp.DType.JSON)
                             else exp.Cast(this=unpacked, to=exp.DataType.build("VARCHAR")))
            continue
        if isinstance(inner, exp.Column):
            dim = resolver.column_dim(inner)
            if dim is None:
                raise error_at(f"only a vector column can be cast to {target.spelled()}; "
                               "use JSON_ARRAY_PACK(text) for a text column", node)
            if dim != target.dim:
                raise error_at(f"cannot cast a vector of {dim} elements to "
                               f"{target.spelled()}", node)
            node.replace(inner)
            continue
        if not is_constant_vector(inner, set()):
            raise error_at(f"only a constant, a parameter, a variable, a subquery or a vector "
                           f"column can be cast to {target.spelled()}", node)
        try:
            packed = check_cast(eval_vector(inner, ctx), target, node)
        except QueryError:
            if not isinstance(node, exp.TryCast):
                raise
            node.replace(exp.Null())
            continue
        node.replace(ctx.bind(packed, target.spelled()))


def is_constant_vector(node: exp.Expr, vector_columns: set[str]) -> bool:
    """Whether a node is a literal-ish vector (not a column reference to a vector)."""
    if isinstance(node, exp.Paren):
        return is_constant_vector(node.this, vector_columns)
    if isinstance(node, exp.Literal | exp.HexString | exp.Placeholder | exp.Subquery):
        return True
    if anonymous_name(node) == "JSON_ARRAY_PACK":
        args = node.expressions
        return len(args) == 1 and isinstance(args[0], exp.Literal | exp.Placeholder)
    return False


def from_value(value: Any, node: exp.Expr) -> bytes:
    try:
        if isinstance(value, bytes):
            if len(value) % 4 or not value:
                raise ValueError(f"packed vector of {len(value)} bytes is not whole float32s")
            arr = np.frombuffer(value, dtype="<f4")
            if not np.all(np.isfinite(arr)):
                raise ValueError("a vector must not contain NaN or infinity")
            return value
        if isinstance(value, str):
            return pack_json(value)
        if isinstance(value, list):
            return pack_values(value)
    except ValueError as exc:
        raise error_at(f"bad vector: {exc}", node) from exc
    raise error_at(
        f"expected a vector (JSON array, packed bytes or list), got {type(value).__name__}", node
    )


def eval_vector(node: exp.Expr, ctx: Context, dim: int | None = None) -> bytes:
    """A constant vector expression as packed little-endian float32 bytes."""
    if isinstance(node, exp.Paren):
        return eval_vector(node.this, ctx, dim)
    if isinstance(node, exp.Placeholder):
        packed = from_value(ctx.bound[str(node.this)], node)
    elif isinstance(node, exp.Literal) and node.is_string:
        packed = from_value(node.this, node)
    elif isinstance(node, exp.HexString):
        try:
            packed = from_value(bytes.fromhex(str(node.this)), node)
        except ValueError as exc:
            raise error_at(f"bad hex vector literal: {exc}", node) from exc
    elif anonymous_name(node) == "JSON_ARRAY_PACK" and len(node.expressions) == 1:
        arg = node.expressions[0]
        if isinstance(arg, exp.Placeholder):
            value = ctx.bound[str(arg.this)]
            if not isinstance(value, str | list):
                raise error_at("JSON_ARRAY_PACK takes a JSON array string", arg)
            packed = from_value(value, arg)
        elif isinstance(arg, exp.Literal) and arg.is_string:
            packed = from_value(arg.this, arg)
        else:
            raise error_at("JSON_ARRAY_PACK takes a JSON array string", node)
    elif isinstance(node, exp.Subquery):
        if ctx.run_subquery is None:
            raise error_at("a vector subquery is not allowed here", node)
        rows = ctx.run_subquery(ctx, node.this).fetchall()
        if len(rows) != 1 or len(rows[0]) != 1:
            raise error_at(
                f"a vector subquery must return exactly one value, got {len(rows)} rows", node
            )
        value = rows[0][0]
        if value is None:
            raise error_at("the vector subquery returned NULL", node)
        packed = from_value(bytes(value) if isinstance(value, bytearray | memoryview) else value,
                             node)
    else:
        raise error_at("expected a constant vector", node)
    if dim is not None and len(packed) != 4 * dim:
        raise error_at(
            f"vector has {len(packed) // 4} elements, but the column holds VECTOR({dim})", node
        )
    return packed


def as_float32(packed: bytes) -> npt.NDArray[np.float32]:
    return np.frombuffer(packed, dtype="<f4").astype(np.float32)


def numeric_constant(node: exp.Expr, ctx: Context) -> float | None:
    """A number literal, a negated one, or a bound numeric parameter; else None."""
    if isinstance(node, exp.Paren):
        return numeric_constant(node.this, ctx)
    if isinstance(node, exp.Neg):
        inner = numeric_constant(node.this, ctx)
        return None if inner is None else -inner
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            value = float(node.this)
        except ValueError:
            return None
        return value if math.isfinite(value) else None
    if isinstance(node, exp.Placeholder):
        bound = ctx.bound.get(str(node.this))
        if isinstance(bound, int | float) and not isinstance(bound, bool):
            return float(bound)
    return None
