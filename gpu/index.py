"""GpuIndex: exact vector search with vectors resident on a CUDA device, GEMM per block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_fallback.core import (
    GPU_SCRATCH_BYTES,
    BlockedIndex,
    BlockRun,
    FloatArray,
    split_by_block,
    top_k_exact,
)
from gpu.device import CudaOps

# The first block starts this small and grows to a full block by doubling.
MIN_BLOCK_ROWS = 1024
# Scratch per score: the float32 score, the comparison mask, top-k's own buffers.
SCRATCH_BYTES_PER_SCORE = 6


@dataclass
class _Run:
    """Candidate rows of one device block: all of them, a gathered subset, or masked."""

    block: int
    rows: int
    local: Any | None  # device int64 row offsets (gathered subset) or None
    dropped: Any | None  # device int64 offsets of the block's disallowed rows, or None


class GpuIndex(BlockedIndex):
    """Exact index on one GPU; ``cpu_fallback.core.VectorIndex`` states the contract.

    Vectors sit in fixed-size device blocks (growth never copies the index). Each block
    tile is scored with one cuBLAS GEMM (float16 storage: tensor cores, float32
    accumulation and output), reduced on the device to an exact top-k, and merged; only
    the final k per query are copied to the host. Scratch (score tiles) stays under
    ``scratch_bytes`` (1 GiB by default). Not thread-safe: callers serialise writes
    against reads.
    """

    backend = "gpu"
    min_block_rows = MIN_BLOCK_ROWS
    default_scratch_bytes = GPU_SCRATCH_BYTES

    _ops: Any
    _block_ids: list[Any]  # device int64 per block, gathered into results on the device

    # ------------------------------------------------------------------ device
    def _open_device(self) -> None:
        self._ops = self._device_ops()
        self._xp = self._ops.xp
        self._block_ids = []

    def _device_ops(self) -> Any:
        """The CUDA operations (CuPy, cuBLAS, torch.topk); tests put an emulated device here."""
        return CudaOps()

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Turn the device's out-of-memory errors into a MemoryError that says what to do."""
        try:
            yield
        except self._ops.out_of_memory as exc:
            raise MemoryError(
                f"GPU out of memory while {doing} (scratch budget "
                f"{self._scratch_bytes >> 20} MiB): free device memory, lower scratch_bytes, "
                "or store float16") from exc

    def _device_info(self) -> dict[str, Any]:
        return {"device": self._ops.name, **self._ops.memory()}

    def _to_device(self, array: np.ndarray) -> Any:
        return self._ops.to_device(array)

    def _to_host(self, array: Any) -> np.ndarray:
        return self._ops.to_host(array)

    def _device_index(self, index: Any) -> Any:
        """Slices index the device arrays as they are; offset arrays are uploaded."""
        return index if isinstance(index, slice) else self._ops.to_device(index)

    def _upload_queries(self, host_chunk: FloatArray) -> Any:
        return self._ops.to_device(host_chunk.astype(self._storage))

    # ------------------------------------------------------------------ storage
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

    def _write_rows(self, positions: npt.NDArray[np.int64], ids: npt.NDArray[np.int64],
                    rows: np.ndarray) -> None:
        device_rows = self._ops.to_device(rows)
        for b, offsets, where in split_by_block(positions, self._block_rows):
            offsets_dev = self._device_index(offsets)
            block_rows = device_rows[self._device_index(where)]
            self._blocks[b][offsets_dev] = block_rows
            self._block_ids[b][offsets_dev] = self._ops.to_device(ids[where])
            if self.metric == "l2":
                as32 = block_rows.astype(np.float32)
                self._block_sq_norms[b][offsets_dev] = (as32 * as32).sum(axis=1)

    def _drop_blocks(self, keep: int) -> None:
        super()._drop_blocks(keep)
        del self._block_ids[keep:]

    # ------------------------------------------------------------------ scoring
    def _queries_per_chunk(self, nq: int) -> int:
        # A chunk's scores over one whole block must fit the scratch budget.
        per_query = SCRATCH_BYTES_PER_SCORE * min(self._block_rows, max(len(self._rows), 1))
        return self._scratch_bytes // per_query

    def _prepare_run(self, plan: BlockRun) -> _Run:
        if plan.local is None:
            return _Run(plan.block, plan.rows, None, None)
        if plan.gather:
            return _Run(plan.block, len(plan.local), self._ops.to_device(plan.local), None)
        dropped = np.setdiff1d(np.arange(plan.rows), plan.local, assume_unique=True)
        return _Run(plan.block, plan.rows, None, self._ops.to_device(dropped))

    def _key_tiles(self, chunk: Any, runs: list[_Run]) -> Iterator[tuple[Any, Any]]:
        """(keys, ids) on the device: keys (q, cols) over as many whole runs as the
        scratch budget holds, higher is closer; ids (cols,). One top-k covers them all."""
        budget_cols = max(1, self._scratch_bytes // (SCRATCH_BYTES_PER_SCORE * len(chunk)))
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

    def _merge_top_k(self, best: tuple[Any, Any] | None, keys: Any, ids: Any,
                     k: int) -> tuple[Any, Any]:
        found = self._device_top_k(keys, ids, k)
        if best is None:
            return found
        xp = self._xp
        return self._device_top_k(xp.concatenate([best[0], found[0]], axis=1),
                                  xp.concatenate([best[1], found[1]], axis=1), k)

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
