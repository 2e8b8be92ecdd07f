"""Hypothesis properties of every index backend over random shapes, and faiss agreement."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpu_fallback import CpuIndex
from cpu_fallback.core import DTYPES, METRICS, merge_range_results, merge_search_results
from tests.index_support import (
    BACKENDS,
    backend_factory,
    reference_scores,
    reference_search,
    stored_values,
)
from tests.test_index_conformance import assert_matches_reference, tolerance


@pytest.fixture(params=BACKENDS)
def make(request):
    return backend_factory(request)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 300),
    dim=st.integers(1, 40),
    nq=st.integers(1, 20),  # past 8, half precision takes the candidate path on the CPU
    k=st.integers(0, 320),
    metric=st.sampled_from(METRICS),
    dtype=st.sampled_from(DTYPES),
    block_rows=st.integers(1, 128),
    seed=st.integers(0, 2**32 - 1),
    use_allow=st.booleans(),
)
def test_search_equals_reference_on_random_shapes(
    make, n, dim, nq, k, metric, dtype, block_rows, seed, use_allow
):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    ids = rng.choice(4 * n + 10, n, replace=False).astype(np.int64)
    queries = rng.standard_normal((nq, dim)).astype(np.float32)
    allow = rng.choice(4 * n + 10, rng.integers(0, 2 * n + 1)) if use_allow else None
    index = make(dim, metric, dtype, block_rows=block_rows)
    index.add(ids, vectors)
    scores, got = index.search(queries, k, allow=allow)
    stored = stored_values(vectors, metric, dtype)
    ref_s, ref_i = reference_search(stored, ids, queries, metric, k, allow=allow)
    # Score errors scale with |q| |x|; under l2 that is the error of a squared distance
    # (|q|^2 + |x|^2 - 2 q.x), so a distance near 0 is off by up to its square root.
    scale = float(np.linalg.norm(queries, axis=1).max() * np.linalg.norm(stored, axis=1).max())
    tol = max(1e-3, tolerance(dtype, index) * max(1.0, scale))
    if metric == "l2" and dtype != "float32":
        tol = max(tol, float(np.sqrt(tol)))
    assert_matches_reference(scores, got, ref_s, ref_i, reference_scores(stored, queries, metric),
                             ids, tol)
    for row_scores, row_ids in zip(scores, got, strict=True):
        real = row_ids != -1
        assert not (real[1:] & ~real[:-1]).any()  # padding only at the end
        assert len(set(row_ids[real].tolist())) == real.sum()
        step = np.diff(row_scores[real])
        assert ((step >= 0) if metric == "l2" else (step <= 0)).all()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 200), removed=st.integers(0, 200), seed=st.integers(0, 2**32 - 1))
def test_add_remove_sequences_keep_the_right_rows(make, n, removed, seed):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, 6)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64)
    index = make(6, "dot", block_rows=16)
    index.add(ids, vectors)
    gone = rng.choice(n, min(removed, n), replace=False)
    assert index.remove(gone) == len(gone)
    alive = np.setdiff1d(ids, gone)
    assert len(index) == len(alive)
    if len(alive):
        np.testing.assert_array_equal(index.get(alive), vectors[alive])
    _, got = index.search(rng.standard_normal((2, 6)).astype(np.float32), n)
    assert sorted(got[0][got[0] != -1].tolist()) == alive.tolist()


def test_cpu_index_agrees_with_faiss_flat_ip():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng()
    vectors = rng.standard_normal((20000, 64)).astype(np.float32)
    queries = rng.standard_normal((50, 64)).astype(np.float32)
    flat = faiss.IndexFlatIP(64)
    flat.add(vectors)
    faiss_scores, faiss_ids = flat.search(queries, 10)
    index = CpuIndex(64, "dot")
    index.add(np.arange(20000), vectors)
    scores, ids = index.search(queries, 10)
    np.testing.assert_allclose(scores, faiss_scores, rtol=1e-4, atol=1e-4)
    # ids equal except where two neighbours score the same to float32 rounding
    differ = ids != faiss_ids
    assert np.all(np.abs(scores[differ] - faiss_scores[differ]) < 1e-4)
    assert differ.mean() < 0.01


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 200),
    shards=st.integers(1, 4),
    k=st.integers(0, 250),
    metric=st.sampled_from(METRICS),
    seed=st.integers(0, 2**32 - 1),
)
def test_merged_shards_answer_like_one_index(make, n, shards, k, metric, seed):
    """merge_search_results / merge_range_results over shards equal the reference, with ties."""
    rng = np.random.default_rng(seed)
    vectors = rng.integers(-2, 3, (n, 5)).astype(np.float32)  # small ints: many exact ties
    vectors[:, 0] = np.where((vectors == 0).all(axis=1), 1, vectors[:, 0])  # no zero rows
    ids = rng.choice(10 * n, n, replace=False).astype(np.int64)
    queries = rng.integers(-2, 3, (3, 5)).astype(np.float32) + np.float32(0.5)
    owner = rng.integers(0, shards, n)
    parts = [make(5, metric, block_rows=16) for _ in range(shards)]
    for s, part in enumerate(parts):
        if (owner == s).any():
            part.add(ids[owner == s], vectors[owner == s])
    scores, got = merge_search_results([p.search(queries, k) for p in parts], k, metric)
    stored = stored_values(vectors, metric, "float32")
    all_scores = reference_scores(stored, queries, metric)
    ref_s, ref_i = reference_search(stored, ids, queries, metric, k)
    assert_matches_reference(scores, got, ref_s, ref_i, all_scores, ids, 1e-4)
    if metric == "dot":  # small integers score exactly: ties must go to the smaller id
        np.testing.assert_array_equal(got, ref_i)
    distinct = np.unique(all_scores)  # a threshold in the widest gap, far from every score
    gap = int(np.argmax(np.diff(distinct))) if len(distinct) > 1 else 0
    limit = float(distinct[gap:gap + 2].mean() if len(distinct) > 1 else distinct[0] + 0.5)
    lims, r_scores, r_ids, totals = merge_range_results(
        [p.range_search(queries, limit, max_results=7) for p in parts], metric, 7)
    for q in range(len(queries)):
        _, want = reference_search(stored, ids, queries[q:q + 1], metric, n, threshold=limit)
        want = want[0][want[0] != -1]
        assert totals[q] == len(want) and lims[q + 1] - lims[q] == min(7, len(want))
        found = r_scores[lims[q]:lims[q + 1]]
        assert np.all(np.diff(found) >= 0) if metric == "l2" else np.all(np.diff(found) <= 0)
        assert np.isin(r_ids[lims[q]:lims[q + 1]], want).all()
