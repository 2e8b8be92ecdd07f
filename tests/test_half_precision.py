"""Half-precision storage on the CPU: the numba kernels, the bfloat16 candidate path's
exactness on adversarial near-ties and heavy ties, and the calibrated kernel choice."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from cpu_fallback import CpuIndex, half
from cpu_fallback.half_scoring import (
    BF16_GEMM,
    FUSED,
    WIDEN_BLAS,
    HalfScorer,
    KernelChoice,
    kernel_choice,
    kernel_choices,
)

HALF = ["float16", "bfloat16"]
BF16 = np.dtype(ml_dtypes.bfloat16)


def storage(name: str) -> np.dtype:
    return np.dtype(np.float16) if name == "float16" else BF16


@pytest.mark.parametrize("dtype", HALF)
def test_kernels_equal_a_float64_reference(dtype):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((301, 77)).astype(np.float32)
    if dtype == "float16":  # subnormals, signed zero and the largest value convert exactly
        rows[0, :5] = [6e-8, -3e-6, -0.0, 65504, -65504]
    stored = rows.astype(storage(dtype))
    queries = rng.standard_normal((3, 77)).astype(np.float32)
    exact = stored.astype(np.float64) @ queries.astype(np.float64).T
    scale = np.abs(stored.astype(np.float64)) @ np.abs(queries.astype(np.float64)).T

    widened = np.empty(rows.shape, np.float32)
    half.widen(half.bits(stored), widened)
    np.testing.assert_array_equal(widened, stored.astype(np.float32))
    out = np.empty((len(rows), 3), np.float32)
    half.dots(half.bits(stored), queries, out)
    assert (np.abs(out - exact) <= 1e-6 * scale + 1e-30).all()
    one = np.empty(len(rows), np.float32)  # 301 rows: four at a time, and a remainder
    half.gemv(half.bits(stored), queries[1], one)
    assert (np.abs(one - exact[:, 1]) <= 1e-6 * scale[:, 1] + 1e-30).all()
    row_of, query_of = np.array([5, 0, 300, 5]), np.array([2, 1, 0, 0])
    pairs = np.empty(4, np.float32)
    half.pair_dots(half.bits(stored), row_of, queries, query_of, pairs)
    np.testing.assert_allclose(pairs, exact[row_of, query_of], rtol=1e-6, atol=1e-6)


def test_float16_to_bfloat16_rounds_to_nearest_even_like_torch():
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((50, 64)) * 100).astype(np.float16)
    rows[0, :3] = [6e-8, 65504, -0.0]
    out = np.empty(rows.shape, np.int16)
    errors = np.empty(len(rows), np.float32)
    half.to_bfloat16(half.bits(rows), out, errors)
    expected = torch.from_numpy(rows).to(torch.bfloat16)
    np.testing.assert_array_equal(out, expected.view(torch.int16).numpy())
    gaps = rows.astype(np.float64) - expected.double().numpy()
    np.testing.assert_allclose(errors, np.linalg.norm(gaps, axis=1), rtol=1e-5)


def scorer(dtype: str, dim: int, single: str, batch: str) -> HalfScorer:
    return HalfScorer(storage(dtype), dim, KernelChoice(single, batch))


def top_k_reference(stored, queries, k, metric):
    s = stored.astype(np.float64)
    q = queries.astype(np.float64)
    keys = 2 * q @ s.T - (s * s).sum(1) if metric == "l2" else q @ s.T
    order = np.argsort(-keys, axis=1, kind="stable")[:, :k]
    return keys, order


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_candidates_keep_the_exact_top_k_under_near_ties(dtype, metric):
    """Rows whose scores differ by far less than a bfloat16 step around the k-th place: the
    candidate path must still return the top k of the exact scores."""
    rng = np.random.default_rng(2)
    n, dim, nq, k = 3000, 96, 24, 10
    base = rng.standard_normal(dim).astype(np.float32)
    rows = rng.standard_normal((n, dim)).astype(np.float32) * 0.3
    rows[:60] = base + 1e-3 * rng.standard_normal((60, dim)).astype(np.float32)
    queries = (base + 0.05 * rng.standard_normal((nq, dim))).astype(np.float32)
    stored = rows.astype(storage(dtype))
    s64 = stored.astype(np.float64)
    sq = (stored.astype(np.float32) ** 2).sum(1).astype(np.float32)
    gemm = scorer(dtype, dim, FUSED, BF16_GEMM)
    keys, ids = gemm.candidates(stored, queries, gemm.query_operand(queries), k,
                                np.arange(n, dtype=np.int64), sq, metric == "l2", None,
                                gemm.scratch())
    ref_keys, ref_top = top_k_reference(stored, queries, k, metric)
    assert ids.ndim == 2 and ids.shape[1] < n  # packed candidates, not the whole panel
    for j in range(nq):
        got = ids[j][np.argsort(-keys[j], kind="stable")][:k]
        # equal sets, up to float32 ties at the k-th place
        kth = ref_keys[j, ref_top[j, -1]]
        tol = 1e-5 * (np.abs(queries[j]).astype(np.float64) @ np.abs(s64).T).max()
        assert (ref_keys[j, got] >= kth - tol).all()
        np.testing.assert_allclose(np.sort(keys[j][keys[j] > -np.inf])[::-1][:k],
                                   ref_keys[j, ref_top[j]], rtol=1e-5, atol=tol)


@pytest.mark.parametrize("dtype", HALF)
def test_heavy_ties_score_the_panel_whole(dtype):
    rows = np.tile(np.float32([1, 2, 3, 4]), (2000, 1)).astype(storage(dtype))
    queries = np.ones((16, 4), np.float32)
    gemm = scorer(dtype, 4, FUSED, BF16_GEMM)
    ids = np.arange(2000, dtype=np.int64)
    keys, got_ids = gemm.candidates(rows, queries, gemm.query_operand(queries), 3, ids,
                                    np.full(2000, 30, np.float32), False, None, gemm.scratch())
    assert got_ids is ids and keys.shape == (16, 2000) and (keys == 10).all()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("metric", ["dot", "cosine", "l2"])
def test_every_kernel_choice_gives_the_same_answer(dtype, metric, monkeypatch):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((5000, 40)).astype(np.float32)
    vectors[100:140] = vectors[7]  # exact ties, broken by id
    queries = rng.standard_normal((30, 40)).astype(np.float32)
    allow = rng.choice(5000, 2500, replace=False)
    answers = []
    for single, batch in [(FUSED, BF16_GEMM), (WIDEN_BLAS, WIDEN_BLAS), (FUSED, WIDEN_BLAS)]:
        monkeypatch.setattr("cpu_fallback.half_scoring.kernel_choice",
                            lambda _storage, s=single, b=batch: KernelChoice(s, b))
        index = CpuIndex(40, metric, dtype, block_rows=1024)
        index.add(np.arange(5000), vectors)
        for nq in (1, 30):
            for allowed in (None, allow, allow[:50]):  # all, masked, gathered
                answers.append(index.search(queries[:nq], 12, allow=allowed))
        answers.append(index.range_search(queries, 0.0 if metric != "l2" else 8.0))
    per_choice = len(answers) // 3
    for other in (answers[per_choice:2 * per_choice], answers[2 * per_choice:]):
        for mine, theirs in zip(answers[:per_choice], other, strict=True):
            for a, b in zip(mine, theirs, strict=True):
                if a.dtype == np.float32:
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
                else:
                    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", HALF)
def test_the_bound_holds_for_every_row(dtype):
    """|approx - exact| within the bound the candidate path uses, on rows of mixed norms."""
    rng = np.random.default_rng(4)
    rows = (rng.standard_normal((2000, 300)) * rng.uniform(0.01, 50, (2000, 1))).astype(
        np.float32).astype(storage(dtype))
    queries = (rng.standard_normal((20, 300)) * 7).astype(np.float32)
    gemm = scorer(dtype, 300, FUSED, BF16_GEMM)
    operand = gemm.query_operand(queries)
    bf16_rows, row_errors = gemm._bf16_rows(rows, gemm.scratch())
    approx = torch.mm(operand.rounded, bf16_rows.T).float().numpy().astype(np.float64)
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    sq = (rows.astype(np.float32) ** 2).sum(1)
    bound = (2**-8 / (1 - 2**-8) * np.abs(approx) + operand.error[:, None] * np.sqrt(sq)
             + operand.weight[:, None] * row_errors)
    assert (np.abs(approx - exact) <= bound).all()
    if dtype == "float16":  # the rounding errors are real: the bound is not vacuous
        assert (row_errors > 0).all()
    assert (bound < 0.02 * np.linalg.norm(queries, axis=1)[:, None] * np.sqrt(sq)).all()


@pytest.mark.parametrize("dtype", HALF)
def test_calibration_chooses_measured_kernels_once(dtype):
    choice = kernel_choice(storage(dtype))
    assert choice.single in (FUSED, WIDEN_BLAS) and choice.batch in (BF16_GEMM, WIDEN_BLAS)
    assert set(choice.seconds) == {f"single/{FUSED}", f"single/{WIDEN_BLAS}",
                                   f"batch/{BF16_GEMM}", f"batch/{WIDEN_BLAS}"}
    assert choice.seconds[f"single/{choice.single}"] == min(
        choice.seconds[f"single/{o}"] for o in (FUSED, WIDEN_BLAS))
    assert kernel_choice(storage(dtype)) is choice  # cached
    assert kernel_choices()[dtype]["batch"] == choice.batch
    index = CpuIndex(8, "dot", dtype)
    assert index.memory_info()["kernels"] == {"single": choice.single, "batch": choice.batch}
    assert index.describe_kernel(1).startswith(f"{choice.single} (")
    assert index.describe_kernel(64, ranging=True).startswith(f"{WIDEN_BLAS} (")


def test_bfloat16_storage_rounds_and_refuses_overflow():
    index = CpuIndex(3, "dot", "bfloat16")
    index.add([1], [[1.0 + 2**-9, 3.0, -0.1]])
    np.testing.assert_array_equal(
        index.get([1]), np.float32([[1.0, 3.0, -0.1]]).astype(BF16).astype(np.float32))
    with pytest.raises(ValueError, match="overflow bfloat16"):
        index.add([2], [[3.4e38, 0, 0]])
    assert len(index) == 1


@pytest.mark.parametrize("dtype", HALF)
def test_concurrent_searches_of_one_index_agree(dtype):
    """Searches share no buffers (and numba's threading layer takes concurrent calls)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(6)
    index = CpuIndex(64, "dot", dtype, block_rows=512)
    index.add(np.arange(4000), rng.standard_normal((4000, 64)).astype(np.float32))
    batches = [rng.standard_normal((nq, 64)).astype(np.float32) for nq in (1, 5, 40) * 4]
    serial = [index.search(b, 7) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda b: index.search(b, 7), batches))
    for (s1, i1), (s2, i2) in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)
