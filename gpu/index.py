"""GpuIndex: exact vector search with vectors resident on a CUDA device, GEMM per block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# Host-side input checks and tie settling are shared with the CPU backend so that both
# enforce one contract (cpu_fallback never imports gpu).
from cpu_fallback.topk import sort_rows, top_k_exact
from cpu_fallback.validation import (
    as_ids,
    as_matrix,
    check_config,
    check_k,
    check_threshold,
    normalise_rows,
)
from gpu.device import CudaOps

BLOCK_BYTES = 256 << 20
SCRATCH_BYTES = 1 << 30
GATHER_FRACTION = 0.5
# Scratch per score: the float32 score, the comparison mask, top-k's own buffers.
SCRATCH_BYTES_PER_SCORE = 6


@dataclass
class _Run:
    """Candidate rows of one device block: all of them, a gathered subset, or masked."""

    block: int
    rows: int
    local: Any | None  # device int64 row offsets (gathered subset) or None
    dropped: Any | None  # device int64 offsets of the block's disallowed rows, or None


class GpuIndex:
    """Exact index on one GPU; see ``service.index_protocol.VectorIndex`` for the contract.

    Vectors sit in fixed-size device blocks (growth never copies the index). Each block
    tile is scored with one cuBLAS GEMM (float16 storage: tensor cores, float32
    accumulation and output), reduced on the device to an exact top-k, and merged; only
    the final k per query are copied to the host. Scratch (score tiles) stays under
    ``scratch_bytes``. Not thread-safe: callers serialise writes against reads.
    """

    backend = "gpu"

    def __init__(
        self,
        dim: int,
        metric: str = "cosine",
        dtype: str = "float32",
        *,
        block_rows: int | None = None,
        scratch_bytes: int = SCRATCH_BYTES,
        ops: Any = None,
    ) -> None:
        check_config(dim, metric, dtype)
        self.dim = int(dim)
        self.metric = metric
        self.dtype = dtype
        self._ops = ops if ops is not None else CudaOps()
        self._xp = self._ops.xp
        self._storage = np.dtype(dtype)
        row_bytes = self.dim * self._storage.itemsize
        self._block_rows = int(block_rows or max(1024, BLOCK_BYTES // row_bytes))
        self._scratch_bytes = int(scratch_bytes)
        self._blocks: list[Any] = []
        self._block_ids: list[Any] = []  # device int64, gathered into results on device
        self._block_sq_norms: list[Any] = []
        self._host_ids = np.empty(0, np.int64)  # position -> id, for bookkeeping
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
        with self._device_memory("adding vectors"):
            # Allocate and upload first, so that an out-of-memory error changes nothing.
            self._reserve(self._count + n_new)
            rows = self._ops.to_device(stored)
            positions[fresh] = np.arange(self._count, self._count + n_new)
            self._write_rows(positions, id_array, rows)
        self._position.update(zip(id_array[fresh].tolist(), positions[fresh].tolist(), strict=True))
        self._count += n_new

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove ids; unknown ids are ignored. Returns how many were present."""
        id_array = np.unique(as_ids(ids, allow_empty=True))
        gone = np.array([self._position.get(i, -1) for i in id_array.tolist()], np.int64)
        gone = np.sort(gone[gone >= 0])
        if len(gone) == 0:
            return 0
        new_count = self._count - len(gone)
        holes = gone[gone < new_count]
        movers = np.setdiff1d(np.arange(new_count, self._count), gone, assume_unique=True)
        for gone_id in self._host_ids[gone].tolist():
            del self._position[gone_id]
        if len(holes):
            mover_ids = self._host_ids[movers].copy()
            with self._device_memory("compacting after remove"):
                self._write_rows(holes, mover_ids, self._ops.to_device(self._vectors_at(movers)))
            self._position.update(zip(mover_ids.tolist(), holes.tolist(), strict=True))
        self._count = new_count
        needed = -(-new_count // self._block_rows)
        del self._blocks[needed:], self._block_ids[needed:], self._block_sq_norms[needed:]
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
        host_queries = self._prepare_queries(queries)
        k = check_k(k)
        limit = check_threshold(threshold)
        nq = len(host_queries)
        scores = np.full((nq, k), self._missing_score, np.float32)
        result_ids = np.full((nq, k), -1, np.int64)
        if k == 0 or self._count == 0:
            return scores, result_ids
        with self._device_memory("searching"):
            runs = list(self._runs(allow))
            for q0, q1 in self._query_chunks(nq):
                chunk = self._ops.to_device(host_queries[q0:q1].astype(self._storage))
                best: tuple[Any, Any] | None = None
                for keys, ids in self._key_tiles(chunk, runs, q1 - q0):
                    found = self._device_top_k(keys, ids, k)
                    if best is not None:
                        found = self._device_top_k(
                            self._xp.concatenate([best[0], found[0]], axis=1),
                            self._xp.concatenate([best[1], found[1]], axis=1), k)
                    best = found
                if best is None:
                    continue
                keys_h, ids_h = sort_rows(self._ops.to_host(best[0]), self._ops.to_host(best[1]))
                found_scores = self._to_scores_host(keys_h, host_queries[q0:q1])
                valid = keys_h > -np.inf
                if limit is not None:
                    valid &= self._passes(found_scores, limit)
                width = keys_h.shape[1]
                scores[q0:q1, :width] = np.where(valid, found_scores, self._missing_score)
                result_ids[q0:q1, :width] = np.where(valid, ids_h, -1)
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
        host_queries = self._prepare_queries(queries)
        limit = check_threshold(threshold)
        if limit is None:
            raise ValueError("range_search needs a threshold")
        cap = None if max_results is None else check_k(max_results)
        nq = len(host_queries)
        hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (query, score, id)
        xp = self._xp
        with self._device_memory("range searching"):
            runs = list(self._runs(allow))
            q_sq = xp.asarray(np.einsum("ij,ij->i", host_queries, host_queries))
            for q0, q1 in self._query_chunks(nq):
                chunk = self._ops.to_device(host_queries[q0:q1].astype(self._storage))
                for keys, ids in self._key_tiles(chunk, runs, q1 - q0):
                    tile = keys
                    if self.metric == "l2":
                        tile = xp.sqrt(xp.maximum(q_sq[q0:q1, None] - keys, 0))
                    match = (tile <= limit) if self.metric == "l2" else (tile >= limit)
                    rows, cols = xp.nonzero(match & (keys > -np.inf))
                    if len(rows):
                        hits.append((self._ops.to_host(rows) + q0,
                                     self._ops.to_host(tile[rows, cols]),
                                     self._ops.to_host(ids[cols])))
        query_of = np.concatenate([h[0] for h in hits]) if hits else np.empty(0, np.int64)
        found = np.concatenate([h[1] for h in hits]) if hits else np.empty(0, np.float32)
        found_ids = np.concatenate([h[2] for h in hits]) if hits else np.empty(0, np.int64)
        order = np.lexsort((found_ids, -self._closeness(found), query_of))
        query_of, found, found_ids = query_of[order], found[order], found_ids[order]
        totals = np.bincount(query_of, minlength=nq).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(totals)[:-1]])
        rank = np.arange(len(query_of)) - np.repeat(starts, totals)
        keep = rank < (cap if cap is not None else len(query_of) + 1)
        kept = np.minimum(totals, cap) if cap is not None else totals
        lims = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        return lims, found[keep].astype(np.float32), found_ids[keep], totals

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
            "device": self._ops.name,
            "vectors": self._count,
            "capacity_rows": capacity,
            "block_rows": self._block_rows,
            "vector_bytes": self._count * row_bytes,
            "allocated_bytes": capacity * (row_bytes + 8 + 4 * (self.metric == "l2")),
            "scratch_budget_bytes": self._scratch_bytes,
            **self._ops.memory(),
        }

    # ------------------------------------------------------------------ internals
    @property
    def _missing_score(self) -> float:
        return np.inf if self.metric == "l2" else -np.inf

    @contextmanager
    def _device_memory(self, doing: str) -> Iterator[None]:
        """Turn the device's out-of-memory errors into a MemoryError that says what to do."""
        try:
            yield
        except self._ops.out_of_memory as exc:
            raise MemoryError(
                f"GPU out of memory while {doing} (scratch budget "
                f"{self._scratch_bytes >> 20} MiB): free device memory, lower scratch_bytes, "
                "or store float16") from exc

    def _prepare_queries(self, queries: npt.ArrayLike) -> npt.NDArray[np.float32]:
        matrix = as_matrix(queries, self.dim, "queries")
        return normalise_rows(matrix, "queries") if self.metric == "cosine" else matrix

    def _query_chunks(self, nq: int) -> Iterator[tuple[int, int]]:
        # A chunk's scores over one whole block must fit the scratch budget.
        per_query = SCRATCH_BYTES_PER_SCORE * min(self._block_rows, max(self._count, 1))
        step = max(1, min(nq, self._scratch_bytes // per_query))
        for q0 in range(0, nq, step):
            yield q0, min(nq, q0 + step)

    def _runs(self, allow: npt.ArrayLike | None) -> Iterator[_Run]:
        allowed = None
        if allow is not None:
            unique = np.unique(as_ids(allow, allow_empty=True)).tolist()
            allowed = np.sort(np.array([self._position.get(i, -1) for i in unique], np.int64))
            allowed = allowed[allowed >= 0]
        for b in range(len(self._blocks)):
            start = b * self._block_rows
            n = min(self._block_rows, self._count - start)
            if n <= 0:
                break
            if allowed is None:
                yield _Run(b, n, None, None)
                continue
            local = allowed[(allowed >= start) & (allowed < start + n)] - start
            if len(local) == 0:
                continue
            if len(local) >= GATHER_FRACTION * n:
                dropped = np.setdiff1d(np.arange(n), local, assume_unique=True)
                yield _Run(b, n, None, self._ops.to_device(dropped))
            else:
                yield _Run(b, len(local), self._ops.to_device(local), None)

    def _key_tiles(self, chunk: Any, runs: list[_Run], nq: int) -> Iterator[tuple[Any, Any]]:
        """(keys, ids) on the device: keys (q, cols) over as many whole runs as the
        scratch budget holds, higher is closer; ids (cols,). One top-k covers them all."""
        budget_cols = max(1, self._scratch_bytes // (SCRATCH_BYTES_PER_SCORE * nq))
        group: list[_Run] = []
        for run in runs:
            if group and sum(r.rows for r in group) + run.rows > budget_cols:
                yield self._score_runs(chunk, group)
                group = []
            group.append(run)
        if group:
            yield self._score_runs(chunk, group)

    def _score_runs(self, chunk: Any, group: list[_Run]) -> tuple[Any, Any]:
        xp = self._xp
        width = sum(run.rows for run in group)
        keys = xp.empty((len(chunk), width), dtype=np.float32)
        ids = xp.empty(width, dtype=np.int64)
        c0 = 0
        for run in group:
            rows = slice(0, run.rows) if run.local is None else run.local
            view = keys[:, c0:c0 + run.rows]
            self._ops.scores(chunk, self._blocks[run.block][rows], out=view)
            if self.metric == "l2":  # 2 q.x - |x|^2 ranks like -|q - x|^2
                view *= 2
                view -= self._block_sq_norms[run.block][rows][None, :]
            if run.dropped is not None:
                view[:, run.dropped] = -np.inf
            ids[c0:c0 + run.rows] = self._block_ids[run.block][rows]
            c0 += run.rows
        return keys, ids

    def _device_top_k(self, keys: Any, ids: Any, k: int) -> tuple[Any, Any]:
        """Exact top-k under (key desc, id asc) on the device; ties settled on the host."""
        xp = self._xp
        width = min(k, keys.shape[1])
        values, cols = self._ops.top_k(keys, width)
        top_ids = ids[cols] if ids.ndim == 1 else xp.take_along_axis(ids, cols, axis=1)
        kth = values[:, -1]
        # topk picks arbitrarily among keys equal to the k-th; rows where such a tie
        # straddles the boundary are rare and settled exactly on the host.
        straddling = (self._ops.count_at_least(keys, kth) > width) & (kth > -np.inf)
        rows = xp.nonzero(straddling)[0]
        if len(rows):
            row_keys = self._ops.to_host(keys[rows])
            row_ids = self._ops.to_host(ids if ids.ndim == 1 else ids[rows])
            fixed_keys, fixed_ids = top_k_exact(row_keys, row_ids, width)
            values[rows] = self._ops.to_device(fixed_keys)
            top_ids[rows] = self._ops.to_device(fixed_ids)
        return values, top_ids

    def _to_scores_host(self, keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
        if self.metric != "l2":
            return keys
        q_sq = np.einsum("ij,ij->i", queries, queries)[:, None]
        return np.sqrt(np.maximum(q_sq - keys, 0)).astype(np.float32)

    def _passes(self, scores: np.ndarray, limit: float) -> np.ndarray:
        return scores <= limit if self.metric == "l2" else scores >= limit

    def _closeness(self, scores: np.ndarray) -> np.ndarray:
        return -scores if self.metric == "l2" else scores

    def _reserve(self, rows: int) -> None:
        xp = self._xp
        while len(self._blocks) * self._block_rows < rows:
            self._blocks.append(xp.empty((self._block_rows, self.dim), dtype=self._storage))
            self._block_ids.append(xp.full(self._block_rows, -1, dtype=np.int64))
            self._block_sq_norms.append(xp.zeros(self._block_rows, dtype=np.float32))
        capacity = len(self._blocks) * self._block_rows
        if len(self._host_ids) < capacity:
            grown = np.full(capacity, -1, np.int64)
            grown[: len(self._host_ids)] = self._host_ids
            self._host_ids = grown

    def _split(self, positions: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        blocks = positions // self._block_rows
        for b in np.unique(blocks).tolist():
            where = np.flatnonzero(blocks == b)
            yield b, positions[where] - b * self._block_rows, where

    def _write_rows(self, positions: np.ndarray, ids: np.ndarray, device_rows: Any) -> None:
        to_device = self._ops.to_device
        for b, offsets, where in self._split(positions):
            offsets_dev = to_device(offsets)
            rows = device_rows[to_device(where)]
            self._blocks[b][offsets_dev] = rows
            self._block_ids[b][offsets_dev] = to_device(ids[where])
            if self.metric == "l2":
                as32 = rows.astype(np.float32)
                self._block_sq_norms[b][offsets_dev] = (as32 * as32).sum(axis=1)
        self._host_ids[positions] = ids

    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.dim), self._storage)
        for b, offsets, where in self._split(positions):
            out[where] = self._ops.to_host(self._blocks[b][self._ops.to_device(offsets)])
        return out
