"""The engine issue's headline ratios: scan bandwidth vs memory bandwidth, batched QPS vs peers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from bench.harness import (
    Report,
    fits_on_device,
    gpu_status,
    measure,
    measure_interleaved,
    random_vectors,
)
from bench.limits import host_read_bandwidth, host_read_pass
from bench.peers import release
from bench.reference import check_answers, exact_reference

CHECKED = 16


def _checked(report: Report, suite: str, name: str, search: Callable[..., Any],
             queries: np.ndarray, k: int, reference: tuple[np.ndarray, np.ndarray],
             dtype: str) -> bool:
    """Run ``search`` on the checked queries; refuse (note, False) when it disagrees."""
    scores, ids = search(queries[:CHECKED], k)
    recall, refusal = check_answers(np.asarray(scores), np.asarray(ids), reference[0][:, :k],
                                    reference[1][:, :k], dtype)
    report.add_row(suite, measure=f"{name} recall@{k}", value=round(recall, 4), unit="",
                   detail=refusal or "agrees with the float64 exact answer")
    if refusal:
        report.note(suite, f"{name} refused: {refusal}")
    return refusal is None


def _faiss() -> Any | None:
    """The faiss module, or None where it is not installed (a bare GPU box, say)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def cpu_headlines(report: Report, n: int, dim: int, batch: int = 256, k: int = 10) -> None:
    """Issue 2 on the host: single-query GB/s over bandwidth; Q=256 k=10 QPS over faiss-cpu.

    Without faiss the faiss-cpu peer is skipped with a note (no QPS ratio); the rest runs."""
    from cpu_fallback import CpuIndex

    faiss = _faiss()

    suite = "engine-headline"
    vectors = random_vectors(n, dim, offset=1)
    ids = np.arange(n, dtype=np.int64)
    singles = random_vectors(16, dim, offset=2)
    batches = [random_vectors(batch, dim, offset=3 + r) for r in range(2)]
    reference = exact_reference(ids, vectors, singles[:CHECKED], k, "dot")
    index = CpuIndex(dim, metric="dot", dtype="float32")
    index.add(ids, vectors)
    ours_ok = _checked(report, suite, "CpuIndex", index.search, singles, k, reference, "float32")
    flat: Any = None
    faiss_ok = False
    if faiss is None:
        report.note(suite, "faiss is not installed: the faiss-cpu peer is skipped (no QPS ratio)")
    else:
        flat = faiss.IndexFlatIP(dim)
        flat.add(vectors)
        faiss_ok = _checked(report, suite, "faiss IndexFlatIP",
                            lambda q, kk: _faiss_ids(flat, q, kk, ids), singles, k, reference,
                            "float32")
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        # Side by side: each round runs every system once, so drift hits all alike.
        one = measure_interleaved({
            "read": host_read_pass(vectors, pool, threads),
            "search": lambda q: index.search(q[None], k),
            "gemv": lambda q: vectors @ q,
        }, list(singles), rounds=15)
    # The floor is the fastest read seen in this run: interleaved, or alone (BLAS threads
    # spinning after a search can slow an interleaved read pass down).
    bandwidth = max(vectors.nbytes / one["read"].median_s, host_read_bandwidth(vectors))
    scan = vectors.nbytes / one["search"].median_s
    gemv = vectors.nbytes / one["gemv"].median_s
    report.add_row(suite, measure="host read bandwidth (numpy sum, same matrix, best seen)",
                   value=bandwidth / 1e9, unit="GB/s", detail=f"{vectors.nbytes / 1e9:.2f} GB")
    report.add_row(suite, measure=f"CpuIndex single query N={n} d={dim} float32",
                   value=scan / 1e9, unit="GB/s",
                   detail=f"{one['search'].median_s * 1e3:.2f} ms")
    report.add_row(suite, measure="numpy X @ q alone (GEMV, no top-k), same matrix",
                   value=gemv / 1e9, unit="GB/s",
                   detail=f"{gemv / bandwidth:.2f} of bandwidth: what plain BLAS reaches here")
    report.add_ratio(suite, "CPU single-query scan / memory bandwidth",
                     scan / bandwidth if ours_ok else None, 0.85,
                     detail=f"{scan / 1e9:.1f} / {bandwidth / 1e9:.1f} GB/s, interleaved")
    contenders: dict[str, Callable[[np.ndarray], object]] = {
        "ours": lambda b: index.search(b, k)}
    if flat is not None:
        contenders["faiss"] = lambda b: flat.search(b, k)
    many = measure_interleaved(contenders, batches, rounds=7)
    ours = many["ours"]
    report.add_row(suite, measure=f"CpuIndex Q={batch} k={k}", value=batch / ours.median_s,
                   unit="queries/s", detail=f"{ours.median_s * 1e3:.1f} ms per batch")
    if flat is None:
        return
    theirs = many["faiss"]
    report.add_row(suite, measure=f"faiss IndexFlatIP Q={batch} k={k}",
                   value=batch / theirs.median_s, unit="queries/s",
                   detail=f"{theirs.median_s * 1e3:.1f} ms per batch")
    report.add_ratio(suite, f"CPU Q={batch} k={k} QPS / faiss-cpu IndexFlatIP QPS",
                     theirs.median_s / ours.median_s if faiss_ok and ours_ok else None, 1.0,
                     detail="interleaved")


HALF_DTYPES = ("float16", "bfloat16")


def _search_one(index: Any, query: np.ndarray, k: int) -> object:
    return index.search(query[None], k)
RECALL_QUERIES = 64


def cpu_half_headlines(report: Report, n: int, dim: int, batch: int = 256, k: int = 10) -> None:
    """Issue 16 on the host: float16 and bfloat16 storage against float32 and faiss-cpu's
    flat index, side by side (the engine suite has faiss's own half-precision indexes,
    IndexScalarQuantizer, which score one query at a time: minutes for a Q=256 batch here).

    Single query: GB/s of the bytes each dtype reads over the read bandwidth, and vectors/s
    over float32's. Q=256: QPS over faiss IndexFlatIP (bfloat16) and over float32 (float16).
    Recall@k of each storage against the float64 answer on the float32 vectors."""
    from cpu_fallback import CpuIndex
    from cpu_fallback.half_scoring import kernel_choices

    faiss = _faiss()
    suite = "half-precision"
    vectors = random_vectors(n, dim, offset=1)  # unit rows, as the issue asks
    ids = np.arange(n, dtype=np.int64)
    singles = random_vectors(RECALL_QUERIES, dim, offset=2)
    batches = [random_vectors(batch, dim, offset=3 + r) for r in range(2)]
    reference = exact_reference(ids, vectors, singles, k, "dot")
    indexes = {}
    checked = {}
    for dtype in ("float32", *HALF_DTYPES):
        index = CpuIndex(dim, metric="dot", dtype=dtype)
        for lo in range(0, n, 50_000):
            index.add(ids[lo:lo + 50_000], vectors[lo:lo + 50_000])
        indexes[dtype] = index
        scores, found = index.search(singles, k)
        recall, refusal = check_answers(scores, found, *reference, dtype)
        checked[dtype] = refusal is None
        if dtype != "float32":
            report.add_ratio(suite, f"recall@{k} of {dtype} storage vs float32 ground truth",
                             recall, 0.99, detail=f"{RECALL_QUERIES} queries, unit vectors, "
                             f"d={dim}" + (f"; refused: {refusal}" if refusal else ""))
    report.note(suite, f"kernels chosen by calibration here: {kernel_choices()}")
    peers: dict[str, Any] = {}
    if faiss is None:
        report.note(suite, "faiss is not installed: its peer is skipped (no faiss ratio)")
    else:
        peers["faiss IndexFlatIP float32"] = faiss.IndexFlatIP(dim)
        peers["faiss IndexFlatIP float32"].add(vectors)
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        one = measure_interleaved({
            "read": host_read_pass(vectors, pool, threads),
            **{dtype: partial(_search_one, index, k=k) for dtype, index in indexes.items()},
        }, list(singles[:16]), rounds=15, pause_s=0.2)
    bandwidth = max(vectors.nbytes / one["read"].median_s, host_read_bandwidth(vectors))
    report.add_row(suite, measure="host read bandwidth (numpy sum, float32 matrix, best seen)",
                   value=bandwidth / 1e9, unit="GB/s", detail=f"{vectors.nbytes / 1e9:.2f} GB")
    rates = {}
    for dtype, index in indexes.items():
        seconds = one[dtype].median_s
        rates[dtype] = n / seconds
        read = index.memory_info()["vector_bytes"]  # the bytes one scan reads
        report.add_row(suite, measure=f"single query N={n} d={dim} {dtype}",
                       value=read / seconds / 1e9, unit="GB/s",
                       detail=f"{seconds * 1e3:.2f} ms, {n / seconds / 1e6:.2f} M vectors/s, "
                       f"kernel: {index.describe_kernel(1)}")
        if dtype != "float32":
            ok = checked[dtype] and checked["float32"]
            report.add_ratio(suite, f"single query {dtype} GB/s (bytes read) / read bandwidth",
                             read / seconds / bandwidth if ok else None, 0.8,
                             detail=f"{read / seconds / 1e9:.1f} / {bandwidth / 1e9:.1f} GB/s")
            report.add_ratio(suite, f"single query {dtype} vectors/s / float32 vectors/s",
                             rates[dtype] / rates["float32"] if ok else None, 1.6,
                             detail="interleaved")
    contenders: dict[str, Callable[[np.ndarray], object]] = {
        name: partial(system.search, k=k) for name, system in {**indexes, **peers}.items()}
    many = measure_interleaved(contenders, batches, rounds=5, pause_s=0.2)
    qps = {name: batch / timing.median_s for name, timing in many.items()}
    for name, value in qps.items():
        kernel = indexes[name].describe_kernel(batch) if name in indexes else "faiss"
        report.add_row(suite, measure=f"Q={batch} k={k} {name}", value=value, unit="queries/s",
                       detail=f"{batch / value * 1e3:.1f} ms per batch; kernel: {kernel}")
    flat = qps.get("faiss IndexFlatIP float32")
    report.add_ratio(suite, f"Q={batch} k={k} bfloat16 QPS / faiss-cpu IndexFlatIP float32 QPS",
                     qps["bfloat16"] / flat if flat and checked["bfloat16"] else None, 1.5,
                     detail="interleaved")
    report.add_ratio(suite, f"Q={batch} k={k} float16 QPS / float32 QPS",
                     qps["float16"] / qps["float32"] if checked["float16"] else None, 1.0,
                     detail="interleaved")


def _faiss_ids(index: Any, queries: np.ndarray, k: int,
               ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, positions = index.search(queries, k)
    return scores, ids[positions]


def _stream(n: int, dim: int, chunk: int = 250_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for lo in range(0, n, chunk):
        count = min(chunk, n - lo)
        yield np.arange(lo, lo + count, dtype=np.int64), random_vectors(count, dim, offset=7 + lo)


def _merge(best: tuple[np.ndarray, np.ndarray] | None, new: tuple[np.ndarray, np.ndarray],
           k: int) -> tuple[np.ndarray, np.ndarray]:
    if best is None:
        return new
    scores = np.concatenate([best[0], new[0]], 1)
    ids = np.concatenate([best[1], new[1]], 1)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def gpu_headlines(report: Report, n: int, dim: int, batch: int = 1024, k: int = 100) -> None:
    """On a GPU: float16 single-query scan / device bandwidth; Q=1024 k=100 vs torch, faiss-gpu."""
    import cupy
    import torch

    from bench.limits import device_read_bandwidth
    from gpu import GpuIndex

    suite = "engine-headline-gpu"
    sync = cupy.cuda.Device().synchronize
    singles = random_vectors(16, dim, offset=2)
    batches = [random_vectors(batch, dim, offset=3 + r) for r in range(2)]
    checked = np.concatenate([singles, batches[0]])[:CHECKED]
    index = GpuIndex(dim, metric="dot", dtype="float16")
    device_matrix = cupy.empty((n, dim), dtype=cupy.float16)
    reference: tuple[np.ndarray, np.ndarray] | None = None
    for ids, block in _stream(n, dim):
        index.add(ids, block)
        device_matrix[ids[0] : ids[-1] + 1] = cupy.asarray(block.astype(np.float16))
        reference = _merge(reference, exact_reference(ids, block, checked, k, "dot"), k)
    assert reference is not None
    bandwidth = device_read_bandwidth(device_matrix)
    report.add_row(suite, measure="device read bandwidth (same matrix, float16)",
                   value=bandwidth["best"] / 1e9, unit="GB/s",
                   detail=f"cupy.sum {bandwidth['reduction'] / 1e9:.0f}, copy read "
                          f"{bandwidth['copy_read'] / 1e9:.0f}")
    torch_matrix = torch.from_dlpack(device_matrix)  # zero-copy
    ok = _checked(report, suite, "GpuIndex float16", index.search, checked, k, reference,
                  "float16")
    single = measure(lambda q: index.search(q, 10), [s[None] for s in singles], sync=sync,
                     warmup=3, budget_s=5.0)
    scan = n * dim * 2 / single.median_s
    report.add_row(suite, measure=f"GpuIndex single query N={n} d={dim} float16",
                   value=scan / 1e9, unit="GB/s",
                   detail=f"{single.median_s * 1e3:.3f} ms, {n / single.median_s:.3g} vectors/s")
    report.add_ratio(suite, "GPU single-query float16 scan / device read bandwidth",
                     scan / bandwidth["best"] if ok else None, 0.8,
                     detail=f"{scan / 1e9:.0f} / {bandwidth['best'] / 1e9:.0f} GB/s")
    ours = measure(lambda b: index.search(b, k), batches, sync=sync, warmup=2, budget_s=8.0)
    report.add_row(suite, measure=f"GpuIndex Q={batch} k={k} float16",
                   value=batch / ours.median_s, unit="queries/s",
                   detail=f"{n * batch / ours.median_s:.3g} vectors scored/s")

    def torch_search(queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(queries).to("cuda", torch.float16)
        values, idx = torch.topk(torch.mm(q, torch_matrix.T).float(), kk, dim=1)
        return values.cpu().numpy(), idx.cpu().numpy()

    torch_ok = _checked(report, suite, "torch.mm+topk float16", torch_search, checked, k,
                        reference, "float16")
    theirs = measure(lambda b: torch_search(b, k), batches, sync=sync, warmup=2, budget_s=8.0)
    report.add_row(suite, measure=f"torch.mm+topk Q={batch} k={k} float16",
                   value=batch / theirs.median_s, unit="queries/s", detail="")
    report.add_ratio(suite, f"GPU Q={batch} k={k} QPS / torch.mm+topk QPS",
                     theirs.median_s / ours.median_s if ok and torch_ok else None, 1.0)
    _faiss_gpu_ratio(report, suite, n, dim, batches, checked, k, reference, ours.median_s)


def _faiss_gpu_ratio(report: Report, suite: str, n: int, dim: int, batches: list[np.ndarray],
                     checked: np.ndarray, k: int, reference: tuple[np.ndarray, np.ndarray],
                     ours_s: float) -> None:
    try:
        import faiss

        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            report.note(suite, "faiss-gpu is not installed: no faiss-gpu ratio")
            return
    except ImportError:
        report.note(suite, "faiss is not installed: no faiss-gpu ratio")
        return
    import cupy

    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.useFloat16 = True
    flat = faiss.GpuIndexFlatIP(resources, dim, config)
    for _, block in _stream(n, dim):
        flat.add(block)
    ok = _checked(report, suite, "faiss-gpu IndexFlatIP float16",
                  lambda q, kk: flat.search(q, kk), checked, k, reference, "float16")
    theirs = measure(lambda b: flat.search(b, k), batches,
                     sync=cupy.cuda.Device().synchronize, warmup=2, budget_s=8.0)
    report.add_ratio(suite, f"GPU Q={len(batches[0])} k={k} QPS / faiss-gpu QPS",
                     theirs.median_s / ours_s if ok else None, 1.0)


def gpu_scale(report: Report, n: int, dim: int, batch: int = 1024, k: int = 100) -> None:
    """Vectors scored per second by GpuIndex (float16) at N=1e7, against MemSQL's claims."""
    import cupy

    from gpu import GpuIndex

    suite = "engine-headline-gpu"
    if not fits_on_device(n * dim * 2 * 1.3):
        report.note(suite, f"N={n} d={dim} float16 does not fit in device memory: skipped")
        return
    sync = cupy.cuda.Device().synchronize
    singles = random_vectors(16, dim, offset=2)
    batches = [random_vectors(batch, dim, offset=3 + r) for r in range(2)]
    index = GpuIndex(dim, metric="dot", dtype="float16")
    reference: tuple[np.ndarray, np.ndarray] | None = None
    for ids, block in _stream(n, dim):
        index.add(ids, block)
        reference = _merge(reference, exact_reference(ids, block, singles, k, "dot"), k)
    assert reference is not None
    if not _checked(report, suite, f"GpuIndex float16 N={n}", index.search, singles, k,
                    reference, "float16"):
        return
    single = measure(lambda q: index.search(q, 10), [s[None] for s in singles], sync=sync,
                     warmup=2, budget_s=5.0)
    many = measure(lambda b: index.search(b, k), batches, sync=sync, warmup=1, budget_s=10.0)
    for label, seconds, count in (("Q=1 k=10", single.median_s, 1),
                                  (f"Q={batch} k={k}", many.median_s, batch)):
        rate = n * count / seconds
        report.add_row(suite, measure=f"GpuIndex float16 N={n} d={dim} {label}", value=rate,
                       unit="vectors scored/s", detail=f"{seconds * 1e3:.2f} ms per call")
        report.add_ratio(suite, f"vectors/s at N={n} {label} / MemSQL 1.25e7 per node",
                         rate / 1.25e7, None, detail=f"/ MemSQL 100 nodes 1e9: {rate / 1e9:.2f}")


def run_headlines(report: Report, n: int, dim: int, gpu_n: int, gpu_scale_n: int = 0) -> None:
    """Both headline sets that this machine can run."""
    cpu_headlines(report, n, dim)
    cpu_half_headlines(report, n, dim)
    usable, detail = gpu_status()
    if usable:
        gpu_headlines(report, gpu_n, dim)
        release()
        if gpu_scale_n:
            gpu_scale(report, gpu_scale_n, dim)
    else:
        report.note("engine-headline", f"GPU headlines not run: {detail}")


def run_headline(report: Report, quick: bool = False) -> None:
    """The headline suite of ``python -m bench``: issue 2's ratios (smaller with --quick)."""
    run_headlines(report, 20_000 if quick else 200_000, 2048,
                  200_000 if quick else 1_000_000, 0 if quick else 10_000_000)
