"""What a parsed SQL statement does (read or write), for the read-only key's authorisation."""

from __future__ import annotations

from sqlglot import exp

from service.auth import Access
from service.errors import Forbidden

# Statements a read-only key may run, by the kind of the parsed tree's root...
READ_ROOTS: tuple[type[exp.Expr], ...] = (exp.Select, exp.SetOperation, exp.Subquery,
                                          exp.Show, exp.Describe)
# ...provided that no node anywhere in it (a CTE, a subquery, an EXPLAIN's target) is one
# of these. Anything sqlglot could not parse as SQL (exp.Command) counts as a write.
_WRITE_NAMES = ("DML", "DDL", "Insert", "Update", "Delete", "Merge", "Copy", "Create", "Drop",
                "Alter", "TruncateTable", "Command", "Set", "Pragma", "Attach", "Detach",
                "Use", "Into", "Transaction", "Commit", "Rollback", "Grant", "Revoke",
                "Analyze", "Export", "Load")
WRITE_NODES: tuple[type[exp.Expr], ...] = tuple(
    getattr(exp, name) for name in _WRITE_NAMES if isinstance(getattr(exp, name, None), type))


def statement_access(stmt: exp.Expr) -> Access:
    """"read" when the statement only reads, else "write" (decided on the whole tree)."""
    if _sets_user_variables(stmt):
        values = [item.this.expression for item in stmt.expressions]
        return "write" if any(_has_write(v) for v in values) else "read"
    if not isinstance(stmt, READ_ROOTS) or _has_write(stmt):
        return "write"
    return "read"


def _has_write(tree: exp.Expr) -> bool:
    return any(isinstance(node, WRITE_NODES) for node in tree.walk())


def _sets_user_variables(stmt: exp.Expr) -> bool:
    """`SET @a = expr, ...`: request-local user variables (changing nothing stored)."""
    return isinstance(stmt, exp.Set) and bool(stmt.expressions) and all(
        isinstance(item, exp.SetItem) and isinstance(item.this, exp.EQ)
        and type(item.this.this) is exp.Parameter for item in stmt.expressions)


def authorize_script(statements: list[exp.Expr], granted: Access) -> None:
    """Forbidden unless ``granted`` covers every statement; checked before any runs."""
    if granted == "write":
        return
    for number, stmt in enumerate(statements, start=1):
        if statement_access(stmt) != "read":
            kind = type(stmt).__name__.upper()
            raise Forbidden(
                f"statement {number} ({kind}) is not a read; the read-only API key may run "
                "only SELECT, SHOW, DESCRIBE, EXPLAIN of a SELECT and SET @variable")
