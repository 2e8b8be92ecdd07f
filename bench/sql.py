"""SQL suite: the SQL shapes through the Catalog against the direct engine call and DuckDB's SQL."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import Report, fits_in_memory, measure, random_vectors
from bench.ingest import backend_name, catalog_class
from bench.peers import duckdb_topk_sql, load_duckdb, release

SUITE = "sql"
RARE_EVERY = 100  # 1% of rows carry label 'rare'

TOPK = "SELECT id, DOT_PRODUCT(feature, :q) AS score FROM features ORDER BY score DESC LIMIT 10"
FILTERED = ("SELECT id, DOT_PRODUCT(feature, :q) AS score FROM features WHERE label = 'rare' "
            "ORDER BY score DESC LIMIT 10")
THRESHOLD = "SELECT id FROM features WHERE DOT_PRODUCT(feature, :q) > 0.9"
BY_ID = ("SELECT id FROM features ORDER BY DOT_PRODUCT(feature, "
         "(SELECT feature FROM features WHERE id = :id)) DESC LIMIT 10")
KNN_VOTE = ("SELECT label, COUNT(*) AS votes FROM (SELECT label FROM features "
            "ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 10) GROUP BY label")


def _ids(rows: Any) -> list[int]:
    return [int(row[0]) for row in rows]


def run_sql(report: Report, quick: bool = False, n: int | None = None,
            dim: int | None = None) -> dict[str, float]:
    """Time each SQL shape on N vectors; check its answer; record the issue's three ratios."""
    catalog_type = catalog_class()
    n = n or (20_000 if quick else 200_000)
    dim = dim or (512 if quick else 2048)
    if not fits_in_memory(n * dim * 4 * 5):
        report.note(SUITE, f"skipped N={n} d={dim}: does not fit in memory with headroom")
        return {}
    from service.backend import make_index

    backend = backend_name()
    vectors = random_vectors(n, dim, offset=900)
    ids = np.arange(n, dtype=np.int64)
    labels = np.where(ids % RARE_EVERY == 0, "rare", "common")
    queries = random_vectors(8, dim, offset=901)
    # Near-duplicates of stored rows, so the threshold query has a handful of matches.
    near = vectors[::max(1, n // 8)][:8] + 0.01 * random_vectors(8, dim, offset=902)
    budget = 2.0 if quick else 8.0
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dotsearch-bench-sql-") as tmp:
        catalog = catalog_type(Path(tmp), backend=backend)
        catalog.create_collection("features", dim, "dot", "float32",
                                  columns={"label": "VARCHAR"})
        step = 20_000
        for lo in range(0, n, step):
            catalog.upsert("features", ids[lo : lo + step], vectors[lo : lo + step],
                           metadata=[{"label": str(v)} for v in labels[lo : lo + step]])
        index = make_index(dim, "dot", "float32", backend=backend)
        index.add(ids, vectors)
        rare = ids[labels == "rare"]

        def direct(q: np.ndarray) -> list[int]:
            return [int(i) for i in index.search(q[None], 10)[1][0]]

        def direct_filtered(q: np.ndarray) -> list[int]:
            return [int(i) for i in index.search(q[None], 10, allow=rare)[1][0]]

        def sql(text: str, key: str = "q") -> Callable[[Any], list[int]]:
            def run(value: Any) -> list[int]:
                param = value.tolist() if isinstance(value, np.ndarray) else value
                return _ids(catalog.query(text, {key: param}).rows)

            return run

        shapes: list[tuple[str, Callable[[Any], list[int]], list[Any], Callable[[Any], Any]]] = [
            ("direct engine", direct, list(queries), direct),
            ("sql top-10", sql(TOPK), list(queries), direct),
            ("json search top-10", lambda q: [h.id for h in catalog.search("features", q, 10)[0]],
             list(queries), direct),
            ("direct engine filtered 1%", direct_filtered, list(queries), direct_filtered),
            ("sql top-10 filtered 1%", sql(FILTERED), list(queries), direct_filtered),
            ("sql threshold > 0.9", sql(THRESHOLD), list(near),
             lambda q: sorted(ids[vectors @ q > 0.9].tolist())),
            ("sql subquery by id", sql(BY_ID, "id"), [int(i) for i in ids[1::max(1, n // 8)][:8]],
             lambda i: direct(vectors[i])),
            ("sql knn vote", lambda q: catalog.query(KNN_VOTE, {"q": q.tolist()}).rows,
             list(queries), lambda q: None),
        ]
        for shape, run, inputs, expected in shapes:
            results[shape] = _time_shape(report, shape, run, inputs, expected, budget, n, dim)
        catalog.close()
    release()
    results["duckdb top-10"] = _duckdb_shape(report, ids, vectors, labels, queries, budget)
    _ratios(report, results, n, dim)
    return results


def _time_shape(report: Report, shape: str, run: Callable[[Any], Any], inputs: list[Any],
                expected: Callable[[Any], Any], budget: float, n: int, dim: int) -> float:
    """Check the first input's answer against ``expected``, then time; nan when refused."""
    got, want = run(inputs[0]), expected(inputs[0])
    if shape == "sql threshold > 0.9":
        got = sorted(got)
    if want is not None and got != want:
        report.add_row(SUITE, shape=shape, n=n, dim=dim, status=f"refused: {got} != {want}")
        return float("nan")
    timing = measure(run, inputs, warmup=2, budget_s=budget)
    report.add_row(SUITE, shape=shape, n=n, dim=dim, median_ms=timing.median_s * 1e3,
                   qps=1.0 / timing.median_s, status="ok")
    return timing.median_s


def _duckdb_shape(report: Report, ids: np.ndarray, vectors: np.ndarray, labels: np.ndarray,
                  queries: np.ndarray, budget: float) -> float:
    """DuckDB's own array_inner_product ... ORDER BY ... LIMIT 10 over the same rows."""
    import duckdb

    n, dim = vectors.shape
    con = duckdb.connect()
    load_duckdb(con, "vectors", ids, vectors, extra={"label": labels})
    unfiltered = duckdb_topk_sql("dot", dim)

    def top10(q: np.ndarray) -> list[int]:
        return _ids(con.execute(unfiltered, {"q": q.tolist(), "k": 10}).fetchall())

    want = np.argsort(-(vectors @ queries[0]), kind="stable")[:10].tolist()
    got = top10(queries[0])
    if got != want:
        report.add_row(SUITE, shape="duckdb top-10", n=n, dim=dim, status=f"refused: {got}")
        return float("nan")
    timing = measure(top10, list(queries[:4]), warmup=1, repeats=3, budget_s=budget)
    report.add_row(SUITE, shape="duckdb top-10", n=n, dim=dim,
                   median_ms=timing.median_s * 1e3, qps=1.0 / timing.median_s, status="ok",
                   sql=unfiltered)
    con.close()
    return timing.median_s


def _ratios(report: Report, seconds: dict[str, float], n: int, dim: int) -> None:
    def ratio(top: str, bottom: str) -> float | None:
        value = seconds.get(top, float("nan")) / seconds.get(bottom, float("nan"))
        return None if np.isnan(value) else float(value)

    size = f"N={n}, d={dim}"
    report.add_ratio(SUITE, f"SQL top-10 time / direct engine call ({size})",
                     ratio("sql top-10", "direct engine"), 1.2, better="lower")
    report.add_ratio(SUITE, f"SQL top-10 unfiltered / filtered to 1% ({size})",
                     ratio("sql top-10", "sql top-10 filtered 1%"), 5.0)
    report.add_ratio(SUITE, f"DuckDB array_inner_product top-10 / dotsearch SQL top-10 ({size})",
                     ratio("duckdb top-10", "sql top-10"), 5.0)
