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
from cpu_fallback.rows import (
    RowMap,
    Scoring,
    blocks_in_use,
    prepare_batch,
    prepare_queries,
    split_by_block,
)
from cpu_fallback.topk import top_k_exact
from cpu_fallback.validation import check_config, check_k, check_threshold
from gpu.device import CudaOps

BLOCK_BYTES = 256 << 20
# The first block starts this small and grows to a full block by doubling.
MIN_BLOCK_ROWS = 1024
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
        self._rows = RowMap()
        self._scoring = Scoring(metric)

    # ------------------------------------------------------------------ writes
    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Upsert ids int64 (n,) with vectors float (n, dim); the last duplicate wins."""
        id_array, stored = prepare_batch(ids, vectors, self.dim, self.metric, self._storage)
        positions, new_count = self._rows.plan_upsert(id_array)
        with self._device_memory("adding vectors"):
            # Allocate and upload first, so that an out-of-memory error changes nothing.
            self._reserve(new_count)
            self._write_rows(positions, id_array, self._ops.to_device(stored))
        self._rows.commit_upsert(id_array, positions, new_count)

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove ids; unknown ids are ignored. Returns how many were present."""
        removal = self._rows.plan_remove(ids)
        if len(removal.holes):  # keep storage dense: movers fill the holes
            with self._device_memory("compacting after remove"):
                movers = self._ops.to_device(self._vectors_at(removal.movers))
                self._write_rows(removal.holes, self._rows.ids_at(removal.movers), movers)
        self._rows.commit_remove(removal)
        needed = blocks_in_use(removal.new_count, self._block_rows)
        del self._blocks[needed:], self._block_ids[needed:], self._block_sq_norms[needed:]
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
        host_queries = prepare_queries(queries, self.dim, self.metric)
        k = check_k(k)
        limit = check_threshold(threshold)
        nq = len(host_queries)
        scores = np.full((nq, k), self._scoring.missing, np.float32)
        result_ids = np.full((nq, k), -1, np.int64)
        if k == 0 or len(self._rows) == 0:
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
                if best is not None:  # only the k results per query leave the device
                    self._scoring.finish(
                        self._ops.to_host(best[0]), self._ops.to_host(best[1]),
                        host_queries[q0:q1], limit, scores[q0:q1], result_ids[q0:q1])
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
        host_queries = prepare_queries(queries, self.dim, self.metric)
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
        return self._scoring.ranges(
            np.concatenate([h[0] for h in hits]) if hits else np.empty(0, np.int64),
            np.concatenate([h[1] for h in hits]) if hits else np.empty(0, np.float32),
            np.concatenate([h[2] for h in hits]) if hits else np.empty(0, np.int64),
            nq, cap)

    def get(self, ids: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Stored vectors for ids as float32 (n, dim); KeyError for an unknown id."""
        return self._vectors_at(self._rows.lookup(ids)).astype(np.float32)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._rows

    def memory_info(self) -> dict[str, Any]:
        row_bytes = self.dim * self._storage.itemsize
        capacity = sum(len(block) for block in self._blocks)
        return {
            "backend": self.backend,
            "device": self._ops.name,
            "vectors": len(self._rows),
            "capacity_rows": capacity,
            "block_rows": self._block_rows,
            "vector_bytes": len(self._rows) * row_bytes,
            "allocated_bytes": capacity * (row_bytes + 8 + 4 * (self.metric == "l2")),
            "scratch_budget_bytes": self._scratch_bytes,
            **self._ops.memory(),
        }

    # ------------------------------------------------------------------ internals
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

    def _query_chunks(self, nq: int) -> Iterator[tuple[int, int]]:
        # A chunk's scores over one whole block must fit the scratch budget.
        per_query = SCRATCH_BYTES_PER_SCORE * min(self._block_rows, max(len(self._rows), 1))
        step = max(1, min(nq, self._scratch_bytes // per_query))
        for q0 in range(0, nq, step):
            yield q0, min(nq, q0 + step)

    def _runs(self, allow: npt.ArrayLike | None) -> Iterator[_Run]:
        allowed = self._rows.allowed_positions(allow)
        for b in range(len(self._blocks)):
            start = b * self._block_rows
            n = min(self._block_rows, len(self._rows) - start)
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

    def _reserve(self, rows: int) -> None:
        """Room for ``rows`` rows. Every block but the last holds block_rows; the last one
        grows by doubling, so a small collection does not pin a whole block of device
        memory and growth copies at most one block."""
        xp = self._xp
        while sum(len(block) for block in self._blocks) < rows:
            last = self._blocks[-1] if self._blocks else None
            if last is not None and len(last) < self._block_rows:
                need = rows - (len(self._blocks) - 1) * self._block_rows
                size = min(self._block_rows, max(need, 2 * len(last)))
                grown = (xp.empty((size, self.dim), dtype=self._storage),
                         xp.full(size, -1, dtype=np.int64), xp.zeros(size, dtype=np.float32))
                for new, old in zip(grown, (last, self._block_ids[-1], self._block_sq_norms[-1]),
                                    strict=True):
                    new[: len(old)] = old
                self._blocks[-1], self._block_ids[-1], self._block_sq_norms[-1] = grown
            else:
                need = rows - len(self._blocks) * self._block_rows
                size = min(self._block_rows, max(need, MIN_BLOCK_ROWS))
                self._blocks.append(xp.empty((size, self.dim), dtype=self._storage))
                self._block_ids.append(xp.full(size, -1, dtype=np.int64))
                self._block_sq_norms.append(xp.zeros(size, dtype=np.float32))

    def _write_rows(self, positions: np.ndarray, ids: np.ndarray, device_rows: Any) -> None:
        def to_device(index: Any) -> Any:  # slices index the device arrays as they are
            return index if isinstance(index, slice) else self._ops.to_device(index)

        for b, offsets, where in split_by_block(positions, self._block_rows):
            offsets_dev = to_device(offsets)
            rows = device_rows[to_device(where)]
            self._blocks[b][offsets_dev] = rows
            self._block_ids[b][offsets_dev] = self._ops.to_device(ids[where])
            if self.metric == "l2":
                as32 = rows.astype(np.float32)
                self._block_sq_norms[b][offsets_dev] = (as32 * as32).sum(axis=1)

    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.dim), self._storage)
        for b, offsets, where in split_by_block(positions, self._block_rows):
            rows = offsets if isinstance(offsets, slice) else self._ops.to_device(offsets)
            out[where] = self._ops.to_host(self._blocks[b][rows])
        return out
