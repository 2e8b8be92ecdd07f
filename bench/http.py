"""HTTP suite: a dotsearch server under concurrent load, batching on and off, vs the engine."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import (
    Report,
    SuiteSkipped,
    fits_in_memory,
    latencies,
    percentile,
    random_vectors,
)
from bench.ingest import backend_name
from bench.server import free_port, running_server

SUITE = "http"
COLLECTION = "bench"


@contextmanager
def server(data_dir: Path, batching: bool, featurizer: bool) -> Iterator[str]:
    """``uvicorn service.app:create_app`` in a subprocess; yields its base URL."""
    port = free_port()
    env = {**os.environ, "DOTSEARCH_DATA_DIR": str(data_dir), "DOTSEARCH_BACKEND": backend_name(),
           "DOTSEARCH_WEIGHTS": "random", "DOTSEARCH_LOAD_FEATURIZER": str(featurizer).lower(),
           "DOTSEARCH_LOG_LEVEL": "warning"}
    if not batching:
        env["DOTSEARCH_BATCH_MAX"] = "1"
    cmd = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]

    def ready(health: dict[str, Any]) -> bool:
        state = str(health.get("featurizer", {}).get("state", ""))
        return (not featurizer) or state in ("ready", "failed", "error")

    with running_server(cmd, env, port, data_dir / f"server-{port}.log", ready) as url:
        yield url


def _load(url: str, vectors: np.ndarray, dim: int) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=300) as client:
        client.post("/v1/collections", json={"name": COLLECTION, "dim": dim, "metric": "dot",
                                             "dtype": "float32"}).raise_for_status()
        step = 20_000
        for lo in range(0, len(vectors), step):
            body = io.BytesIO()
            np.save(body, vectors[lo : lo + step])
            client.post(f"/v1/collections/{COLLECTION}/vectors", params={"id_start": lo},
                        content=body.getvalue(),
                        headers={"content-type": "application/x-npy"}).raise_for_status()


def _load_test(url: str, bodies: list[tuple[str, dict[str, Any]]], clients: int,
               seconds: float) -> dict[str, float]:
    """``clients`` keep-alive connections posting ``bodies`` in turn for ``seconds``.

    Requests are encoded once beforehand and sent by the light load generator in
    bench.loadgen, so the client spends as little of the shared cores as it can.
    """
    from bench.loadgen import encode_post, run_load

    requests = [encode_post(url, path, json.dumps(body).encode()) for path, body in bodies]
    got = asyncio.run(run_load(url, requests, clients, seconds))
    samples = got.latencies
    if not samples:
        return {"throughput": 0.0, "errors": got.errors}
    return {"throughput": len(samples) / got.elapsed, "p50_ms": percentile(samples, 50) * 1e3,
            "p95_ms": percentile(samples, 95) * 1e3, "p99_ms": percentile(samples, 99) * 1e3,
            "requests": len(samples), "errors": got.errors}


def _in_process(index: Any, queries: np.ndarray, clients: int, seconds: float) -> float:
    """Searches/s of ``clients`` concurrent loops through the batcher straight onto the
    engine: what batching gives without HTTP, or a load generator sharing the cores."""
    from service.batcher import SearchBatcher

    def engine(_: str, q: np.ndarray, k: int, *__: Any) -> list[list[Any]]:
        return index.search(q, k)[1].tolist()

    async def load() -> float:
        batcher = SearchBatcher(engine, window_s=0.001, max_batch=64)
        done = 0
        stop = time.perf_counter() + seconds

        async def loop(c: int) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await batcher.search(COLLECTION, queries[(c + done) % len(queries)][None], 10)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in range(clients)))
        return done / (time.perf_counter() - start)

    return asyncio.run(load())


def _paired_latencies(index: Any, url: str, queries: np.ndarray, requests: list[bytes],
                      count: int, rounds: int = 10) -> tuple[list[float], list[float], float]:
    """Direct engine calls and HTTP searches (one keep-alive connection) in alternating
    blocks: (direct latencies, HTTP latencies, HTTP's overhead in seconds).

    A shared machine's speed drifts by more than the overhead being measured, so the
    overhead is the median over rounds of (HTTP block p50 - direct block p50): drift
    between rounds cancels out."""
    from bench.loadgen import sequential_latencies

    per = max(1, count // rounds)
    direct: list[float] = []
    http: list[float] = []
    overheads: list[float] = []
    for r in range(rounds):
        d = latencies(lambda q: index.search(q[None], 10), list(queries), per, warmup=1)
        h = asyncio.run(sequential_latencies(url, requests, per, offset=r * per))
        direct += d
        http += h
        overheads.append(percentile(h, 50) - percentile(d, 50))
    return direct, http, percentile(overheads, 50)


def run_http(report: Report, quick: bool = False, n: int | None = None,
             dim: int | None = None, concurrency: tuple[int, ...] | None = None,
             seconds: float | None = None, samples: int | None = None) -> dict[str, float]:
    """Latency vs the direct engine call, throughput vs concurrency, batching on vs off."""
    try:
        import httpx

        import service.app  # noqa: F401
        from service.backend import make_index
    except ImportError as exc:
        raise SuiteSkipped(f"the service app is not importable ({exc})") from exc
    n = n or (20_000 if quick else 100_000)
    dim = dim or (512 if quick else 2048)
    concurrency = concurrency or ((1, 8, 64) if quick else (1, 8, 64, 256))
    seconds = seconds or (1.0 if quick else 8.0)
    samples = samples or (30 if quick else 200)
    if not fits_in_memory(n * dim * 4 * 4):
        report.note(SUITE, f"skipped N={n} d={dim}: does not fit in memory with headroom")
        return {}
    vectors = random_vectors(n, dim, offset=300)
    queries = random_vectors(32, dim, offset=301)
    index: Any = make_index(dim, "dot", "float32", backend=backend_name())
    index.add(np.arange(n, dtype=np.int64), vectors)
    expected = [int(i) for i in index.search(queries[:1], 10)[1][0]]
    batched = max(c for c in concurrency if c <= 64)
    in_process = {c: _in_process(index, queries, c, seconds) for c in (1, batched)}
    for clients, rate in in_process.items():
        report.add_row(SUITE, what="batcher + engine in process (no HTTP)", clients=clients,
                       throughput=rate)
    search = f"/v1/collections/{COLLECTION}/search"
    bodies = [(search, {"vector": q.tolist(), "k": 10}) for q in queries]
    sql_bodies = [("/v1/query", {"sql": f"SELECT id FROM {COLLECTION} ORDER BY "
                                        "DOT_PRODUCT(feature, :q) DESC LIMIT 10",
                                 "params": {"q": q.tolist()}}) for q in queries]
    out: dict[str, float] = {}
    series: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="dotsearch-bench-http-") as tmp:
        for batching in (True, False):
            label = "batching on" if batching else "batching off"
            with server(Path(tmp), batching, featurizer=False) as url:
                if batching:
                    _load(url, vectors, dim)
                    got = httpx.post(url + search, json=bodies[0][1], timeout=60).json()
                    ids = [hit["id"] for hit in got["results"]]
                    if ids != expected:
                        report.note(SUITE, f"HTTP answers refused: {ids} != {expected}")
                        return out
                    from bench.loadgen import encode_post

                    requests = [encode_post(url, path, json.dumps(body).encode())
                                for path, body in bodies]
                    direct, keepalive, overhead = _paired_latencies(index, url, queries,
                                                                    requests, samples)
                    index = None  # the engine's copy of the vectors is no longer needed
                    for what, times in (("direct engine call, k=10", direct),
                                        ("HTTP search (one keep-alive connection), k=10",
                                         keepalive)):
                        report.add_row(SUITE, what=f"{what}, alternating blocks", clients=1,
                                       p50_ms=percentile(times, 50) * 1e3,
                                       p99_ms=percentile(times, 99) * 1e3)
                    out["overhead_ms"] = overhead * 1e3
                    one = latencies(lambda b: httpx.post(url + b[0], json=b[1], timeout=60),
                                    bodies, samples)
                    out["http_p50_ms"] = percentile(one, 50) * 1e3
                    report.add_row(SUITE, what="HTTP search (new connection each), k=10",
                                   clients=1, p50_ms=out["http_p50_ms"],
                                   p99_ms=percentile(one, 99) * 1e3)
                for clients in concurrency if batching else (1, max(concurrency)):
                    stats = _load_test(url, bodies, clients, seconds)
                    report.add_row(SUITE, what=f"search, {label}", clients=clients, **stats)
                    series.setdefault(f"search p50 ms, {label}", []).append(
                        (clients, stats.get("p50_ms", 0.0)))
                    series.setdefault(f"search throughput/s, {label}", []).append(
                        (clients, stats["throughput"]))
                    out[f"{label} {clients}"] = stats["throughput"]
                if batching:
                    for clients in (1, max(concurrency)):
                        stats = _load_test(url, sql_bodies, clients, seconds)
                        report.add_row(SUITE, what="SQL top-10 via /v1/query",
                                       clients=clients, **stats)
        if not quick:
            _image_search(report, Path(tmp))
    top = batched
    report.add_ratio(SUITE, f"HTTP p50 - direct p50, ms (keep-alive, N={n}, d={dim})",
                     out.get("overhead_ms"), 3.0, better="lower",
                     detail="median over alternating blocks")
    report.add_ratio(SUITE, f"throughput {top} clients / 1 client (batching on)",
                     _div(out.get(f"batching on {top}"), out.get("batching on 1")), 5.0)
    report.add_ratio(SUITE, f"throughput at {max(concurrency)} clients, batching on / off",
                     _div(out.get(f"batching on {max(concurrency)}"),
                          out.get(f"batching off {max(concurrency)}")))
    report.add_ratio(SUITE, f"in process: throughput {top} concurrent searches / 1 (batcher)",
                     _div(in_process[top], in_process[1]), 5.0)
    report.add_plot("http", f"HTTP search, N={n}, d={dim}", "concurrent clients",
                    "p50 latency (ms) / throughput (requests/s)", series)
    return out


def _image_search(report: Report, data_dir: Path, count: int = 8) -> None:
    """Search by an uploaded photograph (featurizer with random weights), one client."""
    import httpx

    from bench.featurize import sample_images

    payloads = []
    for image in sample_images(count):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        payloads.append(buffer.getvalue())
    with server(data_dir, batching=True, featurizer=True) as url:
        def post(data: bytes) -> None:
            httpx.post(f"{url}/v1/collections/{COLLECTION}/search/image",
                       files={"file": ("photo.jpg", data, "image/jpeg")}, data={"k": "10"},
                       timeout=300).raise_for_status()

        times = latencies(post, payloads, count, warmup=1)
    report.add_row(SUITE, what="image search (JPEG upload, Inception-v3 random weights)",
                   clients=1, throughput=1.0 / float(np.mean(times)),
                   p50_ms=percentile(times, 50) * 1e3, p99_ms=percentile(times, 99) * 1e3)


def _div(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top and bottom else None
