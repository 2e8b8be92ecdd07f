"""Static bounds on a parsed statement: nesting depth, and size guards on the functions whose
output size is an argument (range, repeat, lpad...), where DuckDB's memory_limit does not
apply because one value is computed in one piece."""

from __future__ import annotations

import re
from collections.abc import Callable

from sqlglot import exp

from service.errors import QueryResourceLimit, QueryTooLarge
from service.sql.dialect import error_at, position_of

# Per value, so that one chunk of 2,048 rows stays in the hundreds of megabytes at most.
MAX_LIST_ELEMENTS = 10_000
MAX_STRING_BYTES = 65_536
MAX_FORMAT_WIDTH = 1_000

GUARD_TAG = "(a dotsearch bound)"
LAMBDA_MESSAGE = ("lambda functions and list comprehensions are not supported (their output "
                  "is not bounded)")


def guard_error(exc: Exception) -> QueryResourceLimit | None:
    """The size guard's own error when DuckDB raised it (through error()), else None."""
    text = str(exc)
    if GUARD_TAG not in text:
        return None
    message = text.split("Error: ", 1)[-1].split(GUARD_TAG)[0].strip()
    return QueryResourceLimit(f"{message}; dotsearch bounds one list at {MAX_LIST_ELEMENTS} "
                              f"elements and one string at {MAX_STRING_BYTES} bytes")


def _num(node: exp.Expr) -> exp.Expr:
    return exp.cast(node.copy(), exp.DType.DOUBLE)


def _arg(node: exp.Expr, position: int) -> exp.Expr | None:
    args = _call_args(node)
    return args[position] if len(args) > position else None


def _call_args(node: exp.Expr) -> list[exp.Expr]:
    if isinstance(node, exp.Anonymous):
        return list(node.expressions)
    keys: dict[type[exp.Expr], tuple[str, ...]] = {
            exp.GenerateSeries: ("start", "end", "step"), exp.Repeat: ("this", "times"),
            exp.Pad: ("this", "expression", "fill_pattern"),
            exp.Replace: ("this", "expression", "replacement"),
            exp.RegexpReplace: ("this", "expression", "replacement")}
    return [a for key in keys.get(type(node), ()) if (a := node.args.get(key)) is not None]


def _range_elements(node: exp.Expr) -> exp.Expr:
    args = _call_args(node)
    if len(args) == 1:
        return _num(args[0])
    span: exp.Expr = exp.Sub(this=_num(args[1]), expression=_num(args[0]))
    if len(args) > 2:
        span = exp.Div(this=exp.paren(span), expression=_num(args[2]))
    return exp.Abs(this=span)


def _length(node: exp.Expr) -> exp.Expr:
    return exp.Anonymous(this="len", expressions=[node.copy()])


def _repeat_size(node: exp.Expr) -> exp.Expr:
    args = _call_args(node)
    return exp.Mul(this=_length(args[0]), expression=_num(args[1]))


def _replace_size(node: exp.Expr) -> exp.Expr:
    # At most one replacement per character (plus one), each as long as the replacement.
    args = _call_args(node)
    text = _length(args[0])
    replacement = _length(args[2]) if len(args) > 2 else exp.Literal.number(0)
    return exp.Add(this=text, expression=exp.Mul(
        this=exp.paren(exp.Add(this=text.copy(), expression=exp.Literal.number(1))),
        expression=replacement))


def _nth(position: int, default: int | None = None) -> Callable[[exp.Expr], exp.Expr]:
    def size(node: exp.Expr) -> exp.Expr:
        arg = _arg(node, position)
        return _num(arg) if arg is not None else exp.Literal.number(default or 0)
    return size


def _stop(node: exp.Expr) -> exp.Expr | None:
    args = _call_args(node)
    return args[0] if len(args) == 1 else _arg(node, 1)


# Function name -> (what is bounded, its size over the call's arguments, the bound, and
# the argument that carries the check).
SIZE_GUARDS: dict[str, tuple[str, Callable[[exp.Expr], exp.Expr], int,
                             Callable[[exp.Expr], exp.Expr | None]]] = {
    "RANGE": ("list elements", _range_elements, MAX_LIST_ELEMENTS, _stop),
    "GENERATE_SERIES": ("list elements", _range_elements, MAX_LIST_ELEMENTS, _stop),
    "LIST_RESIZE": ("list elements", _nth(1), MAX_LIST_ELEMENTS, lambda n: _arg(n, 1)),
    "ARRAY_RESIZE": ("list elements", _nth(1), MAX_LIST_ELEMENTS, lambda n: _arg(n, 1)),
    "REPEAT": ("bytes", _repeat_size, MAX_STRING_BYTES, lambda n: _arg(n, 1)),
    "LPAD": ("bytes", _nth(1), MAX_STRING_BYTES, lambda n: _arg(n, 1)),
    "RPAD": ("bytes", _nth(1), MAX_STRING_BYTES, lambda n: _arg(n, 1)),
    "REPLACE": ("bytes", _replace_size, MAX_STRING_BYTES, lambda n: _arg(n, 2)),
    "REGEXP_REPLACE": ("bytes", _replace_size, MAX_STRING_BYTES, lambda n: _arg(n, 2)),
    "BAR": ("bytes", _nth(3, 80), MAX_STRING_BYTES, lambda n: _arg(n, 3)),
    "TO_BASE": ("bytes", _nth(2), MAX_STRING_BYTES, lambda n: _arg(n, 2)),
    "BITSTRING": ("bytes", _nth(1), MAX_STRING_BYTES, lambda n: _arg(n, 1)),
}
FORMAT_FUNCTIONS = ("PRINTF", "FORMAT")
LAMBDA_FUNCTIONS = {"LIST_TRANSFORM", "ARRAY_TRANSFORM", "APPLY", "LIST_APPLY", "ARRAY_APPLY",
                    "LIST_FILTER", "ARRAY_FILTER", "FILTER", "LIST_REDUCE", "ARRAY_REDUCE",
                    "REDUCE"}


def function_name(node: exp.Expr) -> str:
    """The SQL name of a function call node, upper case ("" for non-calls)."""
    if isinstance(node, exp.Anonymous):
        return str(node.name).upper()
    if isinstance(node, exp.Pad):
        return "LPAD" if node.args.get("is_left") else "RPAD"
    if isinstance(node, exp.Func):
        return str(node.sql_name()).upper()
    return ""


def check_depth(stmt: exp.Expr, max_depth: int) -> None:
    """QueryTooLarge when expressions nest deeper than ``max_depth``. A chain of ANDs or ORs
    counts once: it is a list, not nesting (sqlglot walks those without recursion)."""
    stack: list[tuple[exp.Expr, int]] = [(stmt, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise QueryTooLarge(
                f"the statement nests expressions more than {max_depth} deep; simplify it or "
                "raise DOTSEARCH_SQL_MAX_DEPTH", position=position_of(node))
        for child in node.iter_expressions():
            same_chain = isinstance(child, exp.Connector) and type(child) is type(node)
            stack.append((child, depth if same_chain else depth + 1))


def _guard(node: exp.Expr, what: str, size: exp.Expr, bound: int) -> exp.Expr:
    """CASE WHEN size > bound THEN error(...) ELSE <the argument> END. The check goes on an
    argument, not around the call: DuckDB folds constant calls while planning, so a wrapped
    `range(1000000000)` would be built before any CASE could stop it."""
    name = function_name(node).lower()
    message = f"{name}() would make more than {bound} {what} in one value {GUARD_TAG}"
    fail = exp.Anonymous(this="error", expressions=[exp.Literal.string(message)])
    return exp.Case(ifs=[exp.If(this=exp.GT(this=size, expression=exp.Literal.number(bound)),
                                true=fail)])


def _check_format(node: exp.Expr) -> None:
    fmt = _call_args(node)[0] if _call_args(node) else node.args.get("format")
    if isinstance(node, exp.NumberToStr):  # MySQL FORMAT(number, decimals)
        decimals = node.args.get("format")
        ok = isinstance(decimals, exp.Literal) and not decimals.is_string \
            and decimals.name.isdigit() and int(decimals.name) <= MAX_FORMAT_WIDTH
        if not ok:
            raise error_at(f"format() takes a literal number of decimals up to "
                           f"{MAX_FORMAT_WIDTH}", node)
        return
    if not (isinstance(fmt, exp.Literal) and fmt.is_string):
        raise error_at(f"{function_name(node).lower()}() needs a literal format string", node)
    text = fmt.name
    widths = [int(n) for n in re.findall(r"\d+", text)]
    if "*" in text or any(w > MAX_FORMAT_WIDTH for w in widths):
        raise QueryResourceLimit(
            f"format widths above {MAX_FORMAT_WIDTH} (or '*') are not allowed",
            position=position_of(node))


def guard_functions(stmt: exp.Expr) -> None:
    """Refuse lambdas; wrap each size-parameter call in a CASE that fails (DuckDB's error())
    before the value is built when it would be too large. In place."""
    guarded: list[exp.Expr] = []
    for node in list(stmt.walk()):
        if isinstance(node, exp.Lambda | exp.Comprehension):
            raise error_at(LAMBDA_MESSAGE, node)
        name = function_name(node)
        if name in LAMBDA_FUNCTIONS:
            raise error_at(LAMBDA_MESSAGE, node)
        if name in FORMAT_FUNCTIONS or isinstance(node, exp.NumberToStr):
            _check_format(node)
        if name in SIZE_GUARDS and _call_args(node):
            guarded.append(node)
    for node in guarded:
        # The size check repeats the arguments; nested size calls would repeat them
        # exponentially, so they are refused.
        if any(inner is not node and function_name(inner) in SIZE_GUARDS
               for inner in node.walk()):
            raise error_at(f"{function_name(node).lower()}() may not contain another "
                           "range/repeat/pad/replace call", node)
    for node in guarded:
        what, size, bound, carrier = SIZE_GUARDS[function_name(node)]
        arg = carrier(node)
        if arg is None:  # a default size (bar's width of 80)
            continue
        check = _guard(node, what, size(node), bound)
        arg.replace(check)
        check.set("default", arg)
