"""CpuIndex: exact vector search on the host, numpy BLAS over cache-sized row tiles."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_fallback.topk import merge_top_k, sort_rows, top_k_exact
from cpu_fallback.validation import (
    as_ids,
    as_matrix,
    check_config,
    check_k,
    check_threshold,
    normalise_rows,
)

# A score tile of (queries x rows) float32: large enough for an efficient GEMM, small
# enough to stay near the cache.
TILE_BYTES = 16 << 20
# Storage grows by whole blocks of about this many bytes: growth never copies the index.
BLOCK_BYTES = 64 << 20
# Below this allowed fraction a block's allowed rows are gathered; above it, masked.
GATHER_FRACTION = 0.5


@dataclass
class _Rows:
    """A contiguous run of candidate rows: vectors, their ids, squared norms, mask."""

    vectors: npt.NDArray[Any]
    ids: npt.NDArray[np.int64]
    sq_norms: npt.NDArray[np.float32] | None
    keep: npt.NDArray[np.bool_] | None  # None: every row may be returned


class CpuIndex:
    """Exact index on the host; see ``service.index_protocol.VectorIndex`` for the contract.

    Vectors live in fixed-size numpy blocks of ``block_rows`` rows. A search scores each
    tile of rows with one BLAS call (GEMV for one query, GEMM for many), keeps an exact
    per-tile top-k with ``argpartition`` along the contiguous axis, and merges.
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
        self._block_ids: list[npt.NDArray[np.int64]] = []
        self._block_sq_norms: list[npt.NDArray[np.float32]] = []
        self._count = 0
        self._position: dict[int, int] = {}

    # ------------------------------------------------------------------ writes
    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Upsert ids int64 (n,) with vectors float (n, dim); the last duplicate wins."""
        id_array = as_ids(ids)
        matrix = as_matrix(vectors, self.dim, "vectors")
        if len(id_array) != len(matrix):
            raise ValueError(f"got {len(id_array)} ids for {len(matrix)} vectors")
        if self.metric == "cosine":
            matrix = normalise_rows(matrix, "vectors")
        with np.errstate(over="ignore"):  # overflow is reported just below
            stored = matrix.astype(self._storage)
        if not np.isfinite(stored).all():
            raise ValueError(f"vectors overflow {self.dtype} (largest magnitude 65504)")
        last = len(id_array) - 1 - np.unique(id_array[::-1], return_index=True)[1]
        id_array, stored = id_array[last], stored[last]

        positions = np.array([self._position.get(i, -1) for i in id_array.tolist()], np.int64)
        fresh = positions < 0
        n_new = int(fresh.sum())
        new_positions = np.arange(self._count, self._count + n_new, dtype=np.int64)
        self._reserve(self._count + n_new)
        positions[fresh] = new_positions
        self._write_rows(positions, id_array, stored)
        self._position.update(zip(id_array[fresh].tolist(), new_positions.tolist(), strict=True))
        self._count += n_new

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove ids; unknown ids are ignored. Returns how many were present."""
        id_array = np.unique(as_ids(ids, allow_empty=True))
        gone = np.array([self._position.get(i, -1) for i in id_array.tolist()], np.int64)
        gone = np.sort(gone[gone >= 0])
        if len(gone) == 0:
            return 0
        new_count = self._count - len(gone)
        # Keep storage dense: survivors past the new end move into the holes below it.
        holes = gone[gone < new_count]
        tail = np.arange(new_count, self._count, dtype=np.int64)
        movers = np.setdiff1d(tail, gone, assume_unique=True)
        for gone_id in self._ids_at(gone).tolist():
            del self._position[gone_id]
        if len(holes):
            mover_ids = self._ids_at(movers)
            self._write_rows(holes, mover_ids, self._vectors_at(movers))
            self._position.update(zip(mover_ids.tolist(), holes.tolist(), strict=True))
        self._count = new_count
        self._release_empty_blocks()
        return len(gone)

    # ------------------------------------------------------------------ reads
    def search(
        self,
        queries: npt.ArrayLike,
        k: int,
        threshold: float | None = None,
        allow: npt.ArrayLike | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-k of queries (q, dim) -> scores float32 (q, k), ids int64 (q, k)."""
        query_matrix = self._prepare_queries(queries)
        k = check_k(k)
        limit = check_threshold(threshold)
        nq = len(query_matrix)
        scores = np.full((nq, k), self._missing_score, np.float32)
        result_ids = np.full((nq, k), -1, np.int64)
        if k == 0 or self._count == 0:
            return scores, result_ids
        runs = list(self._candidate_runs(allow))
        for q0, q1 in self._query_chunks(nq):
            chunk = query_matrix[q0:q1]
            best = (np.empty((q1 - q0, 0), np.float32), np.empty((q1 - q0, 0), np.int64))
            for keys, ids in self._key_tiles(chunk, runs):
                best = merge_top_k(best, top_k_exact(keys, ids, k), k)
            keys, ids = sort_rows(*best)
            found = self._to_scores(keys, chunk)
            valid = keys > -np.inf
            if limit is not None:
                valid &= self._passes(found, limit)
            width = keys.shape[1]
            scores[q0:q1, :width] = np.where(valid, found, self._missing_score)
            result_ids[q0:q1, :width] = np.where(valid, ids, -1)
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
        query_matrix = self._prepare_queries(queries)
        limit = check_threshold(threshold)
        if limit is None:
            raise ValueError("range_search needs a threshold")
        cap = None if max_results is None else check_k(max_results)
        nq = len(query_matrix)
        per_query: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(nq)]
        totals = np.zeros(nq, np.int64)
        runs = list(self._candidate_runs(allow))
        for q0, q1 in self._query_chunks(nq):
            chunk = query_matrix[q0:q1]
            for keys, ids in self._key_tiles(chunk, runs):
                tile_scores = self._to_scores(keys, chunk)
                hit_rows, hit_cols = np.nonzero(self._passes(tile_scores, limit) & (keys > -np.inf))
                if len(hit_rows) == 0:
                    continue
                counts = np.bincount(hit_rows, minlength=q1 - q0)
                totals[q0:q1] += counts
                # np.nonzero lists hits row by row, so each row's hits are one slice.
                ends = np.cumsum(counts)
                for row in np.flatnonzero(counts).tolist():
                    cols = hit_cols[ends[row] - counts[row]:ends[row]]
                    per_query[q0 + row].append((tile_scores[row, cols], ids[cols]))
        lims = np.zeros(nq + 1, np.int64)
        out_scores, out_ids = [], []
        for qi, parts in enumerate(per_query):
            if parts:
                found = np.concatenate([p[0] for p in parts])
                found_ids = np.concatenate([p[1] for p in parts])
                order = np.lexsort((found_ids, -self._closeness(found)))[:cap]
                out_scores.append(found[order])
                out_ids.append(found_ids[order])
                lims[qi + 1] = lims[qi] + len(order)
            else:
                lims[qi + 1] = lims[qi]
        scores = np.concatenate(out_scores) if out_scores else np.empty(0, np.float32)
        ids = np.concatenate(out_ids) if out_ids else np.empty(0, np.int64)
        return lims, scores.astype(np.float32), ids, totals

    def get(self, ids: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Stored vectors for ids as float32 (n, dim); KeyError for an unknown id."""
        id_array = as_ids(ids, allow_empty=True)
        missing = [i for i in id_array.tolist() if i not in self._position]
        if missing:
            raise KeyError(f"unknown id {missing[0]}")
        positions = np.array([self._position[i] for i in id_array.tolist()], np.int64)
        return self._vectors_at(positions).astype(np.float32)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, id_: object) -> bool:
        return isinstance(id_, int | np.integer) and int(id_) in self._position

    def memory_info(self) -> dict[str, Any]:
        row_bytes = self.dim * self._storage.itemsize
        capacity = len(self._blocks) * self._block_rows
        return {
            "backend": self.backend,
            "device": "host",
            "vectors": self._count,
            "capacity_rows": capacity,
            "block_rows": self._block_rows,
            "vector_bytes": self._count * row_bytes,
            "allocated_bytes": capacity * (row_bytes + 8 + 4 * (self.metric == "l2")),
        }

    # ------------------------------------------------------------------ internals
    @property
    def _missing_score(self) -> float:
        return np.inf if self.metric == "l2" else -np.inf

    def _prepare_queries(self, queries: npt.ArrayLike) -> npt.NDArray[np.float32]:
        matrix = as_matrix(queries, self.dim, "queries")
        return normalise_rows(matrix, "queries") if self.metric == "cosine" else matrix

    def _query_chunks(self, nq: int) -> Iterator[tuple[int, int]]:
        step = max(1, min(nq, 1024))
        for q0 in range(0, nq, step):
            yield q0, min(nq, q0 + step)

    def _candidate_runs(self, allow: npt.ArrayLike | None) -> Iterator[_Rows]:
        """The rows a search may return, block by block (gathered or masked under allow)."""
        allowed = None if allow is None else self._allowed_positions(allow)
        for b, block in enumerate(self._blocks):
            start = b * self._block_rows
            n = min(self._block_rows, self._count - start)
            if n <= 0:
                break
            vectors, ids = block[:n], self._block_ids[b][:n]
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
                yield _Rows(vectors[local], ids[local], None if sq is None else sq[local], None)

    def _allowed_positions(self, allow: npt.ArrayLike) -> npt.NDArray[np.int64]:
        allow_ids = as_ids(allow, allow_empty=True)
        found = [self._position.get(i, -1) for i in np.unique(allow_ids).tolist()]
        positions = np.array(found, np.int64)
        return np.sort(positions[positions >= 0])

    def _key_tiles(
        self, chunk: npt.NDArray[np.float32], runs: list[_Rows]
    ) -> Iterator[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]:
        """(keys, ids) per tile: keys (q, rows), higher is closer, -inf where masked."""
        tile_rows = max(256, self._tile_bytes // (4 * len(chunk)))
        for run in runs:
            for t0 in range(0, len(run.ids), tile_rows):
                t1 = min(len(run.ids), t0 + tile_rows)
                rows = run.vectors[t0:t1]
                if rows.dtype != np.float32:
                    rows = rows.astype(np.float32)
                # One query is a GEMV, which streams the rows once at memory bandwidth.
                keys = (rows @ chunk[0])[None, :] if len(chunk) == 1 else chunk @ rows.T
                if run.sq_norms is not None:  # l2: 2 q.x - |x|^2 ranks like -|q - x|^2
                    keys *= 2
                    keys -= run.sq_norms[t0:t1]
                if run.keep is not None:
                    keys[:, ~run.keep[t0:t1]] = -np.inf
                yield keys, run.ids[t0:t1]

    def _to_scores(
        self, keys: npt.NDArray[np.float32], chunk: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        if self.metric != "l2":
            return keys
        q_sq = np.einsum("ij,ij->i", chunk, chunk)[:, None]
        return np.sqrt(np.maximum(q_sq - keys, 0)).astype(np.float32)

    def _passes(self, scores: npt.NDArray[np.float32], limit: float) -> npt.NDArray[np.bool_]:
        return scores <= limit if self.metric == "l2" else scores >= limit

    def _closeness(self, scores: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return -scores if self.metric == "l2" else scores

    def _reserve(self, rows: int) -> None:
        while len(self._blocks) * self._block_rows < rows:
            self._blocks.append(np.empty((self._block_rows, self.dim), self._storage))
            self._block_ids.append(np.full(self._block_rows, -1, np.int64))
            self._block_sq_norms.append(np.zeros(self._block_rows, np.float32))

    def _release_empty_blocks(self) -> None:
        needed = -(-self._count // self._block_rows)
        del self._blocks[needed:], self._block_ids[needed:], self._block_sq_norms[needed:]

    def _split(
        self, positions: npt.NDArray[np.int64]
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(block, row offsets within it, indices into ``positions``) per touched block."""
        blocks = positions // self._block_rows
        for b in np.unique(blocks).tolist():
            where = np.flatnonzero(blocks == b)
            yield b, positions[where] - b * self._block_rows, where

    def _write_rows(
        self, positions: npt.NDArray[np.int64], ids: npt.NDArray[np.int64], stored: np.ndarray
    ) -> None:
        for b, offsets, where in self._split(positions):
            self._blocks[b][offsets] = stored[where]
            self._block_ids[b][offsets] = ids[where]
            if self.metric == "l2":
                as32 = stored[where].astype(np.float32)
                self._block_sq_norms[b][offsets] = np.einsum("ij,ij->i", as32, as32)

    def _vectors_at(self, positions: npt.NDArray[np.int64]) -> np.ndarray:
        out = np.empty((len(positions), self.dim), self._storage)
        for b, offsets, where in self._split(positions):
            out[where] = self._blocks[b][offsets]
        return out

    def _ids_at(self, positions: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        out = np.empty(len(positions), np.int64)
        for b, offsets, where in self._split(positions):
            out[where] = self._block_ids[b][offsets]
        return out
