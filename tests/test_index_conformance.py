"""One conformance suite for every index backend, against a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from cpu_fallback.core import DTYPES, METRICS, VectorIndex
from tests.index_support import (
    BACKENDS,
    backend_factory,
    default_scratch_bytes,
    reference_scores,
    reference_search,
    stored_values,
)


@pytest.fixture(params=BACKENDS)
def make(request):
    return backend_factory(request)


def tolerance(dtype: str, index: VectorIndex) -> float:
    # The reference scores the stored values. The CPU keeps queries in float32 whatever the
    # storage; the GPU rounds them to a half-precision storage dtype (~1e-3 relative).
    return 2e-2 if dtype != "float32" and index.backend == "gpu" else 1e-4


def assert_matches_reference(scores, ids, ref_scores, ref_ids, all_scores, all_ids, tol):
    """Scores agree within tol; any id that differs from the reference is a near-tie."""
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ref_scores.shape == ids.shape
    np.testing.assert_array_equal(ids == -1, ref_ids == -1)
    valid = ref_ids != -1
    np.testing.assert_allclose(scores[valid], ref_scores[valid], atol=tol, rtol=tol)
    position = {int(i): p for p, i in enumerate(all_ids)}
    for r, c in zip(*np.nonzero(valid & (ids != ref_ids)), strict=True):
        got_ref_score = all_scores[r, position[int(ids[r, c])]]
        assert abs(got_ref_score - ref_scores[r, c]) <= tol, (r, c)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_search_matches_reference(make, metric, dtype):
    rng = np.random.default_rng()
    n, dim = 3000, 48
    vectors = rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    ids = rng.choice(10**9, size=n, replace=False).astype(np.int64)
    queries = rng.standard_normal((13, dim)).astype(np.float32) / np.sqrt(dim)
    index = make(dim, metric, dtype, block_rows=700)  # several blocks, one partly full
    index.add(ids, vectors)
    stored = stored_values(vectors, metric, dtype)
    # What the index holds is the reference's values to one rounding step (normalising in
    # float32 or float64 can land a value on the other side of a rounding tie), and the
    # ranking must be exact for what it holds.
    held = index.get(ids).astype(np.float64)
    np.testing.assert_allclose(held, stored, atol=1e-7, rtol={"float32": 1e-6,
                               "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype])
    stored = held
    all_scores = reference_scores(stored, queries, metric)
    for k in (1, 10, 257):
        scores, got = index.search(queries, k)
        ref_s, ref_i = reference_search(stored, ids, queries, metric, k)
        assert_matches_reference(scores, got, ref_s, ref_i, all_scores, ids,
                                 tolerance(dtype, index))
    assert len(index) == n and int(ids[5]) in index and -3 not in index


@pytest.mark.parametrize("metric", METRICS)
def test_k_beyond_size_pads_and_k_zero_is_empty(make, metric):
    index = make(4, metric)
    index.add([7, 3], [[1, 0, 0, 0], [0, 1, 0, 0]])
    scores, ids = index.search(np.ones((2, 4), np.float32), 5)
    assert ids.shape == (2, 5)
    assert sorted(ids[0, :2].tolist()) == [3, 7]
    assert (ids[:, 2:] == -1).all()
    assert np.all(scores[:, 2:] == (np.inf if metric == "l2" else -np.inf))
    scores, ids = index.search(np.ones((3, 4), np.float32), 0)
    assert scores.shape == ids.shape == (3, 0)


def test_empty_index_returns_padding(make):
    scores, ids = make(4, "dot").search(np.ones((2, 4), np.float32), 3)
    assert (ids == -1).all() and (scores == -np.inf).all()


def test_upsert_replaces_and_last_duplicate_wins(make):
    index = make(3, "dot")
    index.add([1, 2], [[1, 0, 0], [0, 1, 0]])
    index.add([2, 2, 5], [[9, 9, 9], [0, 0, 3], [0, 0, 1]])  # 2 updated twice: last wins
    assert len(index) == 3
    np.testing.assert_array_equal(index.get([2]), [[0, 0, 3]])
    scores, ids = index.search([[0, 0, 1]], 3)
    assert ids[0].tolist() == [2, 5, 1]
    np.testing.assert_allclose(scores[0], [3, 1, 0])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_break_by_id_ascending(make, metric, dtype):
    # 400 identical vectors and 100 others, over several blocks: every k cuts a tie.
    rng = np.random.default_rng()
    tied = np.tile([[1.0, 2.0, 0.0, 0.0]], (400, 1))
    others = np.tile([[0.0, 0.0, 1.0, 0.0]], (100, 1))
    ids = rng.permutation(np.arange(1000, 1500)).astype(np.int64)
    index = make(4, metric, dtype, block_rows=64)
    index.add(ids, np.vstack([tied, others]).astype(np.float32))
    tied_ids = np.sort(ids[:400])
    for k in (1, 7, 64, 399, 400, 450):
        _, got = index.search([[1.0, 2.0, 0.0, 0.0]], k)
        head = min(k, 400)
        assert got[0, :head].tolist() == tied_ids[:head].tolist()
        if k > 400:
            assert got[0, 400:].tolist() == np.sort(ids[400:])[: k - 400].tolist()


def test_remove_then_search(make):
    rng = np.random.default_rng()
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    ids = np.arange(500, dtype=np.int64) * 2
    index = make(16, "l2", block_rows=128)
    index.add(ids, vectors)
    drop = ids[rng.choice(500, 220, replace=False)]
    assert index.remove(np.concatenate([drop, [1, 3, 10**12]])) == 220
    assert index.remove(drop) == 0
    assert len(index) == 280 and int(drop[0]) not in index
    keep = ~np.isin(ids, drop)
    stored = stored_values(vectors[keep], "l2", "float32")
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    scores, got = index.search(queries, 20)
    ref_s, ref_i = reference_search(stored, ids[keep], queries, "l2", 20)
    assert_matches_reference(scores, got, ref_s, ref_i,
                             reference_scores(stored, queries, "l2"), ids[keep], 1e-4)
    np.testing.assert_allclose(index.get(ids[keep][:3]), vectors[keep][:3])
    index.add(drop[:5], vectors[:5])  # re-adding removed ids works
    assert len(index) == 285
    assert index.remove(ids) == 285 and len(index) == 0
    assert (index.search(queries, 3)[1] == -1).all()


@pytest.mark.parametrize("metric", METRICS)
def test_allow_list_is_an_exact_prefilter(make, metric):
    rng = np.random.default_rng()
    vectors = rng.standard_normal((2000, 8)).astype(np.float32)
    ids = np.arange(2000, dtype=np.int64) + 100
    index = make(8, metric, block_rows=300)
    index.add(ids, vectors)
    stored = stored_values(vectors, metric, "float32")
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    sparse = rng.choice(ids, 25, replace=False)  # gathered path
    dense = rng.choice(ids, 1900, replace=False)  # masked path
    for allow in (sparse, dense, np.concatenate([sparse, [5, 10**10]])):
        scores, got = index.search(queries, 30, allow=allow)
        ref_s, ref_i = reference_search(stored, ids, queries, metric, 30, allow=allow)
        assert_matches_reference(scores, got, ref_s, ref_i,
                                 reference_scores(stored, queries, metric), ids, 1e-4)
        assert np.isin(got[got != -1], allow).all()
        assert (got != -1).sum(axis=1).tolist() == [min(30, len(np.intersect1d(allow, ids)))] * 4
    assert (index.search(queries, 5, allow=np.array([], np.int64))[1] == -1).all()
    assert (index.search(queries, 5, allow=[10**10, 7])[1] == -1).all()
    _, one = index.search(queries, 5, allow=[ids[17]])
    assert (one[:, 0] == ids[17]).all() and (one[:, 1:] == -1).all()


@pytest.mark.parametrize("metric", METRICS)
def test_threshold_and_range_search(make, metric):
    rng = np.random.default_rng()
    vectors = rng.standard_normal((1500, 12)).astype(np.float32)
    ids = rng.choice(10**6, 1500, replace=False).astype(np.int64)
    index = make(12, metric, block_rows=400)
    index.add(ids, vectors)
    stored = stored_values(vectors, metric, "float32")
    queries = rng.standard_normal((6, 12)).astype(np.float32)
    all_scores = reference_scores(stored, queries, metric)
    threshold = float(np.quantile(all_scores, 0.1 if metric == "l2" else 0.9))
    scores, got = index.search(queries, 50, threshold=threshold)
    ref_s, ref_i = reference_search(stored, ids, queries, metric, 50, threshold=threshold)
    # Rows within rounding of the threshold may land on either side.
    near = np.abs(all_scores - threshold) < 1e-4
    if not near.any():
        assert_matches_reference(scores, got, ref_s, ref_i, all_scores, ids, 1e-4)

    lims, r_scores, r_ids, totals = index.range_search(queries, threshold)
    capped = index.range_search(queries, threshold, max_results=7)
    for q in range(len(queries)):
        passing = all_scores[q] <= threshold if metric == "l2" else all_scores[q] >= threshold
        expected = set(ids[passing & ~near[q]].tolist())
        found, found_scores = r_ids[lims[q]:lims[q + 1]], r_scores[lims[q]:lims[q + 1]]
        assert expected <= set(found.tolist()) <= set(ids[passing | near[q]].tolist())
        assert totals[q] == len(found)
        # best first by the returned score, ties by id, exactly
        closeness = -found_scores if metric == "l2" else found_scores
        assert (np.lexsort((found, -closeness)) == np.arange(len(found))).all()
        want_s, want = reference_search(stored, ids, queries[q:q + 1], metric, totals[q],
                                        threshold=threshold)
        if not near[q].any():  # the float64 order, but for rows tied within rounding
            assert_matches_reference(found_scores[None], found[None], want_s, want,
                                     all_scores[q:q + 1], ids, 1e-4)
        c_lims, _, c_ids, c_totals = capped
        assert c_totals[q] == totals[q]
        assert c_ids[c_lims[q]:c_lims[q + 1]].tolist() == found[:7].tolist()
    allowed = ids[:100]
    lims, _, a_ids, _ = index.range_search(queries, threshold, allow=allowed)
    assert np.isin(a_ids, allowed).all()


def test_large_k_returns_everything_in_order(make):
    rng = np.random.default_rng()
    vectors = rng.standard_normal((5000, 8)).astype(np.float32)
    index = make(8, "dot", block_rows=1024)
    index.add(np.arange(5000), vectors)
    scores, ids = index.search(vectors[:2], 6000)
    assert (ids[:, :5000] >= 0).all() and (ids[:, 5000:] == -1).all()
    assert (np.diff(scores[:, :5000], axis=1) <= 0).all()
    assert sorted(ids[0, :5000].tolist()) == list(range(5000))


def test_zero_vector_under_cosine_is_an_error(make):
    index = make(3, "cosine")
    with pytest.raises(ValueError, match="zero vector"):
        index.add([1, 2], [[1, 0, 0], [0, 0, 0]])
    assert len(index) == 0
    index.add([1], [[3, 4, 0]])
    np.testing.assert_allclose(index.get([1]), [[0.6, 0.8, 0]], rtol=1e-6)
    with pytest.raises(ValueError, match="zero vector"):
        index.search([[0, 0, 0]], 1)
    # dot and l2 take a zero vector as it is
    plain = make(3, "dot")
    plain.add([1], [[0, 0, 0]])
    assert plain.search([[1, 1, 1]], 1)[1][0, 0] == 1


@pytest.mark.parametrize(
    ("ids", "vectors", "error", "match"),
    [
        ([1, 2], [[1, 2, 3], [np.nan, 0, 0]], ValueError, "NaN or inf"),
        ([1, 2], [[1, 2, 3], [np.inf, 0, 0]], ValueError, "NaN or inf"),
        ([1, 2], [[1, 2], [3, 4]], ValueError, r"shape \(n, 3\)"),
        ([1, 2], [1, 2, 3], ValueError, r"shape \(n, 3\)"),
        ([1], [[1, 2, 3], [4, 5, 6]], ValueError, "1 ids for 2 vectors"),
        ([], np.empty((0, 3)), ValueError, "empty"),
        ([-4], [[1, 2, 3]], ValueError, "non-negative"),
        ([1.5], [[1, 2, 3]], TypeError, "integers"),
        ([1], [["a", "b", "c"]], TypeError, "float"),
        ([1], [[1e6, 0, 0]], ValueError, "overflow"),  # only for float16 storage
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(make, ids, vectors, error, match):
    index = make(3, "dot", "float16")
    index.add([9], [[1, 1, 1]])
    with pytest.raises(error, match=match):
        index.add(ids, vectors)
    assert len(index) == 1 and 9 in index and 1 not in index
    np.testing.assert_array_equal(index.get([9]), [[1, 1, 1]])


def test_bad_queries_and_arguments(make):
    index = make(3, "dot")
    index.add([1], [[1, 2, 3]])
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        index.search([[1, 2]], 1)
    with pytest.raises(ValueError, match="NaN"):
        index.search([[1, np.nan, 2]], 1)
    with pytest.raises(ValueError, match="empty"):
        index.search(np.empty((0, 3)), 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search([[1, 2, 3]], -1)
    with pytest.raises(ValueError, match="threshold"):
        index.search([[1, 2, 3]], 1, threshold=float("nan"))
    with pytest.raises(KeyError):
        index.get([2])
    with pytest.raises(ValueError, match="metric"):
        make(3, "hamming")
    with pytest.raises(ValueError, match="dtype"):
        make(3, "dot", "int8")
    with pytest.raises(ValueError, match="dim"):
        make(0, "dot")


def test_memory_info_counts_rows(make):
    index = make(16, "l2", "float16", block_rows=256)
    index.add(np.arange(300), np.ones((300, 16), np.float32))
    info = index.memory_info()
    assert info["vectors"] == 300 and info["vector_bytes"] == 300 * 16 * 2
    # whole blocks of 256 rows; a sharded index has its own in each shard
    held = [s["vectors"] for s in info["shards"]] if make.backend == "ray" else [300]
    assert info["capacity_rows"] == sum(-(-rows // 256) * 256 for rows in held)
    assert info["backend"] == type(index).backend and info["device"]


def test_engine_options_are_the_same_keywords_everywhere(make):
    """block_bytes, block_rows, scratch_bytes: None is the default, bad values are refused."""
    index = make(16, "dot", "float16", block_bytes=16 * 2 * 4096, scratch_bytes=1 << 20)
    assert isinstance(index, VectorIndex) and index.backend in ("cpu", "gpu", "ray")
    info = index.memory_info()
    assert info["block_rows"] == 4096 and info["scratch_budget_bytes"] == 1 << 20
    defaults = make(16, "dot", block_bytes=None, block_rows=None, scratch_bytes=None)
    assert defaults.memory_info()["scratch_budget_bytes"] == default_scratch_bytes(defaults)
    assert make(16, "dot", block_bytes=16 * 4 * 4096, block_rows=300).memory_info()[
        "block_rows"] == 300
    for option in ("block_bytes", "block_rows", "scratch_bytes"):
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match=option):
                make(16, "dot", **{option: bad})


@pytest.mark.parametrize("nq", [1, 5, 130])
def test_gathered_rows_in_many_small_panels(make, nq, monkeypatch):
    """A sparse allow-list is gathered panel by panel (16 rows here) into one buffer."""
    import cpu_fallback.index

    if make.backend == "ray":
        pytest.skip("patches cpu_fallback.index in this process; ray shards run in workers")
    monkeypatch.setattr(cpu_fallback.index, "GATHER_BYTES", 16 * 32 * 4)
    rng = np.random.default_rng()
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    ids = rng.choice(10**6, 3000, replace=False).astype(np.int64)
    index = make(32, "l2", block_rows=1000, scratch_bytes=16 * 32 * 4 * 130)
    index.add(ids, vectors)
    queries = rng.standard_normal((nq, 32)).astype(np.float32)
    allow = ids[rng.random(3000) < 0.3]  # ~300 per block: gathered, ~19 panels each
    scores, got = index.search(queries, 40, allow=allow)
    stored = stored_values(vectors, "l2", "float32")
    ref_s, ref_i = reference_search(stored, ids, queries, "l2", 40, allow=allow)
    assert_matches_reference(scores, got, ref_s, ref_i,
                             reference_scores(stored, queries, "l2"), ids, 1e-4)


@pytest.mark.parametrize("metric", METRICS)
def test_small_scratch_budget_gives_the_same_answers(make, metric):
    """A budget far below the index size forces many tiles/segments and merges."""
    rng = np.random.default_rng()
    vectors = rng.standard_normal((4000, 24)).astype(np.float32)
    ids = rng.choice(10**7, 4000, replace=False).astype(np.int64)
    queries = rng.standard_normal((9, 24)).astype(np.float32)
    small = make(24, metric, block_rows=300, scratch_bytes=9 * 6 * 350)
    large = make(24, metric, block_rows=300)
    for index in (small, large):
        index.add(ids, vectors)
    for k in (1, 25, 700):
        s_small, i_small = small.search(queries, k, allow=ids[::3])
        s_large, i_large = large.search(queries, k, allow=ids[::3])
        np.testing.assert_array_equal(i_small, i_large)
        np.testing.assert_allclose(s_small, s_large, rtol=1e-5, atol=1e-5)
    capped = small.range_search(queries, 0.0 if metric != "l2" else 6.0, max_results=50)
    full = large.range_search(queries, 0.0 if metric != "l2" else 6.0, max_results=50)
    for a, b in zip(capped, full, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_growth_keeps_every_row(make):
    """Batches that cross and fill blocks (the GPU's last block grows by doubling)."""
    rng = np.random.default_rng()
    index = make(5, "l2", block_rows=3000)
    vectors = rng.standard_normal((7000, 5)).astype(np.float32)
    for lo, hi in ((0, 1), (1, 900), (900, 2500), (2500, 7000)):
        index.add(np.arange(lo, hi), vectors[lo:hi])
        np.testing.assert_array_equal(index.get(np.arange(hi)), vectors[:hi])
    assert index.memory_info()["capacity_rows"] >= 7000
    _, ids = index.search(vectors[6999:], 1)
    assert ids[0, 0] == 6999


def test_backend_is_resolved_once_and_options_pass_through():
    from service.backend import make_index, resolve_backend
    from tests.index_support import GPU_OK

    assert resolve_backend("cpu") == "cpu"
    assert resolve_backend("auto") == ("gpu" if GPU_OK else "cpu")
    if not GPU_OK:
        with pytest.raises(RuntimeError, match="no GPU"):
            resolve_backend("gpu")
    index = make_index(8, "l2", "float32", backend="cpu", block_rows=300, scratch_bytes=4096,
                       block_bytes=None)
    assert index.backend == "cpu" and isinstance(index, VectorIndex)
    assert index.memory_info()["block_rows"] == 300
    assert index.memory_info()["scratch_budget_bytes"] == 4096


def test_backends_import_only_the_core():
    """Layers: no backend imports service/; gpu/ takes only cpu_fallback.core from the host."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("cpu_fallback/**/*.py"), *root.glob("gpu/**/*.py")]:
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom)}
        ours = {n for n in names if n.split(".")[0] in ("service", "gpu", "cpu_fallback")}
        package = path.relative_to(root).parts
        if package[:2] == ("cpu_fallback", "core"):
            allowed = ("cpu_fallback.core",)
        elif package[0] == "cpu_fallback":
            allowed = ("cpu_fallback",)
        else:
            allowed = ("gpu", "cpu_fallback.core")
        assert all(any(n == a or n.startswith(a + ".") for a in allowed) for n in ours), (
            path, ours)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prepared_batches_store_what_checked_batches_store(make, metric, dtype):
    """add(prepared=True) (the catalog has applied prepare_batch's rules already) leaves the
    index exactly as the checking add does."""
    from cpu_fallback.core import prepare_batch

    rng = np.random.default_rng(7)
    ids = np.array([5, 9, 5, 2, 11], dtype=np.int64)
    vectors = rng.standard_normal((5, 8)).astype(np.float32)
    checked, prepared = make(8, metric, dtype), make(8, metric, dtype)
    checked.add(ids, vectors)
    ready_ids, ready = prepare_batch(ids, vectors, 8, metric, np.dtype(np.float32))
    prepared.add(ready_ids, ready, prepared=True)
    assert len(prepared) == len(checked) == 4
    np.testing.assert_array_equal(prepared.get(ready_ids), checked.get(ready_ids))
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    for a, b in zip(prepared.search(queries, 4), checked.search(queries, 4), strict=True):
        np.testing.assert_array_equal(a, b)
    if dtype == "float16":  # the storage cast still refuses an overflow
        with pytest.raises(ValueError, match="overflow"):
            prepared.add([1], np.full((1, 8), 1e6, np.float32), prepared=True)
