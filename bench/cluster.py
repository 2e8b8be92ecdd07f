"""Cluster suite: ShardedIndex on Ray actors against one in-process CpuIndex, side by side."""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from bench.harness import (
    Report,
    SuiteSkipped,
    clean,
    fits_in_memory,
    measure,
    measure_interleaved,
    random_vectors,
)
from bench.peers import release
from bench.reference import check_answers, exact_reference

SUITE = "cluster"
SHARD_COUNTS = (1, 2, 4)
K = 10
BATCH = 256
CHUNK_ROWS = 16_384  # rows per add: the sharded index is loaded in bounded chunks
CHECKED = 8  # single queries whose ids must match (besides one whole Q=BATCH batch)
MERGE_SHARDS = (1, 2, 4, 8, 16, 32, 64, 128)
QUERY_OFFSET = 10_000_000  # seeds of the queries: far from the data chunks' seeds
TIMEOUT_S = 120.0  # a shard answer slower than this is a failure, not a measurement
LOCAL_CPUS = 2


def _ids(lo: int, count: int) -> np.ndarray:
    return np.arange(lo, lo + count, dtype=np.int64) * 7 + 3  # ids that are not row numbers


def _chunks(n: int, dim: int,
            normalise: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The data set, ``CHUNK_ROWS`` float32 rows at a time: random normal, the same on
    every pass (an index stores them in its own dtype)."""
    for lo in range(0, n, CHUNK_ROWS):
        count = min(CHUNK_ROWS, n - lo)
        yield _ids(lo, count), random_vectors(count, dim, offset=lo, normalise=normalise)


class _Recorder:
    """A sharded search that keeps, for each call, its wall time and each shard's latency
    as the head saw it (from submitting the calls to that shard's answer)."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.walls: list[float] = []
        self.shard_ms: list[list[float]] = []

    def __call__(self, batch: np.ndarray) -> object:
        start = time.perf_counter()
        out = self.index.search(batch, K)
        self.walls.append(time.perf_counter() - start)
        self.shard_ms.append([float(s["last_latency_ms"] or 0.0)
                              for s in self.index.shard_states()])
        return out

    def per_shard_ms(self) -> list[float]:
        """Median latency of each shard over the recorded calls."""
        return [statistics.median(column) for column in zip(*self.shard_ms, strict=True)]

    def head_ms(self) -> float:
        """Median of (wall - slowest shard): the head's own part (checks, put, merge)."""
        return statistics.median((wall * 1e3 - max(shards))
                                 for wall, shards in zip(self.walls, self.shard_ms, strict=True))


def _load(index: Any, n: int, dim: int, normalise: bool = False) -> float:
    """Load every chunk; seconds taken."""
    start = time.perf_counter()
    for ids, block in _chunks(n, dim, normalise):
        index.add(ids, block)
    return time.perf_counter() - start


def _same_ids(report: Report, shards: int, sharded: Any, single: Any,
              checks: list[np.ndarray]) -> bool:
    """Whether the sharded index's top-k ids equal the CpuIndex's for every checked batch."""
    worst, equal, queries = 0.0, True, 0
    for batch in checks:
        got_scores, got_ids = sharded.search(batch, K)
        ref_scores, ref_ids = single.search(batch, K)
        equal = equal and bool(np.array_equal(got_ids, ref_ids))
        worst = max(worst, float(np.max(np.abs(got_scores - ref_scores))))
        queries += len(batch)
    report.add_row(f"{SUITE}-check", shards=shards, queries=queries, k=K, ids_equal=equal,
                   max_score_diff=worst)
    if not equal:
        report.note(SUITE, f"{shards} shards: top-{K} ids differ from CpuIndex's on "
                           f"{queries} checked queries: its timings are refused")
    return equal


def _cpu_shards(report: Report, n: int, dim: int, quick: bool) -> None:
    """Shards 1, 2, 4 (CPU actors) against the single-process CpuIndex on the same cores."""
    from cpu_fallback import CpuIndex

    singles = [random_vectors(1, dim, offset=QUERY_OFFSET + i, normalise=False)
               for i in range(32)]
    batches = [random_vectors(BATCH, dim, offset=QUERY_OFFSET + 100 + r, normalise=False)
               for r in range(2)]
    checks = [np.concatenate(singles[:CHECKED]), batches[0]]
    single = CpuIndex(dim, metric="dot", dtype="float32")
    started = time.perf_counter()
    for ids, block in _chunks(n, dim):
        single.add(ids, block)
    report.note(SUITE, f"CpuIndex: {n} x {dim} float32 dot loaded in "
                       f"{time.perf_counter() - started:.1f} s (random normal, fixed seed)")
    rounds = (10, 3) if quick else (30, 5)
    for shards in SHARD_COUNTS:
        _one_shard_count(report, shards, n, dim, single, singles, batches, checks, rounds)
        release()  # between shard counts: the closed index's actors are gone


def _one_shard_count(report: Report, shards: int, n: int, dim: int, single: Any,
                     singles: list[np.ndarray], batches: list[np.ndarray],
                     checks: list[np.ndarray], rounds: tuple[int, int]) -> None:
    """Load a ShardedIndex with ``shards`` shards, check it, time it beside ``single``."""
    from service.cluster import ShardedIndex

    index = ShardedIndex(dim, metric="dot", dtype="float32", shards=shards,
                         timeout_s=TIMEOUT_S, name=f"bench-{shards}")
    try:
        load_s = _load(index, n, dim)
        memory = index.memory_info()
        ok = _same_ids(report, shards, index, single, checks)
        one_rec, many_rec = _Recorder(index), _Recorder(index)
        one = measure_interleaved({"single": lambda q: single.search(q, K),
                                   "sharded": one_rec}, singles, rounds=rounds[0],
                                  warmup=3, settle=1)
        # Seconds per call: BLAS threads spinning after a call are negligible beside
        # that, so no settle calls.
        many = measure_interleaved({"single": lambda b: single.search(b, K),
                                    "sharded": many_rec}, batches, rounds=rounds[1],
                                   warmup=1, settle=0)
        _record(report, shards, n, dim, load_s, memory, one, many, one_rec, many_rec, ok)
    finally:
        index.close()  # its actors, and the memory they hold, go now


def _record(report: Report, shards: int, n: int, dim: int, load_s: float,
            memory: dict[str, Any], one: dict[str, Any], many: dict[str, Any],
            one_rec: _Recorder, many_rec: _Recorder, ok: bool) -> None:
    single_ms, sharded_ms = one["single"].median_s * 1e3, one["sharded"].median_s * 1e3
    single_qps = BATCH / many["single"].median_s
    sharded_qps = BATCH / many["sharded"].median_s
    allowed_ms = 1.3 * single_ms + 2.0
    met = sharded_ms <= allowed_ms
    shard_rows = [int(s["rows"]) for s in memory["shards"]]
    row = report.add_row(
        SUITE, shards=shards, n=n, dim=dim, rows_per_shard="/".join(map(str, shard_rows)),
        load_s=load_s, load_rows_per_s=n / load_s, single_q1_ms=single_ms,
        sharded_q1_ms=sharded_ms, q1_ratio=sharded_ms / single_ms, q1_allowed_ms=allowed_ms,
        q1_met="yes" if met else "no", head_q1_ms=one_rec.head_ms(),
        single_q256_qps=single_qps, sharded_q256_qps=sharded_qps,
        q256_ratio=sharded_qps / single_qps, head_q256_ms=many_rec.head_ms(),
        vectors_per_s_q256=n * BATCH / many["sharded"].median_s, ids_equal=ok)
    print(f"[{SUITE}] {shards} shards: Q=1 {sharded_ms:.2f} ms vs {single_ms:.2f} ms "
          f"(allowed {allowed_ms:.2f}: {'met' if met else 'NOT met'}); Q={BATCH} "
          f"{sharded_qps:.1f} vs {single_qps:.1f} q/s; load {load_s:.1f} s", flush=True)
    report.add_ratio(SUITE, f"{shards} shards single-query ms / CpuIndex ms",
                     clean(row["q1_ratio"]) if ok else None,
                     round(allowed_ms / single_ms, 4), better="lower",
                     detail=f"{sharded_ms:.2f} vs {single_ms:.2f} ms; target 1.3x + 2 ms = "
                            f"{allowed_ms:.2f} ms; N={n} d={dim} dot, interleaved")
    report.add_ratio(SUITE, f"{shards} shards Q={BATCH} k={K} QPS / CpuIndex QPS",
                     clean(row["q256_ratio"]) if ok else None, 0.8,
                     detail=f"{sharded_qps:.1f} vs {single_qps:.1f} q/s, interleaved")
    one_ms, many_ms = one_rec.per_shard_ms(), many_rec.per_shard_ms()
    for state, rows, q1_ms, q256_ms in zip(memory["shards"], shard_rows, one_ms, many_ms,
                                           strict=True):
        report.add_row(f"{SUITE}-shards", shards=shards, shard=state["index"],
                       node=state.get("node"), device=state.get("device"), rows=rows,
                       bytes=int(state.get("allocated_bytes", 0)), q1_ms=q1_ms,
                       q256_ms=q256_ms, q1_vectors_per_s=rows / (q1_ms / 1e3),
                       q256_vectors_per_s=rows * BATCH / (q256_ms / 1e3))


def _merge_cost(report: Report, quick: bool) -> None:
    """The head's merge: merge_search_results over k results per shard for Q=BATCH."""
    from cpu_fallback.core.scoring import merge_search_results

    generator = np.random.default_rng(7)
    for shards in MERGE_SHARDS:
        parts = []
        for s in range(shards):
            scores = -np.sort(-generator.standard_normal((BATCH, K), dtype=np.float32), axis=1)
            ids = np.arange(BATCH * K, dtype=np.int64).reshape(BATCH, K) * shards + s
            parts.append((scores, ids))
        timing = measure(lambda p: merge_search_results(p, K, "dot"), [parts],
                         budget_s=0.5 if quick else 2.0)
        seconds = timing.median_s
        report.add_row(f"{SUITE}-merge", shards=shards, q=BATCH, k=K, merge_ms=seconds * 1e3,
                       ns_per_query_shard=seconds / (BATCH * shards) * 1e9,
                       query_shards_per_s=BATCH * shards / seconds,
                       bytes_back_per_query=shards * K * (8 + 4))


def _gpu_scaling(report: Report, quick: bool) -> None:
    """Where Ray sees several GPUs: vectors scored per second against the number of GPUs
    (one GPU shard each, float16 unit vectors, the same N for every count)."""
    from cpu_fallback.core.scoring import merge_search_results
    from service.cluster import cluster_gpus, ensure_ray, shutdown_ray

    shutdown_ray()
    ensure_ray()  # every CPU and GPU of this machine
    gpus = cluster_gpus()
    if gpus < 2:
        report.note(SUITE, f"GPU scaling not run: Ray sees {gpus} GPU(s) here; it runs where "
                           "Ray sees at least 2")
        return
    n, dim = (200_000 if quick else 2_000_000), 2048
    counts = sorted({g for g in (1, 2, 4, 8, 16, 32) if g <= gpus} | {gpus})
    singles = [random_vectors(1, dim, offset=QUERY_OFFSET + i) for i in range(16)]
    batches = [random_vectors(BATCH, dim, offset=QUERY_OFFSET + 100 + r) for r in range(2)]
    checked = np.concatenate(singles[:CHECKED])
    reference: tuple[np.ndarray, np.ndarray] | None = None
    for ids, block in _chunks(n, dim, normalise=True):  # exact on the float16-rounded rows
        part = exact_reference(ids, block.astype(np.float16).astype(np.float32), checked, K,
                               "dot")
        reference = part if reference is None else merge_search_results(
            [reference, part], K, "dot")
    assert reference is not None
    report.note(SUITE, f"GPU scaling: Ray sees {gpus} GPUs; N={n} d={dim} float16 dot, "
                       "one GPU shard per GPU")
    for count in counts:
        _one_gpu_count(report, count, n, dim, singles, batches, checked, reference, quick)
        release()


def _one_gpu_count(report: Report, count: int, n: int, dim: int, singles: list[np.ndarray],
                   batches: list[np.ndarray], checked: np.ndarray,
                   reference: tuple[np.ndarray, np.ndarray], quick: bool) -> None:
    from service.cluster import ShardedIndex

    index = ShardedIndex(dim, metric="dot", dtype="float16", shards=count,
                         timeout_s=TIMEOUT_S, name=f"bench-gpu-{count}")
    try:
        load_s = _load(index, n, dim, normalise=True)
        scores, found = index.search(checked, K)
        recall, refusal = check_answers(scores, found, reference[0], reference[1], "float16")
        if refusal:
            report.note(SUITE, f"{count} GPU shards refused: {refusal}")
            return
        one = measure(lambda q: index.search(q, K), singles, warmup=3,
                      budget_s=2.0 if quick else 6.0)
        many = measure(lambda b: index.search(b, K), batches, warmup=1,
                       budget_s=2.0 if quick else 8.0)
        devices = sorted({s["device"] for s in index.shard_states()})
        for label, seconds, q in (("Q=1", one.median_s, 1),
                                  (f"Q={BATCH}", many.median_s, BATCH)):
            rate = n * q / seconds
            report.add_row(f"{SUITE}-gpus", gpus=count, n=n, dim=dim, dtype="float16",
                           queries=label, ms=seconds * 1e3, vectors_per_s=rate,
                           vectors_per_s_per_gpu=rate / count, recall=round(recall, 4),
                           load_s=load_s, devices=", ".join(devices))
    finally:
        index.close()


def _connect_cpu_only() -> int:
    """Local Ray on LOCAL_CPUS cores with CPU shards; the GPUs it would have seen."""
    from service.cluster import cluster_gpus, ensure_ray

    ensure_ray(num_cpus=LOCAL_CPUS)
    gpus = cluster_gpus()
    if gpus:  # shards would take GPUs: this comparison is of CPU shards on the same cores
        import ray

        ray.shutdown()
        ray.init(num_cpus=LOCAL_CPUS, num_gpus=0, include_dashboard=False,
                 log_to_driver=False)
    return gpus


def run_cluster(report: Report, quick: bool = False, n: int | None = None,
                dim: int = 2048) -> None:
    """The cluster suite: sharded vs single-process answers, latency and throughput."""
    if importlib.util.find_spec("ray") is None:
        raise SuiteSkipped("ray is not installed (pip install 'dotsearch[cluster]')")
    try:
        from service.cluster import shutdown_ray
    except ImportError as exc:
        raise SuiteSkipped(f"service.cluster is not importable ({exc})") from exc
    n = n or (20_000 if quick else 200_000)
    if not fits_in_memory(n * dim * 4 * 3):
        raise SuiteSkipped(f"N={n} d={dim} float32 twice (single + shards) does not fit in "
                           "memory with headroom")
    try:
        gpus = _connect_cpu_only()
        report.note(SUITE, f"local Ray (num_cpus={LOCAL_CPUS}), CPU shard actors (CpuIndex, "
                           f"BLAS threads = {LOCAL_CPUS} // shards, at least 1) against one "
                           f"CpuIndex in this process; N={n} d={dim} float32 dot, k={K}; "
                           f"loaded {CHUNK_ROWS} rows per add; shard latency is as the head "
                           "sees it (calls sent to answer received)")
        _cpu_shards(report, n, dim, quick)
        _merge_cost(report, quick)
        if gpus >= 2:
            _gpu_scaling(report, quick)
        else:
            report.note(SUITE, f"GPU scaling not run: Ray sees {gpus} GPU(s) here; it runs "
                               "where Ray sees at least 2")
    finally:
        shutdown_ray()
