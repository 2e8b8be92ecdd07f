"""The floors measured in this run: memory read bandwidth and GEMM peak, host and device."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bench.harness import Report, gpu_status, measure, random_vectors


def host_read_pass(
    matrix: np.ndarray, pool: ThreadPoolExecutor, threads: int
) -> Callable[[object], None]:
    """A callable that reads all of ``matrix`` once with a numpy sum on ``threads`` threads."""
    flat = matrix.reshape(-1)
    bounds = np.linspace(0, flat.size, threads + 1).astype(np.int64)
    chunks = [flat[bounds[i] : bounds[i + 1]] for i in range(threads)]

    def read_all(_: object) -> None:
        list(pool.map(np.sum, chunks))

    return read_all


def host_read_bandwidth(matrix: np.ndarray, threads: int | None = None) -> float:
    """Bytes/s of a large numpy reduction over ``matrix``: the best of 1 thread and all cores.

    numpy reductions run on one thread and release the GIL, so the rows are split among a
    thread pool; the matrix must be far larger than the caches for this to mean anything.
    """
    threads = threads or os.cpu_count() or 1
    best = 0.0
    counts = sorted({1, threads})
    for count in counts:
        with ThreadPoolExecutor(count) as pool:
            timing = measure(host_read_pass(matrix, pool, count), [0], warmup=1, repeats=5,
                             budget_s=6.0)
        best = max(best, matrix.nbytes / timing.median_s)
    return best


def host_gemm_peak(dtype: str = "float32", size: int = 2048) -> float:
    """FLOP/s of a square matmul on the host: numpy for float32, torch for float16."""
    if dtype == "float32":
        a = random_vectors(size, size, offset=11, normalise=False)
        b = random_vectors(size, size, offset=12, normalise=False)
        timing = measure(lambda _: a @ b, [0], warmup=1, repeats=5, budget_s=5.0)
        return 2.0 * size**3 / timing.median_s
    import torch

    ta = torch.randn(size, size, dtype=torch.float16)
    tb = torch.randn(size, size, dtype=torch.float16)
    timing = measure(lambda _: torch.mm(ta, tb), [0], warmup=1, repeats=3, budget_s=5.0)
    return 2.0 * size**3 / timing.median_s


def device_read_bandwidth(device_matrix: Any) -> dict[str, float]:
    """Device bytes/s: a CuPy reduction over ``device_matrix`` and a device-to-device copy."""
    import cupy

    sync = cupy.cuda.Device().synchronize
    flat = device_matrix.reshape(-1)
    timing = measure(lambda _: cupy.sum(flat, dtype=cupy.float32), [0], warmup=2, sync=sync)
    reduction = flat.nbytes / timing.median_s
    target = cupy.empty_like(flat)
    timing = measure(lambda _: cupy.copyto(target, flat), [0], warmup=2, sync=sync)
    # A copy reads and writes every byte: read bandwidth is half the traffic.
    copy_read = flat.nbytes / timing.median_s
    return {"reduction": reduction, "copy_read": copy_read, "best": max(reduction, copy_read)}


def device_gemm_peak(dtype: str, size: int = 8192) -> float:
    """FLOP/s of a square cuBLAS matmul through CuPy (float16 in, float16 out: tensor cores)."""
    import cupy

    sync = cupy.cuda.Device().synchronize
    a = cupy.random.standard_normal((size, size), dtype=cupy.float32).astype(dtype)
    b = cupy.random.standard_normal((size, size), dtype=cupy.float32).astype(dtype)
    out = cupy.empty((size, size), dtype=dtype)
    timing = measure(lambda _: cupy.matmul(a, b, out=out), [0], warmup=2, sync=sync)
    return 2.0 * size**3 / timing.median_s


def run_limits(report: Report, quick: bool = False, tiny: bool = False) -> dict[str, float]:
    """Measure every floor this machine has and record it in ``report.limits``.

    ``tiny`` (tests only) uses sizes too small to mean anything.
    """
    suite = "limits"
    rows = 512 if tiny else (32_768 if quick else 131_072)
    matrix = np.ones((rows, 2048), dtype=np.float32)  # 256 MiB quick, 1 GiB full
    limits: dict[str, float] = {}
    limits["host_read_GBps"] = host_read_bandwidth(matrix) / 1e9
    report.add_row(suite, limit="host read bandwidth", value=limits["host_read_GBps"],
                   unit="GB/s", method=f"threaded numpy sum over {matrix.nbytes / 2**20:.0f} MiB")
    del matrix
    for dtype in ("float32", "float16"):
        size = 512 if dtype == "float16" else (1024 if quick else 2048)
        size = 128 if tiny else size
        key = f"host_gemm_{dtype}_GFLOPs"
        try:
            limits[key] = host_gemm_peak(dtype, size) / 1e9
        except Exception as exc:
            report.note(suite, f"host {dtype} GEMM peak not measured: {exc}")
            continue
        method = "numpy matmul" if dtype == "float32" else "torch.mm"
        report.add_row(suite, limit=f"host GEMM peak {dtype}", value=limits[key], unit="GFLOP/s",
                       method=f"{method} {size}x{size}")
    usable, detail = gpu_status()
    if not usable:
        report.note(suite, f"no device limits: {detail}")
    else:
        import cupy

        elements = (1 << 20) if tiny else (1 << 28) if quick else (1 << 30)
        device_matrix = cupy.ones(elements, dtype=cupy.float16)
        bandwidth = device_read_bandwidth(device_matrix)
        del device_matrix
        limits["device_read_GBps"] = bandwidth["best"] / 1e9
        report.add_row(suite, limit="device read bandwidth", value=limits["device_read_GBps"],
                       unit="GB/s", method=f"best of cupy.sum {bandwidth['reduction'] / 1e9:.0f} "
                       f"and d2d copy {bandwidth['copy_read'] / 1e9:.0f} (read half)")
        for dtype in ("float32", "float16"):
            key = f"device_gemm_{dtype}_GFLOPs"
            limits[key] = device_gemm_peak(dtype, 512 if tiny else 4096 if quick else 8192) / 1e9
            report.add_row(suite, limit=f"device GEMM peak {dtype}", value=limits[key],
                           unit="GFLOP/s", method="cupy.matmul (cuBLAS)")
    report.limits.update(limits)
    return limits
