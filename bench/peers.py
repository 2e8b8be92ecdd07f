"""The systems compared: dotsearch's indexes and its peers, behind one build/search shape."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.harness import gpu_status

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class Searcher:
    """A built system: ``search(queries float32 (q, d), k) -> (scores (q, k), ids (q, k))``."""

    search: SearchFn
    sync: Callable[[], None] | None = None
    keep: list[Any] = field(default_factory=list)  # objects that must outlive the searcher


@dataclass
class System:
    """One contender. ``build(ids, vectors, metric, dtype)`` returns a Searcher.

    ``skip(n, dim, q, k, metric, dtype)`` returns why a cell is out of this system's reach
    (None when it can run); ``extra_copies`` is how many copies of the matrix it holds.
    """

    name: str
    kind: str  # "dotsearch" or "peer"
    build: Callable[[np.ndarray, np.ndarray, str, str], Searcher]
    skip: Callable[[int, int, int, int, str, str], str | None]
    extra_copies: float = 1.0
    device: str = "cpu"
    rate: float | None = None  # rough multiply-adds/s, to skip cells that would take too long


def _float32_only(n: int, dim: int, q: int, k: int, metric: str, dtype: str) -> str | None:
    return None if dtype == "float32" else "runs float32 only"


def _topk_rows(scores: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k along axis 1 of a (q, n) score matrix: argpartition, then sort the k."""
    n = scores.shape[1]
    k = min(k, n)
    keyed = -scores if largest else scores
    if k < n:
        part = np.argpartition(keyed, k - 1, axis=1)[:, :k]
    else:
        part = np.tile(np.arange(n), (len(scores), 1))
    part_keys = np.take_along_axis(keyed, part, axis=1)
    order = np.lexsort((part, part_keys), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, idx, axis=1).astype(np.float32), idx


def _dotsearch_cpu(ids: np.ndarray, vectors: np.ndarray, metric: str, dtype: str) -> Searcher:
    from cpu_fallback import CpuIndex

    index = CpuIndex(vectors.shape[1], metric=metric, dtype=dtype)
    index.add(ids, vectors)
    return Searcher(lambda queries, k: index.search(queries, k), keep=[index])


def _dotsearch_gpu(ids: np.ndarray, vectors: np.ndarray, metric: str, dtype: str) -> Searcher:
    import cupy

    from gpu import GpuIndex

    index = GpuIndex(vectors.shape[1], metric=metric, dtype=dtype)
    step = 262_144
    for lo in range(0, len(ids), step):
        index.add(ids[lo : lo + step], vectors[lo : lo + step])
    return Searcher(lambda queries, k: index.search(queries, k),
                    sync=cupy.cuda.Device().synchronize, keep=[index])


def _numpy(ids: np.ndarray, vectors: np.ndarray, metric: str, dtype: str) -> Searcher:
    matrix = vectors
    sq_norms = np.einsum("ij,ij->i", matrix, matrix) if metric == "l2" else None

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if metric == "cosine":
            queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        scores = queries @ matrix.T
        if metric == "l2":
            assert sq_norms is not None
            q_norms = np.einsum("ij,ij->i", queries, queries)[:, None]
            dist2 = sq_norms[None, :] - 2.0 * scores + q_norms
            values, idx = _topk_rows(dist2, k, largest=False)
            return np.sqrt(np.maximum(values, 0)), ids[idx]
        values, idx = _topk_rows(scores, k, largest=True)
        return values, ids[idx]

    return Searcher(search, keep=[matrix])


def _faiss_cpu(ids: np.ndarray, vectors: np.ndarray, metric: str, dtype: str) -> Searcher:
    import faiss

    dim = vectors.shape[1]
    index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
    index.add(np.ascontiguousarray(vectors))
    return Searcher(_faiss_search(index, ids, metric), keep=[index])


def _faiss_search(index: Any, ids: np.ndarray, metric: str) -> Callable[..., Any]:
    """A faiss flat index's search in this harness's terms (ids, distances, cosine)."""

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if metric == "cosine":
            queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        scores, positions = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        if metric == "l2":
            scores = np.sqrt(np.maximum(scores, 0))
        return scores, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)

    return search


# faiss's own half-precision flat storage: IndexScalarQuantizer with a 16-bit "quantizer"
# (rows rounded to float16 / bfloat16 and widened at search time, scored in float32).
FAISS_SQ_TYPES = {"float16": "QT_fp16", "bfloat16": "QT_bf16"}
# Its search scans the codes query by query (one thread per query, no GEMM): about 3e9
# multiply-adds/s on a 2-core host at d=2048 whatever Q (fp16 and bf16 alike), against a
# BLAS flat index's 3e10 at Q=256; cells that would take over the per-call limit are skipped.
FAISS_SQ_RATE = 3e9


def _faiss_sq(ids: np.ndarray, vectors: np.ndarray, metric: str, dtype: str) -> Searcher:
    """faiss.IndexScalarQuantizer storing the cell's half dtype, built like the flat peer:
    inner product for dot and cosine (unit rows, queries normalised by the search), L2
    for l2; trained (a no-op for these types) on the first rows, then added in chunks."""
    import faiss

    dim = vectors.shape[1]
    kind = getattr(faiss.ScalarQuantizer, FAISS_SQ_TYPES[dtype])
    index = faiss.IndexScalarQuantizer(
        dim, kind, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(np.ascontiguousarray(vectors[:1000]))
    step = max(1, (1 << 24) // dim)  # chunks: no second float32 copy of the matrix
    for lo in range(0, len(vectors), step):
        chunk = np.ascontiguousarray(vectors[lo : lo + step], dtype=np.float32)
        if metric == "cosine":
            chunk = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
        index.add(chunk)
    return Searcher(_faiss_search(index, ids, metric), keep=[index])


def _faiss_sq_skip(dtype: str,
                   present: bool) -> Callable[[int, int, int, int, str, str], str | None]:
    """The skip rule of the faiss SQ peer for ``dtype`` (``present``: this faiss has its type)."""

    def skip(n: int, dim: int, q: int, k: int, metric: str, cell_dtype: str) -> str | None:
        if cell_dtype != dtype:
            return f"stores {dtype} only"
        if not present:
            return f"this faiss has no ScalarQuantizer.{FAISS_SQ_TYPES[dtype]}"
        return None

    return skip


def _faiss_gpu(ids: np.ndarray, vectors: np.ndarray, metric: str, dtype: str) -> Searcher:
    import faiss

    dim = vectors.shape[1]
    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.useFloat16 = dtype == "float16"
    index = (faiss.GpuIndexFlatL2(resources, dim, config) if metric == "l2"
             else faiss.GpuIndexFlatIP(resources, dim, config))
    index.add(np.ascontiguousarray(vectors))
    return Searcher(_faiss_search(index, ids, metric), keep=[index, resources])


def _torch(device: str) -> Callable[[np.ndarray, np.ndarray, str, str], Searcher]:
    def build(ids: np.ndarray, vectors: np.ndarray, metric: str, dtype: str) -> Searcher:
        import torch

        torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            dtype, torch.float32)
        matrix = torch.from_numpy(vectors).to(device=device, dtype=torch_dtype)
        id_tensor = torch.from_numpy(ids).to(device)
        sq_norms = (matrix.float() ** 2).sum(1) if metric == "l2" else None
        sync = torch.cuda.synchronize if device == "cuda" else None

        def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            q = torch.from_numpy(np.ascontiguousarray(queries)).to(device)
            if metric == "cosine":
                q = torch.nn.functional.normalize(q, dim=1)
            scores = torch.mm(q.to(torch_dtype), matrix.T).float()
            k_eff = min(k, matrix.shape[0])
            if metric == "l2":
                assert sq_norms is not None
                dist2 = sq_norms[None, :] - 2.0 * scores + (q * q).sum(1, keepdim=True)
                values, idx = torch.topk(dist2, k_eff, dim=1, largest=False)
                values = values.clamp_min(0).sqrt()
            else:
                values, idx = torch.topk(scores, k_eff, dim=1)
            return values.cpu().numpy(), id_tensor[idx].cpu().numpy()

        return Searcher(search, sync=sync, keep=[matrix])

    return build


def load_duckdb(con: Any, table: str, ids: np.ndarray, vectors: np.ndarray,
                extra: dict[str, np.ndarray] | None = None) -> None:
    """Create ``table(id BIGINT, v FLOAT[d], extra...)`` from numpy in row chunks, no pandas."""
    dim = vectors.shape[1]
    columns = ", ".join(f"c{j}" for j in range(dim))
    extra = extra or {}
    extra_cols = "".join(f", {name}" for name in extra)
    step = max(1, (1 << 25) // dim)
    for lo in range(0, len(ids), step):
        transposed = np.ascontiguousarray(vectors[lo : lo + step].T)
        # DuckDB's replacement scan reads this local dict of 1-d numpy arrays by its name.
        bench_chunk = {"id": ids[lo : lo + step],
                       **{f"c{j}": transposed[j] for j in range(dim)},
                       **{name: values[lo : lo + step] for name, values in extra.items()}}
        select = f"SELECT id, [{columns}]::FLOAT[{dim}] AS v{extra_cols} FROM bench_chunk"
        if lo == 0:
            con.execute(f"CREATE OR REPLACE TABLE {table} AS {select}")
        else:
            con.execute(f"INSERT INTO {table} {select}")
        del bench_chunk, transposed




def duckdb_topk_sql(metric: str, dim: int, table: str = "vectors", where: str = "") -> str:
    """DuckDB's own exact top-k: array_inner_product / array_cosine_similarity / array_distance."""
    function = {"dot": "array_inner_product", "cosine": "array_cosine_similarity",
                "l2": "array_distance"}[metric]
    order = "ASC" if metric == "l2" else "DESC"
    clause = f" WHERE {where}" if where else ""
    return (f"SELECT id, {function}(v, $q::FLOAT[{dim}]) AS score FROM {table}{clause} "
            f"ORDER BY score {order}, id LIMIT $k")


def _duckdb(ids: np.ndarray, vectors: np.ndarray, metric: str, dtype: str) -> Searcher:
    import duckdb

    con = duckdb.connect()
    load_duckdb(con, "vectors", ids, vectors)
    sql = duckdb_topk_sql(metric, vectors.shape[1])

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(queries), k), np.nan, dtype=np.float32)
        found = np.full((len(queries), k), -1, dtype=np.int64)
        for row, query in enumerate(queries):
            hits = con.execute(sql, {"q": query.tolist(), "k": k}).fetchall()
            for col, (id_, score) in enumerate(hits):
                found[row, col], scores[row, col] = id_, score
        return scores, found

    return Searcher(search, keep=[con])


def _duckdb_skip(n: int, dim: int, q: int, k: int, metric: str, dtype: str) -> str | None:
    if dtype != "float32":
        return "runs float32 only"
    if q > 16:
        return "one SQL statement per query: only run for Q <= 16"
    return None


def _device_bfloat16() -> bool:
    """Whether this GPU computes in bfloat16 (compute capability 8.0, Ampere, or newer)."""
    try:
        import cupy

        return int(cupy.cuda.Device().compute_capability) >= 80
    except Exception:
        try:
            import torch

            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except Exception:
            return False


def _gpu_half_skip(n: int, dim: int, q: int, k: int, metric: str, dtype: str) -> str | None:
    if dtype == "bfloat16" and not _device_bfloat16():
        return "bfloat16 needs a GPU of compute capability 8.0 or newer"
    return None


def _faiss_gpu_skip(n: int, dim: int, q: int, k: int, metric: str, dtype: str) -> str | None:
    if dtype == "bfloat16":
        return "faiss's GPU flat indexes store float32 or float16 only"
    return None


def systems(include_gpu: bool | None = None) -> list[System]:
    """Every system importable here (dotsearch first), in the order they are run."""
    found: list[System] = []
    if include_gpu is None:
        include_gpu = gpu_status()[0]
    try:
        import cpu_fallback  # noqa: F401

        found.append(System("dotsearch-cpu", "dotsearch", _dotsearch_cpu,
                            lambda *_: None, extra_copies=1.0))
    except ImportError:
        pass
    if include_gpu:
        try:
            import gpu  # noqa: F401

            found.append(System("dotsearch-gpu", "dotsearch", _dotsearch_gpu, _gpu_half_skip,
                                extra_copies=0.0, device="gpu"))
        except ImportError:
            pass
    found.append(System("numpy", "peer", _numpy, _float32_only, extra_copies=0.0))
    try:
        import faiss

        found.append(System("faiss-cpu", "peer", _faiss_cpu, _float32_only))
        for dtype, kind in FAISS_SQ_TYPES.items():
            # Half-size codes; the search scans them one query per thread (no GEMM): rate.
            found.append(System(f"faiss-cpu SQ {kind[3:]}", "peer", _faiss_sq,
                                _faiss_sq_skip(dtype, hasattr(faiss.ScalarQuantizer, kind)),
                                extra_copies=0.5, rate=FAISS_SQ_RATE))
        if include_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            found.append(System("faiss-gpu", "peer", _faiss_gpu, _faiss_gpu_skip,
                                extra_copies=0.0, device="gpu"))
    except ImportError:
        pass
    try:
        import torch

        found.append(System("torch-cpu", "peer", _torch("cpu"), _float32_only, extra_copies=0.0))
        if include_gpu and torch.cuda.is_available():
            found.append(System("torch-cuda", "peer", _torch("cuda"), _gpu_half_skip,
                                extra_copies=0.0, device="gpu"))
    except ImportError:
        pass
    try:
        import duckdb  # noqa: F401

        found.append(System("duckdb", "peer", _duckdb, _duckdb_skip, extra_copies=1.2,
                            rate=3e8))
    except ImportError:
        pass
    return found


def release() -> None:
    """Free what the last system held (host garbage, and device pools when there is a GPU)."""
    gc.collect()
    try:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
