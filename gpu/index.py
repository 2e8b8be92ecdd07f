"""GpuIndex: exact vector search with vectors resident on a CUDA device, GEMM per block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from cpu_fallback.core import (
    GPU_SCRATCH_BYTES,
    BlockedIndex,
    BlockRun,
    FloatArray,
    split_by_block,
)
from gpu.device import CudaOps

# The first block starts this small and grows to a full block by doubling.
MIN_BLOCK_ROWS = 1024
# Scratch per score in a search: the float32 key, the tie count's mask, top-k's own buffers.
SCRATCH_BYTES_PER_SCORE = 6
# A range search filters each key tile whole: the key (4) and three masks (passes, not
# masked, both: 1 each); under l2 also the distances (4 while computed, 4 kept), next to
# the previous tile's, which the shared loop holds until they are replaced (4).
RANGE_SCRATCH_BYTES_PER_SCORE = {"dot": 7, "cosine": 7, "l2": 16}
# Each column of a tile also holds its int64 id.
SCRATCH_BYTES_PER_COLUMN = 8


@dataclass
class _Run:
    """Candidate rows of one device block: all of them, a gathered subset, or masked."""

    block: int
    rows: int
    local: Any | None  # device int64 row offsets (gathered subset) or None
    dropped: Any | None  # device int64 offsets of the block's disallowed rows, or None


@dataclass
class _Tiles:
    """A search's key tiles: its runs grouped into tiles, and one buffer they all use."""

    runs: list[_Run]
    groups: list[list[_Run]]
    keys: Any  # flat float32: the first (widest) query chunk times the widest group
    ids: Any  # int64, the widest group


class GpuIndex(BlockedIndex):
    """Exact index on one GPU; ``cpu_fallback.core.VectorIndex`` states the contract.

    Vectors sit in fixed-size device blocks (growth never copies the index). Each block
    tile is scored with one cuBLAS GEMM (float16 and bfloat16 storage: tensor cores,
    float32 accumulation and output), reduced on the device to an exact top-k, and merged; only
    the final k per query are copied to the host. Scratch (score tiles) stays under
    ``scratch_bytes`` (1 GiB by default). Not thread-safe: callers serialise writes
    against reads.
    """

    backend = "gpu"
    min_block_rows = MIN_BLOCK_ROWS
    default_scratch_bytes = GPU_SCRATCH_BYTES

    _ops: Any
    _device_dtype: np.dtype[Any]  # the storage dtype as CuPy holds it
    _block_ids: list[Any]  # device int64 per block, gathered into results on the device
    _tiles: _Tiles | None  # the search under way's tile buffer

    # ------------------------------------------------------------------ device
    def _open_device(self) -> None:
        self._ops = self._device_ops()
        self._xp = self._ops.xp
        # CuPy has no bfloat16: such rows live on the device as their bits (uint16).
        self._device_dtype = np.dtype(np.uint16) if self.dtype == "bfloat16" else self._storage
        if self.dtype == "bfloat16" and not self._ops.supports_bfloat16():
            raise ValueError(f"bfloat16 storage needs a GPU of compute capability 8.0 or "
                             f"newer; {self._ops.name} is older: store float16")
        self._block_ids = []
        self._tiles = None

    def _device_ops(self) -> Any:
        """The CUDA operations (CuPy, cuBLAS, torch.topk); tests put an emulated device here."""
        return CudaOps()

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Turn the device's out-of-memory errors into a MemoryError that says what to do;
        a search's tile buffer lives until here."""
        try:
            yield
        except self._ops.out_of_memory as exc:
            raise MemoryError(
                f"GPU out of memory while {doing} (scratch budget "
                f"{self._scratch_bytes >> 20} MiB): free device memory, lower scratch_bytes, "
                "or store float16") from exc
        finally:
            self._tiles = None

    def describe_kernel(self, nq: int, ranging: bool = False) -> str:
        return f"cuBLAS gemmEx, {self.dtype} operands, float32 accumulation and output"

    def _device_info(self) -> dict[str, Any]:
        return {"device": self._ops.name, **self._ops.memory()}

    def _to_device(self, array: np.ndarray) -> Any:
        return self._ops.to_device(array)

    def _to_host(self, array: Any) -> np.ndarray:
        host = self._ops.to_host(array)
        return host.view(self._storage) if host.dtype == np.uint16 else host

    def _device_index(self, index: Any) -> Any:
        """Slices index the device arrays as they are; offset arrays are uploaded."""
        return index if isinstance(index, slice) else self._ops.to_device(index)

    def _upload_queries(self, host_chunk: FloatArray) -> Any:
        # Half-precision storage is scored by a half-precision GEMM (tensor cores, float32
        # accumulation), so queries are cast to the storage dtype as well. A value past its
        # range would become inf and its scores NaN (which torch.topk ranks first): such
        # queries are refused, as stored vectors are, rather than answered wrongly.
        # (Scoring them in float32 would need a float32 copy of every block.)
        with np.errstate(over="ignore"):  # reported just below
            cast = host_chunk.astype(self._storage)
        if not np.isfinite(cast).all():
            raise ValueError(f"queries overflow {self._storage.name} storage (largest "
                             f"magnitude {float(ml_dtypes.finfo(self._storage).max):g}): "
                             "scale them down, or store float32")
        return self._ops.to_device(cast.view(self._device_dtype))

    # ------------------------------------------------------------------ storage
    def _reserve(self, rows: int) -> None:
        """Room for ``rows`` rows. Every block but the last holds block_rows; the last one
        grows by doubling, so a small collection does not pin a whole block of device
        memory and growth copies at most one block.

        All or nothing: a block's three arrays are allocated before any is stored, and
        running out of memory part way (a later block of a large add) undoes this call's
        blocks, so the lists still line up and the index is as it was.
        """
        saved = list(self._blocks), list(self._block_ids), list(self._block_sq_norms)
        try:
            while sum(len(block) for block in self._blocks) < rows:
                last = self._blocks[-1] if self._blocks else None
                if last is not None and len(last) < self._block_rows:
                    need = rows - (len(self._blocks) - 1) * self._block_rows
                    grown = self._new_block(min(self._block_rows, max(need, 2 * len(last))))
                    for new, old in zip(grown, (last, self._block_ids[-1],
                                                self._block_sq_norms[-1]), strict=True):
                        new[: len(old)] = old
                    self._blocks[-1], self._block_ids[-1], self._block_sq_norms[-1] = grown
                else:
                    need = rows - len(self._blocks) * self._block_rows
                    block, ids, sq_norms = self._new_block(
                        min(self._block_rows, max(need, MIN_BLOCK_ROWS)))
                    self._blocks.append(block)
                    self._block_ids.append(ids)
                    self._block_sq_norms.append(sq_norms)
        except BaseException:
            self._blocks[:], self._block_ids[:], self._block_sq_norms[:] = saved
            raise

    def _new_block(self, size: int) -> tuple[Any, Any, Any]:
        """Vectors, ids (-1: none) and squared norms for a block of ``size`` rows."""
        xp = self._xp
        return (xp.empty((size, self.dim), dtype=self._device_dtype),
                xp.full(size, -1, dtype=np.int64), xp.zeros(size, dtype=np.float32))

    def _write_rows(self, positions: npt.NDArray[np.int64], ids: npt.NDArray[np.int64],
                    rows: np.ndarray) -> None:
        # Everything is uploaded and computed before the first write, so that running out
        # of memory part way leaves the rows as they were (an upsert or a remove's
        # compaction overwrites rows that searches see).
        device_rows = self._ops.to_device(rows.view(self._device_dtype))
        writes = []
        for b, offsets, where in split_by_block(positions, self._block_rows):
            block_rows = device_rows[self._device_index(where)]
            sq_norms = None
            if self.metric == "l2":
                as32 = self._as_float32(block_rows)
                sq_norms = (as32 * as32).sum(axis=1)
            writes.append((b, self._device_index(offsets), block_rows,
                           self._ops.to_device(ids[where]), sq_norms))
        for b, offsets_dev, block_rows, block_ids, sq_norms in writes:
            self._blocks[b][offsets_dev] = block_rows
            self._block_ids[b][offsets_dev] = block_ids
            if sq_norms is not None:
                self._block_sq_norms[b][offsets_dev] = sq_norms

    def _as_float32(self, device_rows: Any) -> Any:
        """Stored rows on the device as float32 (bfloat16 bits: a float32's upper half)."""
        if self._device_dtype == np.uint16:
            return (device_rows.astype(np.uint32) << 16).view(np.float32)
        return device_rows.astype(np.float32)

    def _drop_blocks(self, keep: int) -> None:
        super()._drop_blocks(keep)
        del self._block_ids[keep:]

    # ------------------------------------------------------------------ scoring
    def _per_score(self, ranging: bool) -> int:
        """Scratch bytes per score: a range search filters whole key tiles, which takes
        more than a top-k does, so its tiles (and query chunks) are sized for that."""
        return RANGE_SCRATCH_BYTES_PER_SCORE[self.metric] if ranging else SCRATCH_BYTES_PER_SCORE

    def _queries_per_chunk(self, nq: int, ranging: bool = False) -> int:
        # A chunk's scores over one whole block (and the block's ids) must fit the budget.
        cols = min(self._block_rows, max(len(self._rows), 1))
        return ((self._scratch_bytes - SCRATCH_BYTES_PER_COLUMN * cols)
                // (self._per_score(ranging) * cols))

    def _prepare_run(self, plan: BlockRun) -> _Run:
        if plan.local is None:
            return _Run(plan.block, plan.rows, None, None)
        if plan.gather:
            return _Run(plan.block, len(plan.local), self._ops.to_device(plan.local), None)
        dropped = np.setdiff1d(np.arange(plan.rows), plan.local, assume_unique=True)
        return _Run(plan.block, plan.rows, None, self._ops.to_device(dropped))

    def _key_tiles(self, chunk: Any, runs: list[_Run], ranging: bool = False,
                   k: int | None = None) -> Iterator[tuple[Any, Any]]:
        """(keys, ids) on the device: keys (q, cols) over as many whole runs as the
        scratch budget holds, higher is closer; ids (cols,). One top-k covers them all.

        Every tile of a search is a view of one buffer, sized at its first (widest) query
        chunk, so a new tile is never allocated beside the one the caller still holds."""
        if not runs:
            return
        tiles = self._tiles
        if tiles is None or tiles.runs is not runs:
            budget_cols = max(1, self._scratch_bytes // (self._per_score(ranging) * len(chunk)
                                                         + SCRATCH_BYTES_PER_COLUMN))
            groups: list[list[_Run]] = [[]]
            for run in runs:
                if groups[-1] and sum(r.rows for r in groups[-1]) + run.rows > budget_cols:
                    groups.append([])
                groups[-1].append(run)
            width = max(sum(r.rows for r in group) for group in groups)
            xp = self._xp
            tiles = self._tiles = _Tiles(runs, groups,
                                         xp.empty(len(chunk) * width, dtype=np.float32),
                                         xp.empty(width, dtype=np.int64))
        for group in tiles.groups:
            yield self._score_runs(chunk, group, tiles)

    def _score_runs(self, chunk: Any, group: list[_Run], tiles: _Tiles) -> tuple[Any, Any]:
        width = sum(run.rows for run in group)
        keys = tiles.keys[: len(chunk) * width].reshape(len(chunk), width)
        ids = tiles.ids[:width]
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
        # topk picks arbitrarily among keys equal to the k-th: in rows where such a tie
        # straddles the boundary (rare), the slots holding the k-th key go to the smallest
        # of the tied ids. Only those ids travel to the host and back.
        straddling = (self._ops.count_at_least(keys, kth) > width) & (kth > -np.inf)
        rows = xp.nonzero(straddling)[0]
        if len(rows):
            # Tied keys of straddling rows only (NaN compares false elsewhere).
            bound = xp.where(straddling, kth, np.float32(np.nan))
            tie_rows, tie_cols = xp.nonzero(keys == bound[:, None])
            tied = ids[tie_cols] if ids.ndim == 1 else ids[tie_rows, tie_cols]
            tie_rows, tied = self._to_host(tie_rows), self._to_host(tied)
            slots = self._to_host((values[rows] == kth[rows][:, None]).sum(axis=1))
            rows = self._to_host(rows)
            order = np.lexsort((tied, tie_rows))
            tie_rows, tied = tie_rows[order], tied[order]
            # Row r's last slots[r] places take its slots[r] smallest tied ids.
            within = np.arange(slots.sum()) - np.repeat(np.cumsum(slots) - slots, slots)
            fix_rows = np.repeat(rows, slots)
            fix_cols = np.repeat(width - slots, slots) + within
            fix_ids = tied[np.repeat(np.searchsorted(tie_rows, rows), slots) + within]
            top_ids[self._device_index(fix_rows), self._device_index(fix_cols)] = \
                self._to_device(fix_ids)
        return values, top_ids
