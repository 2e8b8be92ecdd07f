"""CpuIndex: exact vector search on the host, numpy BLAS over cache-sized row tiles."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_fallback.rows import (
    RowMap,
    Scoring,
    blocks_in_use,
    prepare_batch,
    prepare_queries,
    split_by_block,
)
from cpu_fallback.topk import merge_top_k, top_k_exact
from cpu_fallback.validation import check_config, check_k, check_threshold

# Tile size: of the float32 scores for many queries, of the rows for a few.
TILE_BYTES = 16 << 20
# Storage grows by whole blocks of about this many bytes: growth never copies the index.
BLOCK_BYTES = 256 << 20
# From this many queries on, a GEMM is compute-bound and wants large tiles; below it,
# smaller tiles (about 16 MB of rows) run up to 1.5x faster (measured with OpenBLAS here).
MANY_QUERIES = 128
# Below this allowed fraction a block's allowed rows are gathered; above it, masked.
GATHER_FRACTION = 0.5
# Allowed rows are gathered panel by panel into one reused buffer of about this size
# (TILE_BYTES for many queries): it stays in cache for the BLAS call, and no fresh
# copy of all the allowed rows is allocated.
GATHER_BYTES = 128 << 10


@dataclass
class _Rows:
    """A run of candidate rows: vectors, their ids, squared norms (l2), mask, gather list."""

    vectors: npt.NDArray[Any]
    ids: npt.NDArray[np.int64]
    sq_norms: npt.NDArray[np.float32] | None
    keep: npt.NDArray[np.bool_] | None  # None: every row may be returned
    gather: npt.NDArray[np.int64] | None = None  # rows of vectors to score; None: all


class CpuIndex:
    """Exact index on the host; see ``service.index_protocol.VectorIndex`` for the contract.

    Vectors live in fixed-size numpy blocks of ``block_rows`` rows. A search scores each
    tile of rows with one BLAS call (GEMV for one query, GEMM for many), keeps an exact
    per-tile top-k along the contiguous axis, and merges.
    Not thread-safe: callers serialise writes against reads.
    """

    backend = "cpu"

    def __init__(
        self,
        dim: int,
        metric: str = "cosine",
        dtype: str = "float32",
        *,
        block_rows: int | None = None,
        scratch_bytes: int = TILE_BYTES,
    ) -> None:
        check_config(dim, metric, dtype)
        self.dim = int(dim)
        self.metric = metric
        self.dtype = dtype
        self._storage = np.dtype(dtype)
        row_bytes = self.dim * self._storage.itemsize
        self._block_rows = int(block_rows or max(256, BLOCK_BYTES // row_bytes))
        self._tile_bytes = int(scratch_bytes)
        self._blocks: list[npt.NDArray[Any]] = []
        self._block_sq_norms: list[npt.NDArray[np.float32]] = []
        self._rows = RowMap()
        self._scoring = Scoring(metric)

    # ------------------------------------------------------------------ writes
    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Upsert ids int64 (n,) with vectors float (n, dim); the last duplicate wins."""
        id_array, stored = prepare_batch(ids, vectors, self.dim, self.metric, self._storage)
        positions, new_count = self._rows.plan_upsert(id_array)
        self._reserve(new_count)
        self._write_rows(positions, stored)
        self._rows.commit_upsert(id_array, positions, new_count)

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove ids; unknown ids are ignored. Returns how many were present."""
        removal = self._rows.plan_remove(ids)
        if len(removal.holes):  # keep storage dense: movers fill the holes
            self._write_rows(removal.holes, self._vectors_at(removal.movers))
        self._rows.commit_remove(removal)
        needed = blocks_in_use(removal.new_count, self._block_rows)
        del self._blocks[needed:], self._block_sq_norms[needed:]
        return len(removal.gone)

    # ------------------------------------------------------------------ reads
    def search(
        self,
        queries: npt.ArrayLike,
        k: int,
        threshold: float | None = None,
        allow: npt.ArrayLike | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-k of queries (q, dim) -> scores float32 (q, k), ids int64 (q, k)."""
        query_matrix = prepare_queries(queries, self.dim, self.metric)
        k = check_k(k)
        limit = check_threshold(threshold)
        nq = len(query_matrix)
        scores = np.full((nq, k), self._scoring.missing, np.float32)
        result_ids = np.full((nq, k), -1, np.int64)
        if k == 0 or len(self._rows) == 0:
            return scores, result_ids
        runs = list(self._candidate_runs(allow))
        for q0, q1 in self._query_chunks(nq):
            chunk = query_matrix[q0:q1]
            best = (np.empty((q1 - q0, 0), np.float32), np.empty((q1 - q0, 0), np.int64))
            for keys, ids in self._key_tiles(chunk, runs):
                best = merge_top_k(best, top_k_exact(keys, ids, k), k)
            self._scoring.finish(*best, chunk, limit, scores[q0:q1], result_ids[q0:q1])
        return scores, result_ids

    def range_search(
        self,
        queries: npt.ArrayLike,
        threshold: float,
        allow: npt.ArrayLike | None = None,
        max_results: int | None = None,
    ) -> tuple[
        npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64],
        npt.NDArray[np.int64],
    ]:
        """Every row at least as close as threshold: (lims, scores, ids, totals)."""
        query_matrix = prepare_queries(queries, self.dim, self.metric)
        limit = check_threshold(threshold)
        if limit is None:
            raise ValueError("range_search needs a threshold")
        cap = None if max_results is None else check_k(max_results)
        hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (query, score, id)
        runs = list(self._candidate_runs(allow))
        for q0, q1 in self._query_chunks(len(query_matrix)):
            chunk = query_matrix[q0:q1]
            for keys, ids in self._key_tiles(chunk, runs):
                tile = self._scoring.scores(keys, chunk)
                rows, cols = np.nonzero(self._scoring.passes(tile, limit) & (keys > -np.inf))
                hits.append((rows + q0, tile[rows, cols], ids[cols]))
        return self._scoring.ranges(
            np.concatenate([h[0] for h in hits]) if hits else np.empty(0, np.int64),
            np.concatenate([h[1] for h in hits]) if hits else np.empty(0, np.float32),
            np.concatenate([h[2] for h in hits]) if hits else np.empty(0, np.int64),
            len(query_matrix), cap)

    def get(self, ids: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Stored vectors for ids as float32 (n, dim); KeyError for an unknown id."""
        return self._vectors_at(self._rows.lookup(ids)).astype(np.float32)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._rows

    def memory_info(self) -> dict[str, Any]:
        row_bytes = self.dim * self._storage.itemsize
        capacity = len(self._blocks) * self._block_rows
        return {
            "backend": self.backend,
            "device": "host",
            "vectors": len(self._rows),
            "capacity_rows": capacity,
            "block_rows": self._block_rows,
            "vector_bytes": len(self._rows) * row_bytes,
            "allocated_bytes": capacity * (row_bytes + 8 + 4 * (self.metric == "l2")),
        }

    # ------------------------------------------------------------------ internals
    def _query_chunks(self, nq: int) -> Iterator[tuple[int, int]]:
        step = max(1, min(nq, 1024))
        for q0 in range(0, nq, step):
            yield q0, min(nq, q0 + step)

    def _candidate_runs(self, allow: npt.ArrayLike | None) -> Iterator[_Rows]:
        """The rows a search may return, block by block (gathered or masked under allow)."""
        allowed = self._rows.allowed_positions(allow)
        count = len(self._rows)
        for b, block in enumerate(self._blocks):
            start = b * self._block_rows
            n = min(self._block_rows, count - start)
            if n <= 0:
                break
            vectors, ids = block[:n], self._rows.ids_at(slice(start, start + n))
            sq = self._block_sq_norms[b][:n] if self.metric == "l2" else None
            if allowed is None:
                yield _Rows(vectors, ids, sq, None)
                continue
            local = allowed[(allowed >= start) & (allowed < start + n)] - start
            if len(local) == 0:
                continue
            if len(local) >= GATHER_FRACTION * n:
                keep = np.zeros(n, bool)
                keep[local] = True
                yield _Rows(vectors, ids, sq, keep)
            else:
                yield _Rows(vectors, ids[local], None if sq is None else sq[local], None, local)

    def _key_tiles(
        self, chunk: npt.NDArray[np.float32], runs: list[_Rows]
    ) -> Iterator[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]:
        """(keys, ids) per tile: keys (q, rows), higher is closer, -inf where masked.

        A tile fills with the scores of consecutive runs, so that the few rows gathered
        from each block under a sparse allow-list share one top-k. keys and ids are only
        valid until the next tile: every tile reuses one buffer (fresh 16 MB allocations
        cost page faults on each tile)."""
        nq = len(chunk)
        # A tile holds up to tile_bytes of scores; one top-k covers it.
        tile_rows = max(256, min(self._tile_bytes // (4 * nq), self._block_rows))
        if nq == 1:  # GEMV: one pass over each whole block
            gemm_rows = self._block_rows
        elif nq < MANY_QUERIES:  # OpenBLAS packs the rows: keep that panel near the cache
            gemm_rows = max(256, self._tile_bytes // (4 * self.dim))
        else:  # compute-bound: one GEMM per tile
            gemm_rows = tile_rows
        gather_bytes = self._tile_bytes
        if nq < MANY_QUERIES:
            gather_bytes = min(GATHER_BYTES, gather_bytes)
        gather_rows = max(16, gather_bytes // (self.dim * self._storage.itemsize))
        gathered = None
        if any(run.gather is not None for run in runs):
            gathered = np.empty((gather_rows, self.dim), self._storage)
        buffer = np.empty((tile_rows, nq), np.float32)
        tile_ids = np.empty(tile_rows, np.int64)
        fill = 0
        for run in runs:
            panel_rows = gemm_rows if run.gather is None else min(gemm_rows, gather_rows)
            g0 = 0
            while g0 < len(run.ids):
                g1 = min(len(run.ids), g0 + panel_rows, g0 + tile_rows - fill)
                if run.gather is None:
                    rows = run.vectors[g0:g1]
                else:
                    assert gathered is not None
                    rows = np.take(run.vectors, run.gather[g0:g1], axis=0,
                                   out=gathered[: g1 - g0])
                if rows.dtype != np.float32:
                    rows = rows.astype(np.float32)
                out = buffer[fill:fill + g1 - g0]
                if nq == 1:
                    np.matmul(rows, chunk[0], out=out[:, 0])
                else:  # rows x queries: OpenBLAS runs this orientation faster here
                    np.matmul(rows, chunk.T, out=out)
                if run.sq_norms is not None:  # l2: 2 q.x - |x|^2 ranks like -|q - x|^2
                    out *= 2
                    out -= run.sq_norms[g0:g1, None]
                if run.keep is not None:
                    out[~run.keep[g0:g1]] = -np.inf
                tile_ids[fill:fill + g1 - g0] = run.ids[g0:g1]
                fill += g1 - g0
                g0 = g1
                if fill == tile_rows:
                    yield buffer.T, tile_ids
                    fill = 0
        if fill:
            yield buffer[:fill].T, tile_ids[:fill]

    def _reserve(self, rows: int) -> None:
        while len(self._blocks) * self._block_rows < rows:
            self._blocks.append(np.empty((self._block_rows, self.dim), self._storage))
            self._block_sq_norms.append(np.zeros(self._block_rows, np.float32))

    def _write_rows(self, positions: npt.NDArray[np.int64], stored: np.ndarray) -> None:
        for b, offsets, where in split_by_block(positions, self._block_rows):
            self._blocks[b][offsets] = stored[where]
            if self.metric == "l2":
                as32 = stored[where].astype(np.float32)
                self._block_sq_norms[b][offsets] = np.einsum("ij,ij->i", as32, as32)

    def _vectors_at(self, positions: npt.NDArray[np.int64]) -> np.ndarray:
        out = np.empty((len(positions), self.dim), self._storage)
        for b, offsets, where in split_by_block(positions, self._block_rows):
            out[where] = self._blocks[b][offsets]
        return out
