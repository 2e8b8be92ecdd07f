"""Models suite: training vectors/s per epoch, PREDICT over a collection in SQL against one
top-10 search of it, and predict latency over HTTP (issue 11's trained models)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import (
    Report,
    SuiteSkipped,
    clean,
    fits_in_memory,
    measure_interleaved,
    percentile,
    random_vectors,
)
from bench.ingest import backend_name, catalog_class

SUITE = "models"
COLLECTION = "features"
KINDS = ("logistic", "mlp")
SEED = 11
HOLDOUT = 0.2
CHUNK = 20_000  # rows per upsert
POLL_S = 0.01  # how often a training's progress is read (epochs take 0.1 s and more)
SQL_TIMEOUT_S = 600.0
NOISE = 1.5  # noise norm around unit class centres (accuracy is a sanity check only)

TOPK = (f"SELECT id, DOT_PRODUCT(feature, :q) AS score FROM {COLLECTION} "
        "ORDER BY score DESC LIMIT 10")


def predict_all_sql(model: str) -> str:
    """PREDICT over every row of the collection; the answer is one row per predicted label,
    so the whole collection is scored without sending 100k rows back."""
    return (f"SELECT PREDICT({model}, feature) AS predicted, COUNT(*) AS n FROM {COLLECTION} "
            "GROUP BY predicted ORDER BY predicted")


def clustered(n: int, dim: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors float32 (n, dim), labels (n,) str): Gaussian clusters around unit centres,
    the same for every run (fixed seeds); labels ``c0``, ``c1``, ... in turn."""
    centres = random_vectors(classes, dim, offset=1100)
    labels = np.arange(n) % classes
    vectors = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        noise = random_vectors(hi - lo, dim, offset=1200 + lo)  # unit rows
        vectors[lo:hi] = centres[labels[lo:hi]] + NOISE * noise
    return vectors, np.array([f"c{i}" for i in labels], dtype=object)


def _get(info: Any, key: str, default: Any = None) -> Any:
    """A ModelInfo field, whether the API hands back a mapping or an object."""
    if isinstance(info, dict):
        return info.get(key, default)
    return getattr(info, key, default)


def _registry(catalog: Any) -> Any:
    """Owner A's model registry held by the Catalog, or SuiteSkipped."""
    registry = getattr(catalog, "models", None)
    if registry is None or not hasattr(registry, "train"):
        raise SuiteSkipped("the Catalog holds no model registry (service.models has not landed)")
    return registry


def _train(catalog: Any, registry: Any, name: str, kind: str, epochs: int
           ) -> tuple[Any, float, float, list[float]]:
    """Train on the collection as REST and the CLI do (its rows read by a query, then
    trained in the background) and watch the progress: (ModelInfo, seconds to read the
    rows, seconds until ready, seconds of each epoch from the second on). The first epoch
    is left out: it also holds the split, the copy into torch and the first calls' warm-up."""
    from service.models.usecase import train_collection

    started = time.perf_counter()
    train_collection(catalog, name, COLLECTION, "label", kind, holdout=HOLDOUT, epochs=epochs,
                     seed=SEED, background=True)
    read_s = time.perf_counter() - started
    marks: list[tuple[int, float]] = [(0, started)]  # (epochs done, when it was seen)
    while True:
        info = registry.get(name)
        now = time.perf_counter()
        if _get(info, "state") != "training":
            break
        epoch = int((_get(info, "progress") or {}).get("epoch") or 0)
        if epoch > marks[-1][0]:
            marks.append((epoch, now))
        time.sleep(POLL_S)
    total_s = time.perf_counter() - started
    if _get(info, "state") != "ready":
        raise RuntimeError(f"model {name} ended {_get(info, 'state')}: {_get(info, 'error')}")
    per_epoch: list[float] = []
    for (e0, t0), (e1, t1) in pairwise(marks[1:]):
        per_epoch += [(t1 - t0) / (e1 - e0)] * (e1 - e0)  # several epochs between two polls
    if not per_epoch:  # one epoch, or all of them between two polls
        per_epoch = [(total_s - read_s) / epochs]
    return info, read_s, total_s, per_epoch


def _training(report: Report, catalog: Any, registry: Any, kind: str, n: int, dim: int,
              classes: int, epochs: int) -> dict[str, Any]:
    """Train ``kind`` for ``epochs`` epochs; vectors/s per epoch from the median epoch."""
    info, read_s, total_s, per_epoch = _train(catalog, registry, f"bench_{kind}", kind, epochs)
    metrics = _get(info, "metrics") or {}
    counts = metrics.get("counts", {})
    train_rows = int(counts.get("train") or round(n * (1 - HOLDOUT)))
    epoch_s = statistics.median(per_epoch)
    row = report.add_row(
        f"{SUITE}-train", kind=kind, n=n, dim=dim, classes=classes, epochs=epochs,
        train_rows=train_rows, read_rows_s=read_s, epoch_s=epoch_s,
        fastest_epoch_s=min(per_epoch), vectors_per_s=train_rows / epoch_s, total_s=total_s,
        holdout_accuracy=clean(metrics.get("accuracy")),
        macro_f1=clean(metrics.get("macro_f1")))
    print(f"[{SUITE}] train {kind}: {row['vectors_per_s']:.0f} vectors/s per epoch "
          f"({epoch_s:.3f} s/epoch over {train_rows} rows; rows read in {read_s:.1f} s; "
          f"{epochs} epochs, ready in {total_s:.1f} s; holdout accuracy "
          f"{row['holdout_accuracy']})", flush=True)
    return row


def _sql_predict(report: Report, catalog: Any, registry: Any, kind: str,
                 vectors: np.ndarray, queries: np.ndarray, rounds: int) -> float | None:
    """PREDICT over the whole collection in SQL against one SQL top-10 search, interleaved;
    the SQL answer checked against the Python API's predictions first."""
    name = f"bench_{kind}"
    sql = predict_all_sql(name)
    got = {str(label): int(count) for label, count in catalog.query(sql).rows}
    want = dict(Counter(str(label) for label in registry.predict(name, vectors)[0]))
    n = len(vectors)
    if got != want:
        report.add_row(f"{SUITE}-predict", kind=kind, n=n,
                       status=f"refused: SQL counts {got} != Python API counts {want}")
        return None
    # The Python API's predict over the same rows says what SQL adds to the model's work.
    timing = measure_interleaved({
        "predict": lambda _q: catalog.query(sql),
        "search": lambda q: catalog.query(TOPK, {"q": q.tolist()}),
        "api": lambda _q: registry.predict(name, vectors),
    }, list(queries), rounds=rounds, warmup=1, settle=0)
    predict_s, search_s = timing["predict"].median_s, timing["search"].median_s
    api_s = timing["api"].median_s
    report.add_row(f"{SUITE}-predict", kind=kind, n=n, dim=vectors.shape[1],
                   sql_predict_ms=predict_s * 1e3, sql_vectors_per_s=n / predict_s,
                   sql_top10_ms=search_s * 1e3, ratio=predict_s / search_s,
                   python_api_ms=api_s * 1e3, python_api_vectors_per_s=n / api_s,
                   status="ok")
    report.add_ratio(SUITE, f"SQL PREDICT over N={n} ({kind}) / one SQL top-10 search",
                     clean(predict_s / search_s), 2.0, better="lower",
                     detail=f"{predict_s * 1e3:.1f} vs {search_s * 1e3:.1f} ms, interleaved; "
                            f"{n / predict_s:.3g} vectors/s")
    return predict_s / search_s


def _http_latency(report: Report, data_dir: Path, queries: np.ndarray, samples: int,
                  kinds: tuple[str, ...]) -> None:
    """A server on the same data directory (the models reloaded at start): p50/p99 of
    POST /v1/models/{name}/predict with one vector, one keep-alive connection; a top-10
    search over HTTP beside it for scale."""
    import asyncio

    from bench.http import server
    from bench.loadgen import encode_post, sequential_latencies

    with server(data_dir, batching=True, featurizer=False) as url:
        search = f"/v1/collections/{COLLECTION}/search"
        shapes = {f"predict {kind}, one vector": [
            encode_post(url, f"/v1/models/bench_{kind}/predict",
                        json.dumps({"vector": q.tolist()}).encode()) for q in queries]
            for kind in kinds}
        shapes["search top-10, one vector"] = [
            encode_post(url, search, json.dumps({"vector": q.tolist(), "k": 10}).encode())
            for q in queries]
        for what, requests in shapes.items():
            times = asyncio.run(sequential_latencies(url, requests, samples))
            report.add_row(f"{SUITE}-http", what=what, requests=len(times),
                           p50_ms=percentile(times, 50) * 1e3,
                           p99_ms=percentile(times, 99) * 1e3)
            print(f"[{SUITE}] HTTP {what}: p50 {percentile(times, 50) * 1e3:.2f} ms, "
                  f"p99 {percentile(times, 99) * 1e3:.2f} ms", flush=True)


def run_models(report: Report, quick: bool = False, n: int | None = None,
               dim: int | None = None, classes: int = 10, epochs: int | None = None,
               samples: int | None = None, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """Train each kind on N clustered vectors, PREDICT them all in SQL, time predict over HTTP."""
    catalog_type = catalog_class()
    try:
        import service.models  # noqa: F401
        from service.limits import SqlLimits
    except ImportError as exc:
        raise SuiteSkipped(f"service.models is not importable ({exc})") from exc
    n = n or (10_000 if quick else 100_000)
    dim = dim or (512 if quick else 2048)
    epochs = epochs or (3 if quick else 10)
    samples = samples or (30 if quick else 300)
    if not fits_in_memory(n * dim * 4 * 5):
        raise SuiteSkipped(f"N={n} d={dim} float32 several times over does not fit in memory")
    backend = backend_name()
    vectors, labels = clustered(n, dim, classes)
    queries = random_vectors(8, dim, offset=1300)
    report.note(SUITE, f"N={n} d={dim} float32 dot, {classes} classes of Gaussian clusters "
                       f"(noise norm {NOISE} around unit centres), holdout {HOLDOUT}, seed "
                       f"{SEED}, backend {backend}; trained for {epochs} epochs as REST and "
                       "the CLI train (service.models.usecase.train_collection: the rows "
                       "read by a query, then trained in the background), progress read "
                       f"every {POLL_S * 1e3:g} ms: an epoch's time is the median from the "
                       "second epoch on; "
                       "the whole collection predicted with "
                       f"`{predict_all_sql('m')}` against `{TOPK}` (SQL timeout "
                       f"{SQL_TIMEOUT_S:g} s)")
    _load_note(report, "at the start")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dotsearch-bench-models-") as tmp:
        data_dir = Path(tmp)
        # A statement may run past the service's 5 s default here: it is measured, not cut.
        catalog = catalog_type(data_dir, backend=backend,
                               sql_limits=SqlLimits(timeout_s=SQL_TIMEOUT_S))
        try:
            registry = _registry(catalog)
            catalog.create_collection(COLLECTION, dim, "dot", "float32",
                                      columns={"label": "VARCHAR"})
            ids = np.arange(n, dtype=np.int64)
            for lo in range(0, n, CHUNK):
                catalog.upsert(COLLECTION, ids[lo : lo + CHUNK], vectors[lo : lo + CHUNK],
                               metadata=[{"label": str(v)} for v in labels[lo : lo + CHUNK]])
            for kind in kinds:
                out[f"train {kind}"] = _training(report, catalog, registry, kind, n, dim,
                                                 classes, epochs)
            for kind in kinds:
                out[f"sql {kind}"] = _sql_predict(report, catalog, registry, kind, vectors,
                                                  queries, 5 if quick else 9)
        finally:
            catalog.close()
        _http_latency(report, data_dir, queries, samples, kinds)
    _load_note(report, "at the end")
    return out


def _load_note(report: Report, when: str) -> None:
    """The machine's load average: on a shared box it says how far to trust the figures."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return
    report.note(SUITE, f"load average {when}: {one:.2f} (1 min), {five:.2f} (5 min) on "
                       f"{os.cpu_count()} cores")
