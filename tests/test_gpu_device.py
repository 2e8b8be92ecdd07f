"""Checks that need a real CUDA device: cuBLAS float16 GEMM output, DLPack top-k, OOM."""

from __future__ import annotations

import numpy as np
import pytest

from tests.index_support import GPU_OK, GPU_WHY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU_OK, reason=f"no GPU: {GPU_WHY}")]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_scores_are_float32_and_write_into_a_slice(dtype):
    import cupy

    from gpu.device import CudaOps

    ops = CudaOps()
    rng = np.random.default_rng()
    queries = rng.standard_normal((5, 300)).astype(dtype)
    rows = rng.standard_normal((777, 300)).astype(dtype)
    buffer = cupy.full((5, 1000), cupy.nan, dtype=cupy.float32)
    ops.scores(cupy.asarray(queries), cupy.asarray(rows), out=buffer[:, 100:877])
    got = cupy.asnumpy(buffer)
    expected = queries.astype(np.float64) @ rows.astype(np.float64).T
    np.testing.assert_allclose(got[:, 100:877], expected, rtol=1e-3, atol=1e-3)
    assert np.isnan(got[:, :100]).all() and np.isnan(got[:, 877:]).all()  # nothing else written


def test_top_k_matches_numpy():
    import cupy

    from gpu.device import CudaOps

    ops = CudaOps()
    keys = np.random.default_rng().standard_normal((7, 5000)).astype(np.float32)
    values, cols = ops.top_k(cupy.asarray(keys), 33)
    expected = -np.sort(-keys, axis=1)[:, :33]
    np.testing.assert_array_equal(cupy.asnumpy(values), expected)
    np.testing.assert_array_equal(np.take_along_axis(keys, cupy.asnumpy(cols), 1), expected)


def test_out_of_memory_is_a_clear_error_and_changes_nothing():
    import cupy

    from gpu import GpuIndex

    free, _ = cupy.cuda.runtime.memGetInfo()
    rows = int(free // (4096 * 4)) + 1024  # one block larger than the free memory
    index = GpuIndex(4096, "dot", block_rows=rows)
    with pytest.raises(MemoryError, match="GPU out of memory"):
        index.add([1], np.ones((1, 4096), np.float32))
    assert len(index) == 0


def test_gpu_and_cpu_agree_on_a_larger_index():
    from cpu_fallback import CpuIndex
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
