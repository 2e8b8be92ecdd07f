"""Reliability suite: a server's search p50/p99 idle, beside a busy writer, beside slow SQL."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bench.harness import (
    Report,
    SuiteSkipped,
    fits_in_memory,
    markdown_table,
    percentile,
    random_vectors,
)
from bench.server import free_port, running_server

SUITE = "reliability"
COLLECTION = "reliability"
PHASES = ("idle", "writer", "slow sql")
LOAD_CHUNK = 10_000
DATA_OFFSET = 1500  # random_vectors offsets: chunk i of the collection is DATA_OFFSET + i
SLOW_SQL = ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < {bound}) "
            "SELECT count(*) FROM r")


@dataclass
class Background:
    """What one background client (writer or slow SQL) sent and got back during one block."""

    answers: Counter[str] = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def record(self, status: int, body: bytes, seconds: float) -> None:
        if 200 <= status < 300:
            self.answers[str(status)] += 1
            self.seconds.append(seconds)
            return
        try:
            error = str(json.loads(body).get("error", ""))
        except (ValueError, AttributeError):
            error = ""
        self.answers["connection closed" if status == 0 else f"{status} {error}".strip()] += 1
        if status == 400 and error == "query_timeout":
            self.seconds.append(seconds)
        elif len(self.unexpected) < 3:
            self.unexpected.append(f"HTTP {status}: {body[:300]!r}")

    def merge(self, other: Background) -> None:
        self.answers.update(other.answers)
        self.seconds += other.seconds
        self.unexpected += other.unexpected[: max(0, 3 - len(self.unexpected))]


@contextmanager
def serve(data_dir: Path, sql_timeout_s: float) -> Iterator[str]:
    """`dotsearch serve --backend cpu --weights random` (featurizer not loaded, the given SQL
    timeout) on a free 127.0.0.1 port in a subprocess; yields its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOTSEARCH_")}
    env.update(DOTSEARCH_LOAD_FEATURIZER="false", DOTSEARCH_SQL_TIMEOUT_S=str(sql_timeout_s),
               DOTSEARCH_LOG_LEVEL="warning")
    exe = Path(sys.executable).with_name("dotsearch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port), "--backend", "cpu",
            "--weights", "random", "--data-dir", str(data_dir / "data")]
    with running_server(cmd, env, port, data_dir / "server.log",
                        lambda health: health.get("status") == "ok") as url:
        yield url


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k per row; ids arrive ascending, so a stable sort breaks ties by id."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def load_collection(url: str, n: int, dim: int, checks: np.ndarray,
                    k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Create the collection and upsert N unit vectors as packed float32 (chunk i drawn from
    ``random_vectors(.., offset=DATA_OFFSET + i)``); returns chunk 0 and the exact top-k ids
    of ``checks``, computed in float64 along the way."""
    import httpx

    best_scores = np.full((len(checks), 0), -np.inf)
    best_ids = np.zeros((len(checks), 0), dtype=np.int64)
    first = np.zeros((0, dim), dtype=np.float32)
    with httpx.Client(base_url=url, timeout=600) as client:
        client.post("/v1/collections", json={"name": COLLECTION, "dim": dim, "metric": "dot",
                                             "dtype": "float32"}).raise_for_status()
        for i, lo in enumerate(range(0, n, LOAD_CHUNK)):
            chunk = random_vectors(min(LOAD_CHUNK, n - lo), dim, offset=DATA_OFFSET + i)
            client.post(f"/v1/collections/{COLLECTION}/vectors", params={"id_start": lo},
                        content=chunk.tobytes(),
                        headers={"content-type": "application/octet-stream"}
                        ).raise_for_status()
            scores = checks.astype(np.float64) @ chunk.T.astype(np.float64)
            ids = np.broadcast_to(np.arange(lo, lo + len(chunk), dtype=np.int64), scores.shape)
            best_scores, best_ids = _top_k(np.hstack([best_scores, scores]),
                                           np.hstack([best_ids, ids]), k)
            if i == 0:
                first = chunk
    return first, best_ids


def check_answers(url: str, checks: np.ndarray, expected: np.ndarray) -> str | None:
    """None when the server's top-k ids for ``checks`` equal ``expected``, else why not."""
    import httpx

    k = expected.shape[1]
    for query, want in zip(checks, expected, strict=True):
        got = httpx.post(f"{url}/v1/collections/{COLLECTION}/search",
                         json={"vector": query.tolist(), "k": k}, timeout=120)
        got.raise_for_status()
        ids = [hit["id"] for hit in got.json()["results"]]
        if ids != want.tolist():
            return f"search answered {ids}, the exact top-{k} is {want.tolist()}"
    return None


def slow_sql_bound(seconds: float) -> int:
    """Recursion depth of SLOW_SQL that takes about ``seconds`` in an in-process DuckDB:
    pure CPU and a few MB, and finite even on a server that does not enforce its timeout."""
    import duckdb

    probe = 100_000
    with duckdb.connect() as con:
        con.execute(SLOW_SQL.format(bound=1000)).fetchall()
        started = time.perf_counter()
        con.execute(SLOW_SQL.format(bound=probe)).fetchall()
        rate = probe / max(time.perf_counter() - started, 1e-6)
    return max(probe, int(rate * seconds))


async def _background(url: str, requests: list[bytes], stats: Background, stop: asyncio.Event,
                      started: asyncio.Event, answer_deadline_s: float) -> None:
    """Send ``requests`` in turn on a keep-alive connection (a new one when the server
    closes it) until ``stop``; the request in flight at ``stop`` is answered first."""
    from bench.loadgen import read_response

    parts = urlsplit(url)
    i = 0
    try:
        while not stop.is_set():
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            try:
                while not stop.is_set():
                    began = time.perf_counter()
                    writer.write(requests[i % len(requests)])
                    started.set()
                    i += 1
                    status, body = await asyncio.wait_for(read_response(reader),
                                                          answer_deadline_s)
                    stats.record(status, body, time.perf_counter() - began)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                stats.record(0, f"connection closed: {exc!r}".encode(), 0.0)
            finally:
                writer.close()
    finally:
        started.set()


async def _block(url: str, searches: list[bytes], count: int, offset: int,
                 background: list[bytes] | None, settle_s: float,
                 answer_deadline_s: float) -> tuple[list[float], Background]:
    """``count`` back-to-back searches on one connection while ``background`` requests (if
    any) are sent continuously on another; the background starts first and settles."""
    from bench.loadgen import sequential_latencies

    stats = Background()
    if not background:
        return await sequential_latencies(url, searches, count, offset), stats
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(_background(url, background, stats, stop, started,
                                           answer_deadline_s))
    try:
        await started.wait()
        await asyncio.sleep(settle_s)
        if task.done():
            task.result()  # the background client failed: raise its error
        times = await sequential_latencies(url, searches, count, offset)
    finally:
        stop.set()
        await task
    return times, stats


def measure_phases(url: str, searches: list[bytes], loads: dict[str, list[bytes] | None],
                   rounds: int, per_block: int, settle_s: float,
                   answer_deadline_s: float) -> dict[str, tuple[list[float], Background]]:
    """Every round runs one block per phase, in a rotating order, so drift of a shared
    machine touches every phase alike; latencies and background answers pooled per phase."""
    pooled: dict[str, tuple[list[float], Background]] = {p: ([], Background()) for p in loads}
    names = list(loads)
    for r in range(rounds):
        for j in range(len(names)):
            phase = names[(r + j) % len(names)]
            times, stats = asyncio.run(_block(url, searches, per_block, r * per_block,
                                              loads[phase], settle_s, answer_deadline_s))
            pooled[phase][0].extend(times)
            pooled[phase][1].merge(stats)
    return pooled


def _answers(stats: Background) -> str:
    return ", ".join(f"{key} x{count}" for key, count in sorted(stats.answers.items()))


def run_reliability(report: Report, quick: bool = False, n: int | None = None,
                    dim: int | None = None, rounds: int | None = None,
                    per_block: int | None = None, batch: int | None = None,
                    sql_timeout_s: float | None = None) -> dict[str, float]:
    """Search p50/p99 against a `dotsearch serve` subprocess: idle, while another client
    upserts batches continuously, and while another runs slow SQL continuously."""
    try:
        import httpx  # noqa: F401

        import service.app  # noqa: F401
        from bench.loadgen import encode_post
    except ImportError as exc:
        raise SuiteSkipped(f"the service app is not importable ({exc})") from exc
    n = n or (10_000 if quick else 100_000)
    dim = dim or (256 if quick else 2048)
    rounds = rounds or (3 if quick else 8)
    per_block = per_block or (40 if quick else 60)
    batch = min(batch or 1000, n)
    sql_timeout_s = sql_timeout_s or (1.0 if quick else 2.0)
    if not fits_in_memory(n * dim * 4 * 3):
        report.note(SUITE, f"skipped N={n} d={dim}: does not fit in memory with headroom")
        return {}
    bound = slow_sql_bound(4 * sql_timeout_s)
    report.note(SUITE, f"`dotsearch serve --backend cpu --weights random`, featurizer not "
                f"loaded, DOTSEARCH_SQL_TIMEOUT_S={sql_timeout_s:g}; collection N={n}, d={dim}, "
                f"dot, float32; {rounds} rounds x {per_block} JSON searches (k=10) per phase, "
                "phases in rotating order; writer: upserts of "
                f"{batch} vectors (packed float32, existing ids, same values); slow SQL: "
                f"recursive CTE to depth {bound} (about {4 * sql_timeout_s:g} s in-process "
                "DuckDB, so cut by the timeout)")
    queries = random_vectors(32, dim, offset=DATA_OFFSET - 1)
    out: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    with (tempfile.TemporaryDirectory(prefix="dotsearch-bench-reliability-") as tmp,
          serve(Path(tmp), sql_timeout_s) as url):
        started = time.perf_counter()
        first, expected = load_collection(url, n, dim, queries[:4])
        report.note(SUITE, f"loaded {n} vectors in {time.perf_counter() - started:.1f} s")
        wrong = check_answers(url, queries[:4], expected)
        if wrong:
            report.note(SUITE, f"answers refused, nothing measured: {wrong}")
            return out
        path = f"/v1/collections/{COLLECTION}/search"
        searches = [encode_post(url, path, json.dumps({"vector": q.tolist(), "k": 10})
                                .encode()) for q in queries]
        upserts = [encode_post(url, f"/v1/collections/{COLLECTION}/vectors?id_start={lo}",
                               first[lo : lo + batch].tobytes(), "application/octet-stream")
                   for lo in range(0, len(first) - batch + 1, batch)][:4]
        sql = [encode_post(url, "/v1/query", json.dumps(
            {"sql": SLOW_SQL.format(bound=bound)}).encode())]
        loads: dict[str, list[bytes] | None] = dict(zip(PHASES, (None, upserts, sql),
                                                        strict=True))
        pooled = measure_phases(url, searches, loads, rounds, per_block, settle_s=0.2,
                                answer_deadline_s=max(120.0, 40 * sql_timeout_s))
        wrong = check_answers(url, queries[:4], expected)
    if wrong:
        report.note(SUITE, f"answers after the writer phase differ: {wrong}")
    report.note(SUITE, f"1-minute load average {load_before:.1f} before, "
                f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores; other work on the "
                "box inflates every phase, and the p99 ratios grow noisier)")
    idle_p50 = percentile(pooled["idle"][0], 50)
    idle_p99 = percentile(pooled["idle"][0], 99)
    for phase, (times, stats) in pooled.items():
        p50, p99 = percentile(times, 50), percentile(times, 99)
        out[f"{phase} p99_ms"] = p99 * 1e3
        row: dict[str, Any] = {
            "phase": phase, "searches": len(times), "p50_ms": p50 * 1e3,
            "p95_ms": percentile(times, 95) * 1e3, "p99_ms": p99 * 1e3,
            "max_ms": max(times) * 1e3, "p50_vs_idle": p50 / idle_p50,
            "p99_vs_idle": p99 / idle_p99, "background_answers": _answers(stats) or None,
            "background_mean_s": float(np.mean(stats.seconds)) if stats.seconds else None}
        if phase == "writer":
            done = stats.answers.get("200", 0)
            row["rows_per_s"] = done * batch / sum(stats.seconds) if stats.seconds else None
        report.add_row(SUITE, **row)
        for text in stats.unexpected:
            report.note(SUITE, f"{phase} client got an unexpected answer: {text}")
    sql_stats = pooled["slow sql"][1]
    if sql_stats.answers.get("200"):
        report.note(SUITE, f"{sql_stats.answers['200']} slow statements ran to completion: "
                    "the server does not cut statements at "
                    f"DOTSEARCH_SQL_TIMEOUT_S={sql_timeout_s:g}")
    print(markdown_table(report.rows[SUITE][-len(pooled):]), flush=True)
    detail = f"N={n}, d={dim}, {len(pooled['idle'][0])} searches per phase, interleaved"
    for phase, label in (("writer", "with a concurrent writer"),
                         ("slow sql", "with slow SQL running")):
        ratio: float | None = out[f"{phase} p99_ms"] / out["idle p99_ms"]
        if pooled[phase][1].seconds:
            out[f"{phase} p99 ratio"] = out[f"{phase} p99_ms"] / out["idle p99_ms"]
        else:
            ratio = None
            report.note(SUITE, f"{phase} phase refused: its background client got no answer "
                        "that shows its load ran (see the unexpected answers above)")
        report.add_ratio(SUITE, f"search p99 {label} / idle", ratio, 2.0, better="lower",
                         detail=detail)
    return out
