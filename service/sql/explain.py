"""EXPLAIN text: which scopes run on the index (how, on what backend) and what DuckDB runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.sql.planner import ScopePlan

if TYPE_CHECKING:
    from service.collections import CollectionStore


def describe_plan(catalog: CollectionStore, plans: list[ScopePlan], duckdb_sql: str) -> str:
    """Human-readable plan: one block per vector scope, then the DuckDB statement."""
    lines: list[str] = []
    for i, plan in enumerate(plans, 1):
        coll = catalog.collection(plan.table)
        rec = coll.record
        lines.append(
            f"vector scope {i}: exact {plan.mode} on collection {rec.name} "
            f"[{plan.function}; metric {rec.metric}, {rec.dtype}, backend {catalog.backend_name}]"
        )
        lines.append(f"  rows scanned: {plan.rows} (brute force, every allowed row scored)")
        lines.append(f"  kernel: {coll.index.describe_kernel(1, ranging=plan.mode == 'range')}")
        if plan.allowed is None:
            lines.append("  metadata pre-filter: none")
        else:
            share = plan.allowed / plan.rows if plan.rows else 0.0
            lines.append(
                f"  metadata pre-filter (DuckDB -> allow-list): {plan.allowed} rows, "
                f"selectivity {share:.2%}"
            )
        if plan.shards is not None:
            lines.append(f"  shards: {plan.shards[0]} of {plan.shards[1]} asked (one round, "
                         "merged exactly on the head)")
        if plan.k is not None:
            lines.append(f"  top-k: k = {plan.k} (LIMIT + OFFSET), ties by id ascending")
        if plan.threshold is not None:
            lines.append(f"  threshold: score {plan.threshold} (index range search)")
    if not plans:
        lines.append("no vector scope: DuckDB runs the whole statement")
    lines.append("DuckDB over the candidate (id, score) rows:")
    lines.append("  " + duckdb_sql)
    return "\n".join(lines)
