"""CpuIndex: exact vector search on the host, BLAS (or half-precision kernels) over
cache-sized row tiles."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_fallback import half
from cpu_fallback.core import (
    CPU_SCRATCH_BYTES,
    BlockedIndex,
    BlockRun,
    merge_top_k,
    split_by_block,
    top_k_exact,
)
from cpu_fallback.half_scoring import KERNEL_NOTES, HalfScorer

# From this many queries on, a GEMM is compute-bound and wants large tiles; below it,
# smaller tiles (about 16 MB of rows) run up to 1.5x faster (measured with OpenBLAS here).
MANY_QUERIES = 128
# Allowed rows are gathered panel by panel into one reused buffer of about this size
# (scratch_bytes for many queries): it stays in cache for the BLAS call, and no fresh
# copy of all the allowed rows is allocated.
GATHER_BYTES = 128 << 10
# The fewest rows a half-precision candidate panel holds (below it, per-panel costs show).
PANEL_ROWS = 1024


@dataclass
class _Rows:
    """A run of candidate rows: vectors, their ids, squared norms (l2 and half precision),
    mask, gather list."""

    vectors: npt.NDArray[Any]
    ids: npt.NDArray[np.int64]
    sq_norms: npt.NDArray[np.float32] | None
    keep: npt.NDArray[np.bool_] | None  # None: every row may be returned
    gather: npt.NDArray[np.int64] | None = None  # rows of vectors to score; None: all


class CpuIndex(BlockedIndex):
    """Exact index on the host; ``cpu_fallback.core.VectorIndex`` states the contract.

    Vectors live in fixed-size numpy blocks of ``block_rows`` rows. A search scores each
    tile of rows with one BLAS call (GEMV for one query, GEMM for many), keeps an exact
    per-tile top-k along the contiguous axis, and merges. float16 and bfloat16 rows are
    scored by ``cpu_fallback.half_scoring`` (the kernels measured fastest here), with
    float32 queries and float32 scores. ``scratch_bytes`` (16 MiB by default) bounds a
    tile of scores. Not thread-safe: callers serialise writes against reads.
    """

    backend = "cpu"
    min_block_rows = 256
    default_scratch_bytes = CPU_SCRATCH_BYTES

    _half: HalfScorer | None  # float16 and bfloat16 storage

    def _open_device(self) -> None:
        self._half = HalfScorer(self._storage, self.dim) if half.is_half(self._storage) else None

    def _keeps_sq_norms(self) -> bool:
        # Half precision keeps them too: its candidate bound scales with each row's norm.
        return self.metric == "l2" or self._half is not None

    def _device_info(self) -> dict[str, Any]:
        if self._half is None:
            return {"device": "host"}
        choice = self._half.choice
        return {"device": "host", "kernels": {"single": choice.single, "batch": choice.batch}}

    def describe_kernel(self, nq: int, ranging: bool = False) -> str:
        if self._half is None:
            return "float32 BLAS"
        name = self._half.choice.describe(nq, ranging)
        return f"{name} ({KERNEL_NOTES[name]}; measured fastest here)"

    # ------------------------------------------------------------------ storage
    def _reserve(self, rows: int) -> None:
        while len(self._blocks) * self._block_rows < rows:
            self._blocks.append(np.empty((self._block_rows, self.dim), self._storage))
            self._block_sq_norms.append(np.zeros(self._block_rows, np.float32))

    def _write_rows(self, positions: npt.NDArray[np.int64], ids: npt.NDArray[np.int64],
                    rows: np.ndarray) -> None:
        for b, offsets, where in split_by_block(positions, self._block_rows):
            self._blocks[b][offsets] = rows[where]
            if self._keeps_sq_norms():
                as32 = rows[where].astype(np.float32)
                self._block_sq_norms[b][offsets] = np.einsum("ij,ij->i", as32, as32)

    # ------------------------------------------------------------------ scoring
    def _queries_per_chunk(self, nq: int, ranging: bool = False) -> int:
        return 1024

    def _prepare_run(self, plan: BlockRun) -> _Rows:
        """A block's rows: all of them, masked by the allow-list, or the gathered few."""
        start, n = plan.start, plan.rows
        vectors = self._blocks[plan.block][:n]
        ids = self._rows.ids_at(slice(start, start + n))
        sq = self._block_sq_norms[plan.block][:n] if self._keeps_sq_norms() else None
        if plan.local is None:
            return _Rows(vectors, ids, sq, None)
        if not plan.gather:
            keep = np.zeros(n, bool)
            keep[plan.local] = True
            return _Rows(vectors, ids, sq, keep)
        local = plan.local
        return _Rows(vectors, ids[local], None if sq is None else sq[local], None, local)

    def _merge_top_k(
        self, best: tuple[Any, Any] | None, keys: npt.NDArray[np.float32],
        ids: npt.NDArray[np.int64], k: int,
    ) -> tuple[Any, Any]:
        found = top_k_exact(keys, ids, k)
        return found if best is None else merge_top_k(best, found, k)

    def _key_tiles(
        self, chunk: npt.NDArray[np.float32], runs: list[_Rows], ranging: bool = False,
        k: int | None = None,
    ) -> Iterator[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]:
        """(keys, ids) per tile: keys (q, rows), higher is closer, -inf where masked.

        A tile fills with the scores of consecutive runs, so that the few rows gathered
        from each block under a sparse allow-list share one top-k. keys and ids are only
        valid until the next tile: every tile reuses one buffer (fresh 16 MB allocations
        cost page faults on each tile). A half-precision top-k over many queries yields
        packed candidates instead (``HalfScorer.candidates``)."""
        nq = len(chunk)
        if self._half is not None and k is not None and not ranging and self._half.proposes(nq):
            yield from self._candidate_tiles(chunk, runs, k)
            return
        # A tile holds up to scratch_bytes of scores; one top-k covers it.
        tile_rows = max(256, min(self._scratch_bytes // (4 * nq), self._block_rows))
        if nq == 1:  # GEMV: one pass over each whole block
            gemm_rows = self._block_rows
        elif nq < MANY_QUERIES:  # OpenBLAS packs the rows: keep that panel near the cache
            gemm_rows = max(256, self._scratch_bytes // (4 * self.dim))
        else:  # compute-bound: one GEMM per tile
            gemm_rows = tile_rows
        gather_bytes = self._scratch_bytes
        if nq < MANY_QUERIES:
            gather_bytes = min(GATHER_BYTES, gather_bytes)
        gathered = self._gather_buffer(runs, gather_bytes)
        gather_rows = 0 if gathered is None else len(gathered)
        scratch = None if self._half is None else self._half.scratch()
        buffer = np.empty((tile_rows, nq), np.float32)
        tile_ids = np.empty(tile_rows, np.int64)
        fill = 0
        for run in runs:
            panel_rows = gemm_rows if run.gather is None else min(gemm_rows, gather_rows)
            g0 = 0
            while g0 < len(run.ids):
                g1 = min(len(run.ids), g0 + panel_rows, g0 + tile_rows - fill)
                rows = _panel(run, g0, g1, gathered)
                out = buffer[fill:fill + g1 - g0]
                if self._half is not None:
                    assert scratch is not None
                    self._half.exact(rows, chunk, out, scratch)
                elif nq == 1:
                    np.matmul(rows, chunk[0], out=out[:, 0])
                else:  # rows x queries: OpenBLAS runs this orientation faster here
                    np.matmul(rows, chunk.T, out=out)
                if self.metric == "l2":  # 2 q.x - |x|^2 ranks like -|q - x|^2
                    assert run.sq_norms is not None
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

    def _candidate_tiles(
        self, chunk: npt.NDArray[np.float32], runs: list[_Rows], k: int
    ) -> Iterator[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]:
        """Each panel's candidates for the exact top-k, as HalfScorer.candidates packs them."""
        assert self._half is not None
        operand = self._half.query_operand(chunk)
        scratch = self._half.scratch()
        # The scratch budget holds a panel's bfloat16 scores, and float16 rows rounded to
        # bfloat16; GEMMs of a few thousand rows run nearly as fast as larger ones, and
        # each panel has a fixed cost, so panels keep at least PANEL_ROWS rows.
        per_row = 2 * len(chunk) + (2 * self.dim if self._storage == np.float16 else 0)
        panel_rows = min(max(PANEL_ROWS, self._scratch_bytes // per_row), self._block_rows)
        gathered = self._gather_buffer(runs, self._scratch_bytes)
        gather_rows = 0 if gathered is None else len(gathered)
        for run in runs:
            assert run.sq_norms is not None
            step = panel_rows if run.gather is None else min(panel_rows, gather_rows)
            for g0 in range(0, len(run.ids), step):
                g1 = min(len(run.ids), g0 + step)
                yield self._half.candidates(
                    _panel(run, g0, g1, gathered), chunk, operand, k, run.ids[g0:g1],
                    run.sq_norms[g0:g1], self.metric == "l2",
                    None if run.keep is None else run.keep[g0:g1], scratch)

    def _gather_buffer(self, runs: list[_Rows], gather_bytes: int) -> np.ndarray | None:
        """One reused buffer for the rows gathered from sparse runs (None: no such run)."""
        if all(run.gather is None for run in runs):
            return None
        gather_rows = max(16, gather_bytes // (self.dim * self._storage.itemsize))
        return np.empty((gather_rows, self.dim), self._storage)


def _panel(run: _Rows, g0: int, g1: int, gathered: np.ndarray | None) -> np.ndarray:
    """Rows g0:g1 of a run: a view of its block, or gathered into the reused buffer."""
    if run.gather is None:
        return run.vectors[g0:g1]
    assert gathered is not None
    return np.take(run.vectors, run.gather[g0:g1], axis=0, out=gathered[: g1 - g0])
