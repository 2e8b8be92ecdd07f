"""The names SingleStore resolves that DuckDB would not, or not the same way: `*` as the table's
declared columns (without internal ones), select-list aliases in WHERE, GROUP BY and HAVING,
and which outputs of a query are VECTOR values (projected as JSON arrays)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlglot import exp

from service.errors import QueryTooLarge
from service.sql.casts import cast_target
from service.sql.dialect import DIALECT

if TYPE_CHECKING:
    from service.collections import CollectionStore
    from service.sql.vectors import Context
    from service.storage import CollectionRecord

MAX_NESTING = 64  # CTEs over CTEs: deeper than any real query, and never a loop
# What resolving names may add to a statement (expanded `*` columns, copied alias nodes):
# the SQL text bounds its tokens, and this bounds what an alias used 10,000 times can grow to.
MAX_ADDED_NODES = 200_000


@dataclass(frozen=True)
class Output:
    """One output column of a query or table: its name, and its VECTOR type when it is one."""

    name: str
    vector: str | None = None
    dim: int | None = None  # a collection's vector column, however declared


def record_outputs(rec: CollectionRecord) -> list[Output]:
    """A collection's columns in declared order; the vector column is a VECTOR value only
    when declared as one (a `binary(N)` column projects packed bytes, as in SingleStore)."""
    is_vector = rec.vector_type.upper().startswith("VECTOR")
    return [Output(c, rec.vector_type if is_vector else None, rec.dim)
            if c == rec.vector_column else Output(c) for c in rec.column_order]


class Resolver:
    """Outputs of tables and queries inside one statement (CTEs looked up in it)."""

    def __init__(self, stmt: exp.Expr, catalog: CollectionStore,
                 ctx: Context | None = None) -> None:
        self.stmt = stmt
        self.catalog = catalog
        self.ctx = ctx
        self.ctes = {cte.alias_or_name.lower(): cte.this for cte in stmt.find_all(exp.CTE)}

    def source_outputs(self, source: exp.Expr, depth: int = 0) -> list[Output] | None:
        """The columns a FROM/JOIN source provides, or None when unknown here."""
        if depth > MAX_NESTING:
            return None
        if isinstance(source, exp.Table) and isinstance(source.this, exp.Identifier):
            if source.meta.get("cte"):
                query = self.ctes.get(source.name.lower())
                return None if query is None else self.query_outputs(query, depth + 1)
            coll = self.catalog.find(source.name)
            return None if coll is None else record_outputs(coll.record)
        if isinstance(source, exp.Subquery):
            return self.query_outputs(source.this, depth + 1)
        return None

    def query_outputs(self, query: exp.Expr, depth: int = 0) -> list[Output] | None:
        if isinstance(query, exp.Subquery):
            return self.query_outputs(query.this, depth + 1)
        if isinstance(query, exp.SetOperation):
            return self.query_outputs(query.left, depth + 1)
        if not isinstance(query, exp.Select):
            return None
        outputs: list[Output] = []
        for proj in query.expressions:
            if _star_of(proj) is not None:
                expanded = self.star_outputs(query, proj, depth)
                if expanded is None:
                    return None
                outputs.extend(out for _, out in expanded)
            else:
                outputs.append(Output(proj.alias_or_name, self.vector_type(proj, query, depth)))
        return outputs

    def sources(self, select: exp.Select) -> list[tuple[str, exp.Expr]]:
        found = [select.args.get("from_"), *(select.args.get("joins") or [])]
        return [(src.this.alias_or_name, src.this) for src in found if src is not None]

    def star_outputs(self, select: exp.Select, proj: exp.Expr, depth: int = 0
                     ) -> list[tuple[str, Output]] | None:
        """(source alias, column) for what a `*` or `t.*` projects, or None when unknown
        (a table function, a USING or NATURAL join, `* EXCEPT`, ...)."""
        star = _star_of(proj)
        if star is None or any(star.args.get(a) for a in ("except_", "replace", "rename")):
            return None
        for join in select.args.get("joins") or []:
            if join.args.get("using") or str(join.args.get("method") or "").upper() == "NATURAL":
                return None
        qualifier = proj.table if isinstance(proj, exp.Column) else ""
        out: list[tuple[str, Output]] = []
        for alias, source in self.sources(select):
            if qualifier and alias.lower() != qualifier.lower():
                continue
            columns = self.source_outputs(source, depth + 1)
            if columns is None:
                return None
            out.extend((alias, c) for c in columns)
        return out if out else None

    def vector_type(self, node: exp.Expr, select: exp.Select | None = None,
                    depth: int = 0) -> str | None:
        """The VECTOR type of an expression in ``select`` (default: its own scope), or None
        when it is something else."""
        if select is None and isinstance(node.parent_select, exp.Select):
            select = node.parent_select
        while isinstance(node, exp.Alias | exp.Paren):
            node = node.this
        target = cast_target(node)
        if target is not None:
            return target.spelled()
        if isinstance(node, exp.Placeholder) and self.ctx is not None:
            return self.ctx.vector_params.get(str(node.this))
        if isinstance(node, exp.Parameter) and self.ctx is not None:
            var = self.ctx.session.variables.get(node.name.lower())
            return var.vector if var is not None else None
        if isinstance(node, exp.Subquery):
            inner = self.query_outputs(node.this, depth + 1)
            return inner[0].vector if inner and len(inner) == 1 else None
        if isinstance(node, exp.Column) and not isinstance(node.this, exp.Star) and select:
            column = self.column_output(node, select, depth)
            return column.vector if column is not None else None
        return None

    def column_dim(self, column: exp.Column) -> int | None:
        """The dimension of the vector column that ``column`` names, or None."""
        select = column.parent_select
        found = self.column_output(column, select) if isinstance(select, exp.Select) else None
        return found.dim if found is not None else None

    def column_output(self, column: exp.Column, select: exp.Select,
                      depth: int = 0) -> Output | None:
        """The source column a column reference names (case-insensitive), or None."""
        for alias, source in self.sources(select):
            if column.table and alias.lower() != column.table.lower():
                continue
            for out in self.source_outputs(source, depth + 1) or []:
                if out.name.lower() == column.name.lower():
                    return out
        return None


def _star_of(proj: exp.Expr) -> exp.Star | None:
    if isinstance(proj, exp.Star):
        return proj
    if isinstance(proj, exp.Column) and isinstance(proj.this, exp.Star):
        return proj.this
    return None


def _scopes(stmt: exp.Expr) -> list[exp.Select]:
    return [s for s in stmt.find_all(exp.Select) if not s.meta.get("ds_internal")]


def _too_large(what: str) -> QueryTooLarge:
    return QueryTooLarge(f"{what} would add more than {MAX_ADDED_NODES} nodes to the "
                         "statement; write the expressions out, or split the query")


def expand_stars(stmt: exp.Expr, resolver: Resolver) -> None:
    """`*` and `t.*` become the sources' columns, in declared order (without `_thumbnail`)."""
    added = 0
    for select in _scopes(stmt):
        projections: list[exp.Expr] = []
        changed = False
        for proj in select.expressions:
            expanded = resolver.star_outputs(select, proj)
            if expanded is None:
                projections.append(proj)
                continue
            changed = True
            added += len(expanded)
            if added > MAX_ADDED_NODES:
                raise _too_large("expanding `*`")
            projections.extend(exp.column(exp.to_identifier(out.name, quoted=True),
                                          table=exp.to_identifier(alias, quoted=True))
                               for alias, out in expanded)
        if changed:
            select.set("expressions", projections)


ATOMIC = (exp.Column, exp.Func, exp.Literal, exp.Placeholder, exp.Parameter, exp.Paren,
          exp.Subquery, exp.Distance, exp.DotProduct)


def expand_aliases(stmt: exp.Expr, resolver: Resolver) -> None:
    """A select-list alias used in WHERE, GROUP BY or HAVING stands for its expression (as in
    SingleStore and MySQL), unless a source has a column of that name, which wins."""
    added = 0
    for select in _scopes(stmt):
        aliases = {p.alias.lower(): p.this for p in select.expressions
                   if isinstance(p, exp.Alias) and p.alias}
        if not aliases:
            continue
        known = _source_names(select, resolver)
        if known is None:
            continue  # a source whose columns are unknown here: DuckDB resolves the aliases
        for clause in ("where", "group", "having"):
            node = select.args.get(clause)
            if node is None:
                continue
            for column in list(node.find_all(exp.Column)):
                name = column.name.lower()
                if (column.table or isinstance(column.this, exp.Star) or name in known
                        or name not in aliases or column.parent_select is not select):
                    continue
                target = aliases[name]
                if clause == "where" and target.find(exp.AggFunc, exp.Window):
                    continue  # an aggregate cannot filter rows: DuckDB says so in its words
                added += sum(1 for _ in target.walk())
                if added > MAX_ADDED_NODES:
                    raise _too_large("the select-list aliases used in WHERE, GROUP BY and HAVING")
                copy = target.copy()
                column.replace(copy if isinstance(copy, ATOMIC) else exp.Paren(this=copy))


def _source_names(select: exp.Select, resolver: Resolver) -> set[str] | None:
    known: set[str] = set()
    for _, source in resolver.sources(select):
        columns = resolver.source_outputs(source)
        if columns is None:
            return None
        known.update(c.name.lower() for c in columns)
    return known


def vector_outputs(stmt: exp.Expr, resolver: Resolver) -> dict[int, str]:
    """Output position -> VECTOR type, for the outputs of a query that are VECTOR values."""
    outputs = resolver.query_outputs(stmt) or []
    return {i: out.vector for i, out in enumerate(outputs) if out.vector is not None}


# Functions the SQL face rewrites for DuckDB: their outputs keep the name the user wrote.
REWRITTEN_FUNCTIONS = {"DOT_PRODUCT", "EUCLIDEAN_DISTANCE", "COSINE_SIMILARITY",
                       "COSINE_DISTANCE", "JSON_ARRAY_PACK", "JSON_ARRAY_UNPACK",
                       "VECTOR_NUM_ELEMENTS", "LAST_INSERT_ID", "PREDICT", "PREDICT_PROBA"}
MAX_OUTPUT_NAME = 256


def _rewritten(node: exp.Expr) -> bool:
    if isinstance(node, exp.Parameter | exp.Placeholder | exp.DotProduct | exp.Distance
                  | exp.EuclideanDistance | exp.CosineDistance) or cast_target(node):
        return True
    return isinstance(node, exp.Anonymous) and str(node.this).upper() in REWRITTEN_FUNCTIONS


def name_outputs(stmt: exp.Expr) -> None:
    """An unnamed output that the planner rewrites (a vector function, a cast to VECTOR, a
    parameter or variable) is named by its text, as MySQL names expressions, not by the
    rewritten form DuckDB would report."""
    query = stmt
    while isinstance(query, exp.SetOperation | exp.Subquery):
        query = query.left if isinstance(query, exp.SetOperation) else query.this
    if not isinstance(query, exp.Select):
        return
    for proj in list(query.expressions):
        if isinstance(proj, exp.Alias | exp.Column | exp.Star) or not any(
                _rewritten(n) for n in proj.walk()):
            continue
        text = proj.sql(dialect=DIALECT)[:MAX_OUTPUT_NAME]
        proj.replace(exp.alias_(proj.copy(), exp.to_identifier(text, quoted=True)))
