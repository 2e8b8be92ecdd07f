"""Search filters: a SQL boolean expression over metadata turned into an allow-list of ids."""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb
import numpy as np
import numpy.typing as npt
from sqlglot import exp

from service.duck_values import map_duckdb_error
from service.errors import QueryError, StorageError
from service.sql.dialect import error_at, parse_condition, to_duckdb
from service.sql.executor import check_statement
from service.sql.guards import guard_error
from service.sql.vectors import anonymous_name, vector_kind
from service.storage import CollectionRecord

if TYPE_CHECKING:
    from service.collections import CollectionStore


def filter_ids(catalog: CollectionStore, rec: CollectionRecord, text: str) -> npt.NDArray[np.int64]:
    """Ids of ``rec`` whose metadata satisfies ``text`` (caller holds the read lock)."""
    cond = parse_condition(text)
    allowed = {c.lower() for c in rec.columns} | {"id"}
    for node in cond.walk():
        if isinstance(node, exp.Query | exp.Subquery | exp.Placeholder):
            raise error_at("a filter may not contain subqueries or parameters", node)
        if isinstance(node, exp.Column):
            if node.table and node.table != rec.name:
                raise error_at(f"filter refers to another table {node.table!r}", node)
            if node.name.lower() not in allowed:
                raise error_at(
                    f"unknown column {node.name!r} in filter; columns: "
                    f"{', '.join(sorted(rec.columns)) or 'none'}",
                    node,
                )
        if isinstance(node, exp.Func | exp.Distance) and (
            vector_kind(node) or anonymous_name(node) in ("JSON_ARRAY_PACK", "JSON_ARRAY_UNPACK")
        ):
            raise error_at("a filter works on metadata only; use SQL for vector math", node)
        if isinstance(node, exp.AggFunc | exp.Window):
            raise error_at("a filter may not aggregate", node)
    query = exp.select(exp.column("id")).from_(exp.to_table(rec.name)).where(cond)
    check_statement(query, catalog)
    try:
        got = catalog.reader().execute(to_duckdb(query)).fetchnumpy()["id"]
    except duckdb.Error as exc:
        guarded = guard_error(exc)
        if guarded is not None:
            raise guarded from exc
        err = map_duckdb_error(exc, "filter failed")
        if isinstance(err, StorageError):
            raise err from exc
        raise QueryError(err.message) from exc
    return np.asarray(got, dtype=np.int64)
