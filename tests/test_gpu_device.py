"""GpuIndex's device layer: out of memory, float16 queries, ties, scratch, the availability
probe and pinned uploads. Most run over the emulated device (tests/index_support.py);
those marked ``gpu`` need a real CUDA device (cuBLAS, torch.topk via DLPack, real OOM)."""

from __future__ import annotations

import ctypes
import sys
import tracemalloc
import types
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import pytest

from cpu_fallback import CpuIndex
from gpu import device as gpu_device
from tests.index_support import (
    GPU_OK,
    GPU_WHY,
    EmulatedCudaOps,
    EmulatedGpuIndex,
    reference_search,
    stored_values,
)

needs_gpu = pytest.mark.skipif(not GPU_OK, reason=f"no GPU: {GPU_WHY}")
DIM = 8


def _data(n: int, seed: int = 0, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**6, n, replace=False).astype(np.int64)
    return ids, rng.standard_normal((n, dim)).astype(np.float32)


def _assert_same_answers(index, ids, vectors, metric="l2"):
    """len, search and range search as the float64 reference has them for (ids, vectors)."""
    assert len(index) == len(ids)
    n = len(index._blocks)
    assert len(index._block_ids) == n and len(index._block_sq_norms) == n
    queries = np.random.default_rng(99).standard_normal((4, DIM)).astype(np.float32)
    stored = stored_values(vectors, metric, "float32")
    scores, got = index.search(queries, 12)
    ref_s, ref_i = reference_search(stored, ids, queries, metric, 12)
    np.testing.assert_array_equal(got, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-4)
    if len(ids):
        np.testing.assert_allclose(index.get(ids), vectors, rtol=1e-6)


def _allocations(build, act) -> int:
    """Device allocations ``act`` makes on a fresh ``build()`` index."""
    index = build()
    before = index._ops.allocations
    act(index)
    return index._ops.allocations - before


# ---------------------------------------------------------------- out of memory (emulated)
ADD_CASES = {
    # (block_rows, rows held, rows added, rows upserted): which allocations the add makes
    "first block": (4096, 0, 50, 0),
    "last block grows": (4096, 1000, 500, 40),
    "several new blocks": (64, 100, 300, 40),
}


@pytest.mark.parametrize("case", ADD_CASES)
def test_out_of_memory_in_add_changes_nothing_and_the_index_recovers(case):
    block_rows, held, added, upserted = ADD_CASES[case]
    ids, vectors = _data(held + added)
    rng = np.random.default_rng(1)
    # New rows, and some held ids in shuffled order (scattered writes into several blocks).
    batch_ids = np.concatenate([ids[held:], rng.permutation(ids[:held])[:upserted]])
    batch = rng.standard_normal((len(batch_ids), DIM)).astype(np.float32)

    def build():
        index = EmulatedGpuIndex(DIM, "l2", block_rows=block_rows)
        if held:
            index.add(ids[:held], vectors[:held])
        return index

    total = _allocations(build, lambda index: index.add(batch_ids, batch))
    assert total >= 3 + 1  # at least one block (vectors, ids, norms) and the upload
    after = CpuIndex(DIM, "l2")
    if held:
        after.add(ids[:held], vectors[:held])
    after.add(batch_ids, batch)
    final_ids = np.sort(np.concatenate([ids[:held], ids[held:]]))
    for nth in range(1, total + 1):  # the 1st, 2nd, 3rd ... allocation fails
        index = build()
        index._ops.fail_allocation(nth)
        with pytest.raises(MemoryError, match="GPU out of memory while adding vectors"):
            index.add(batch_ids, batch)
        _assert_same_answers(index, ids[:held], vectors[:held])
        index.add(batch_ids, batch)  # and the same add works afterwards
        _assert_same_answers(index, final_ids, after.get(final_ids))


def test_out_of_memory_in_remove_changes_nothing():
    ids, vectors = _data(300)

    def build():
        index = EmulatedGpuIndex(DIM, "l2", block_rows=64)
        index.add(ids, vectors)
        return index

    gone = ids[::7]  # holes in every block, filled from the last ones
    total = _allocations(build, lambda index: index.remove(gone))
    assert total >= 2
    keep = ~np.isin(ids, gone)
    for nth in range(1, total + 1):
        index = build()
        index._ops.fail_allocation(nth)
        with pytest.raises(MemoryError, match="while compacting after remove"):
            index.remove(gone)
        _assert_same_answers(index, ids, vectors)
        assert index.remove(gone) == len(gone)
        _assert_same_answers(index, ids[keep], vectors[keep])


def test_out_of_memory_in_search_scratch_is_a_memory_error_and_the_index_stays_usable():
    ids, vectors = _data(2000)
    queries = np.random.default_rng(2).standard_normal((9, DIM)).astype(np.float32)
    allow = ids[::3]

    def build():
        index = EmulatedGpuIndex(DIM, "l2", block_rows=300, scratch_bytes=9 * 6 * 700)
        index.add(ids, vectors)
        return index

    def searches(index):
        index.search(queries, 25, allow=allow)
        index.range_search(queries, 3.0)

    total = _allocations(build, searches)
    index = build()
    expected = index.search(queries, 25, allow=allow), index.range_search(queries, 3.0)
    for nth in range(1, total + 1):
        index._ops.fail_allocation(nth)
        with pytest.raises(MemoryError, match=r"GPU out of memory while (range )?searching"):
            searches(index)
        for got, want in zip((index.search(queries, 25, allow=allow),
                              index.range_search(queries, 3.0)), expected, strict=True):
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)
        _assert_same_answers(index, ids, vectors)


# ---------------------------------------------------------------- float16 queries
def test_emulated_top_k_ranks_nan_first_like_torch():
    keys = np.array([[1.0, np.nan, 3.0, -np.inf]], np.float32)
    values, cols = EmulatedCudaOps().top_k(keys, 3)
    assert cols.tolist() == [[1, 2, 0]] and np.isnan(values[0, 0])


@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_float16_queries_that_overflow_are_refused(metric):
    ids, vectors = _data(500)
    index = EmulatedGpuIndex(DIM, metric, "float16")
    index.add(ids, vectors)
    query = np.zeros((2, DIM), np.float32)
    query[1, 3] = 1e5  # above float16's 65504: would score inf/NaN
    with pytest.raises(ValueError, match="queries overflow float16 storage"):
        index.search(query, 5)
    with pytest.raises(ValueError, match="queries overflow float16 storage"):
        index.range_search(query, 0.0)
    query[1, 3] = 6e4  # in range: answered
    _, got = index.search(query, 5)
    _, ref = reference_search(stored_values(vectors, metric, "float16"), ids, query, metric, 5)
    np.testing.assert_array_equal(got[1], ref[1])


# ---------------------------------------------------------------- ties at the k-th place
@pytest.mark.parametrize("scratch_bytes", [None, 3 * 6 * 1500])
def test_ties_at_the_kth_place_break_by_id_and_copy_only_the_tied_ids(scratch_bytes):
    rng = np.random.default_rng(3)
    n = 5000
    values = rng.permutation(n).astype(np.float32)
    values[rng.choice(n, 60, replace=False)] = 4990.0  # 60 rows tie just inside the top 20
    vectors = np.zeros((n, 4), np.float32)
    vectors[:, 0], vectors[:, 1] = values, rng.permutation(n)
    ids = rng.choice(10**6, n, replace=False).astype(np.int64)
    index = EmulatedGpuIndex(4, "dot", block_rows=1000, scratch_bytes=scratch_bytes)
    index.add(ids, vectors)
    # Two queries cut the tie; the third ranks by distinct values (no tie to settle).
    queries = np.array([[1, 0, 0, 0], [2, 0, 0, 0], [0, 1, 0, 0]], np.float32)
    for k in (5, 20, 50):
        host_before = index._ops.host_bytes
        scores, got = index.search(queries, k)
        copied = index._ops.host_bytes - host_before
        ref_s, ref_i = reference_search(vectors.astype(np.float64), ids, queries, "dot", k)
        np.testing.assert_array_equal(got, ref_i)
        np.testing.assert_array_equal(scores, ref_s)
        # The k results, the tied ids and a few counts, per top-k: never a key row.
        assert copied < n * 4 // 2, copied


# ---------------------------------------------------------------- scratch accounting
@pytest.mark.parametrize("metric", ["dot", "cosine", "l2"])
def test_range_search_stays_within_the_scratch_budget(metric):
    """Peak memory of an emulated range search (numpy arrays are what tracemalloc sees)."""
    scratch = 1 << 20
    ids, vectors = _data(40_000)
    queries = np.random.default_rng(4).standard_normal((64, DIM)).astype(np.float32)
    index = EmulatedGpuIndex(DIM, metric, block_rows=4096, scratch_bytes=scratch)
    index.add(ids, vectors)
    stored = stored_values(vectors, metric, "float32")
    threshold = 11.0 if metric == "dot" else 0.97 if metric == "cosine" else 0.6  # few hits
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        lims, scores, got, totals = index.range_search(queries, threshold)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert 0 < len(got) < 2000  # the hits (results) stay small next to the scratch
    assert peak <= scratch + (32 << 10), peak
    ref_s, ref_i = reference_search(stored, ids, queries, metric, len(ids), threshold=threshold)
    for q in range(len(queries)):
        found = ref_i[q] != -1
        assert got[lims[q]:lims[q + 1]].tolist() == ref_i[q][found].tolist()
        np.testing.assert_allclose(scores[lims[q]:lims[q + 1]], ref_s[q][found], rtol=1e-4)
        assert totals[q] == found.sum()


# ---------------------------------------------------------------- gpu_available
@pytest.fixture
def one_fake_device(monkeypatch) -> Iterator[None]:
    """CuPy sees one device; cuBLAS imports; torch sees CUDA; the probe passes. Each test
    breaks one of these. gpu_available's cache is cleared around it."""
    import cupy
    import torch

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 1)
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceProperties", lambda i: {"name": b"Fake"})
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.cublas",
                        types.ModuleType("cublas"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_device, "_probe", lambda name: None)
    gpu_device.gpu_available.cache_clear()
    yield
    gpu_device.gpu_available.cache_clear()


def test_gpu_available_with_everything_working(one_fake_device):
    assert gpu_device.gpu_available() == (True, "Fake")


def test_gpu_available_needs_cublas(one_fake_device, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.cublas", None)
    ok, why = gpu_device.gpu_available()
    assert not ok and "cuBLAS is not loadable on Fake" in why


def test_gpu_available_needs_torch_cuda(one_fake_device, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = gpu_device.gpu_available()
    assert not ok and "torch sees no CUDA device" in why


def test_gpu_available_runs_the_probe_and_auto_falls_back_to_the_cpu(one_fake_device,
                                                                     monkeypatch):
    from service.backend import select_backend

    def broken(name):
        raise RuntimeError("CUBLAS_STATUS_ARCH_MISMATCH")

    monkeypatch.setattr(gpu_device, "_probe", broken)
    ok, why = gpu_device.gpu_available()
    assert not ok and "probe" in why and "CUBLAS_STATUS_ARCH_MISMATCH" in why
    choice = select_backend.__wrapped__("auto")  # uncached: decides from this state
    assert choice.name == "cpu" and "CUBLAS_STATUS_ARCH_MISMATCH" in choice.reason
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_ARCH_MISMATCH"):
        select_backend.__wrapped__("gpu")


def test_gpu_available_is_cached(one_fake_device, monkeypatch):
    import cupy

    calls = []
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: calls.append(1) or 1)
    assert gpu_device.gpu_available() == gpu_device.gpu_available() == (True, "Fake")
    assert len(calls) == 1


# ---------------------------------------------------------------- pinned staging (faked)
class _FakePinned(bytearray):
    @property
    def ptr(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self))


class _FakePointer:
    def __init__(self, array: np.ndarray, offset: int = 0) -> None:
        self.array, self.offset = array, offset

    def __add__(self, offset: int) -> _FakePointer:
        return _FakePointer(self.array, self.offset + offset)

    def copy_from_host_async(self, ptr: int, n: int, stream: object) -> None:
        ctypes.memmove(self.array.ctypes.data + self.offset, ptr, n)


class _FakeDeviceArray:
    def __init__(self, shape, dtype) -> None:
        self.host = np.zeros(shape, dtype)
        self.data = _FakePointer(self.host)


class _FakeCupy:
    """What _PinnedStaging touches of CuPy; copies are immediate."""

    def __init__(self, pinning_fails: bool = False) -> None:
        self.pinned = 0
        self.events = types.SimpleNamespace(synchronize=lambda: None)

        def alloc_pinned_memory(n: int) -> _FakePinned:
            if pinning_fails:
                raise RuntimeError("cudaErrorMemoryAllocation")
            self.pinned += 1
            return _FakePinned(n)

        stream = types.SimpleNamespace(record=lambda: self.events)
        self.cuda = types.SimpleNamespace(alloc_pinned_memory=alloc_pinned_memory,
                                          get_current_stream=lambda: stream)
        self.empty = _FakeDeviceArray
        self.asarray = lambda host: types.SimpleNamespace(host=host.copy())


@pytest.mark.parametrize("nbytes", [3 * 1000, 4 * 1000 + 8, 1000])
def test_pinned_staging_uploads_in_chunks(monkeypatch, nbytes):
    monkeypatch.setattr(gpu_device, "STAGING_BYTES", 1000)
    host = np.random.default_rng(5).standard_normal(nbytes // 8)  # float64
    fake = _FakeCupy()
    staging = gpu_device._PinnedStaging()
    for _ in range(2):  # the two buffers are made once and reused
        np.testing.assert_array_equal(staging.upload(fake, host).host, host)
    assert fake.pinned == 2 and not staging.disabled


def test_pinned_staging_falls_back_when_pinning_fails():
    host = np.arange(1000.0)
    staging = gpu_device._PinnedStaging()
    np.testing.assert_array_equal(staging.upload(_FakeCupy(pinning_fails=True), host).host,
                                  host)
    assert staging.disabled


# ---------------------------------------------------------------- on a real device
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, ml_dtypes.bfloat16])
def test_scores_are_float32_and_write_into_a_slice(dtype):
    import cupy

    from gpu.device import CudaOps

    ops = CudaOps()
    rng = np.random.default_rng()
    queries = rng.standard_normal((5, 300)).astype(dtype)
    rows = rng.standard_normal((777, 300)).astype(dtype)
    buffer = cupy.full((5, 1000), cupy.nan, dtype=cupy.float32)
    # bfloat16 travels as its bits (CuPy has no such dtype): CUDA_R_16BF operands
    bits = np.uint16 if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else dtype
    ops.scores(cupy.asarray(queries.view(bits)), cupy.asarray(rows.view(bits)),
               out=buffer[:, 100:877])
    got = cupy.asnumpy(buffer)
    expected = queries.astype(np.float64) @ rows.astype(np.float64).T
    np.testing.assert_allclose(got[:, 100:877], expected, rtol=1e-3, atol=1e-3)
    assert np.isnan(got[:, :100]).all() and np.isnan(got[:, 877:]).all()  # nothing else written


@pytest.mark.gpu
@needs_gpu
def test_top_k_matches_numpy_and_ranks_nan_first():
    import cupy

    from gpu.device import CudaOps

    ops = CudaOps()
    keys = np.random.default_rng().standard_normal((7, 5000)).astype(np.float32)
    values, cols = ops.top_k(cupy.asarray(keys), 33)
    expected = -np.sort(-keys, axis=1)[:, :33]
    np.testing.assert_array_equal(cupy.asnumpy(values), expected)
    np.testing.assert_array_equal(np.take_along_axis(keys, cupy.asnumpy(cols), 1), expected)
    # The order EmulatedCudaOps.top_k copies: NaN above every number.
    nan_keys = np.array([[1.0, np.nan, 3.0, -np.inf]], np.float32)
    values, cols = ops.top_k(cupy.asarray(nan_keys), 3)
    assert cupy.asnumpy(cols).tolist() == [[1, 2, 0]]


@pytest.mark.gpu
@needs_gpu
def test_gpu_available_probe_runs_on_the_device():
    gpu_device.gpu_available.cache_clear()
    ok, name = gpu_device.gpu_available()
    assert ok, name
    gpu_device._probe(name)  # float16 and float32 gemmEx, torch.topk via DLPack


@pytest.mark.gpu
@needs_gpu
def test_out_of_memory_is_a_clear_error_and_changes_nothing():
    import cupy

    from gpu import GpuIndex
    from gpu.index import MIN_BLOCK_ROWS

    _, total = cupy.cuda.runtime.memGetInfo()
    # The first block holds MIN_BLOCK_ROWS rows however few are added: rows this wide
    # make that block larger than the whole device (one row is total / 1024 bytes).
    dim = int(total // (4 * MIN_BLOCK_ROWS)) + 1
    index = GpuIndex(dim, "dot")
    with pytest.raises(MemoryError, match="GPU out of memory while adding vectors"):
        index.add([1], np.ones((1, dim), np.float32))
    assert len(index) == 0 and index.memory_info()["capacity_rows"] == 0
    del index
    small = GpuIndex(DIM, "l2")  # the device is still usable
    ids, vectors = _data(100)
    small.add(ids, vectors)
    _assert_same_answers(small, ids, vectors)


@pytest.mark.gpu
@needs_gpu
def test_float16_query_overflow_is_refused_on_the_device():
    from gpu import GpuIndex

    ids, vectors = _data(500)
    index = GpuIndex(DIM, "dot", "float16")
    index.add(ids, vectors)
    query = np.full((1, DIM), 1e5, np.float32)
    with pytest.raises(ValueError, match="queries overflow float16 storage"):
        index.search(query, 5)


@pytest.mark.gpu
@needs_gpu
def test_pinned_staged_uploads_round_trip():
    import cupy

    from gpu.device import STAGING_BYTES, CudaOps

    ops = CudaOps()
    rng = np.random.default_rng()
    host = rng.standard_normal((STAGING_BYTES * 5 // 2 // 2048 + 3, 512)).astype(np.float32)
    for array in (host, host[:, ::2], host.astype(np.float16)):  # any layout and dtype
        np.testing.assert_array_equal(cupy.asnumpy(ops.to_device(array)), array)
    staging = gpu_device._PinnedStaging()
    staging.disabled = True  # the fallback: CuPy's own upload
    np.testing.assert_array_equal(cupy.asnumpy(staging.upload(cupy, host)), host)


@pytest.mark.gpu
@needs_gpu
def test_gpu_and_cpu_agree_on_a_larger_index():
    from gpu import GpuIndex

    rng = np.random.default_rng()
    vectors = rng.standard_normal((200_000, 256)).astype(np.float32)
    queries = rng.standard_normal((64, 256)).astype(np.float32)
    cpu, gpu = CpuIndex(256, "cosine"), GpuIndex(256, "cosine", block_rows=50_000)
    for index in (cpu, gpu):
        index.add(np.arange(len(vectors)), vectors)
    c_scores, c_ids = cpu.search(queries, 100)
    g_scores, g_ids = gpu.search(queries, 100)
    np.testing.assert_allclose(g_scores, c_scores, atol=1e-5)
    assert (g_ids == c_ids).mean() > 0.999
