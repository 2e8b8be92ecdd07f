"""BlockedIndex: the index logic both backends share; a backend supplies storage and scoring."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from cpu_fallback.core.contract import (
    BLOCK_BYTES,
    STORAGE_NUMPY,
    FloatArray,
    IdArray,
    VectorIndex,
)
from cpu_fallback.core.rows import (
    BlockRun,
    RowIndex,
    RowMap,
    blocks_in_use,
    plan_runs,
    split_by_block,
)
from cpu_fallback.core.scoring import Scoring, query_sq_norms
from cpu_fallback.core.validation import (
    as_stored,
    check_config,
    check_k,
    check_size,
    check_threshold,
    prepare_batch,
    prepare_queries,
)

# What a search runs under on the host: nothing (a backend with a device replaces it).
_NO_GUARD: AbstractContextManager[None] = nullcontext()


class BlockedIndex(VectorIndex):
    """An exact index whose rows sit densely in blocks of ``block_rows`` rows.

    Written once here: input checks, upsert and remove bookkeeping (the id <-> row map;
    removal moves the last rows into the holes), get/contains/len, memory info, the plan
    of which rows of which block a search may return under an allow-list, query chunks,
    the search and range-search loops, and final results (sorted, ties by id, padded).

    A backend supplies its storage (``_reserve``, ``_write_rows``, ``_blocks``), how a
    block run is scored (``_prepare_run``, ``_key_tiles``: keys where higher is closer),
    its top-k reduction (``_merge_top_k``) and its query chunk size. Arrays live in the
    module ``_xp`` (numpy here); a device backend sets it up in ``_open_device``,
    ``_to_device``/``_to_host`` move arrays, ``_guard`` wraps device work (out of memory).

    Options, the same for every backend: ``block_bytes`` (a block's size in bytes when
    ``block_rows`` is not given), ``block_rows``, ``scratch_bytes`` (scratch for score
    tiles; None: the backend's ``default_scratch_bytes``).
    """

    min_block_rows: ClassVar[int] = 256
    default_scratch_bytes: ClassVar[int]

    def __init__(
        self,
        dim: int,
        metric: str = "cosine",
        dtype: str = "float32",
        *,
        block_bytes: int | None = None,
        block_rows: int | None = None,
        scratch_bytes: int | None = None,
    ) -> None:
        check_config(dim, metric, dtype)
        self.dim = int(dim)
        self.metric = metric
        self.dtype = dtype
        self._storage = STORAGE_NUMPY[dtype]
        self._row_bytes = self.dim * self._storage.itemsize
        block_bytes = check_size("block_bytes", block_bytes, BLOCK_BYTES)
        self._block_rows = check_size(
            "block_rows", block_rows, max(self.min_block_rows, block_bytes // self._row_bytes))
        self._scratch_bytes = check_size("scratch_bytes", scratch_bytes,
                                         self.default_scratch_bytes)
        self._xp: Any = np
        self._blocks: list[Any] = []  # (rows, dim) storage dtype, dense from row 0
        self._block_sq_norms: list[Any] = []  # float32 |x|^2 per row, filled under l2
        self._rows = RowMap()
        self._scoring = Scoring(metric)
        self._open_device()

    # ------------------------------------------------------------------ writes
    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike, *, prepared: bool = False
            ) -> None:
        """Upsert ids int64 (n,) with vectors float (n, dim); the last duplicate wins."""
        if prepared:  # checked once by the caller (see VectorIndex.add)
            id_array = np.asarray(ids, dtype=np.int64)
            stored = as_stored(np.asarray(vectors, dtype=np.float32), self._storage)
        else:
            id_array, stored = prepare_batch(ids, vectors, self.dim, self.metric,
                                             self._storage)
        positions, new_count = self._rows.plan_upsert(id_array)
        with self._guard("adding vectors"):
            # Allocate and write first, so that an out-of-memory error changes nothing.
            self._reserve(new_count)
            self._write_rows(positions, id_array, stored)
        self._rows.commit_upsert(id_array, positions, new_count)

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove ids; unknown ids are ignored. Returns how many were present."""
        removal = self._rows.plan_remove(ids)
        if len(removal.holes):  # keep storage dense: movers fill the holes
            with self._guard("compacting after remove"):
                self._write_rows(removal.holes, self._rows.ids_at(removal.movers),
                                 self._vectors_at(removal.movers))
        self._rows.commit_remove(removal)
        self._drop_blocks(blocks_in_use(removal.new_count, self._block_rows))
        return len(removal.gone)

    # ------------------------------------------------------------------ reads
    def search(
        self,
        queries: npt.ArrayLike,
        k: int,
        threshold: float | None = None,
        allow: npt.ArrayLike | None = None,
    ) -> tuple[FloatArray, IdArray]:
        """Top-k of queries (q, dim) -> scores float32 (q, k), ids int64 (q, k)."""
        query_matrix = prepare_queries(queries, self.dim, self.metric)
        k = check_k(k)
        limit = check_threshold(threshold)
        nq = len(query_matrix)
        scores = np.full((nq, k), self._scoring.missing, np.float32)
        result_ids = np.full((nq, k), -1, np.int64)
        if k == 0 or len(self._rows) == 0:
            return scores, result_ids
        with self._guard("searching"):
            runs = self._runs(allow)
            for q0, q1 in self._query_chunks(nq):
                host_chunk = query_matrix[q0:q1]
                best: tuple[Any, Any] | None = None
                for keys, ids in self._key_tiles(self._upload_queries(host_chunk), runs,
                                                 k=k):
                    best = self._merge_top_k(best, keys, ids, k)
                if best is not None:  # only the k results per query leave the device
                    self._scoring.finish(self._to_host(best[0]), self._to_host(best[1]),
                                         host_chunk, limit, scores[q0:q1], result_ids[q0:q1])
        return scores, result_ids

    def range_search(
        self,
        queries: npt.ArrayLike,
        threshold: float,
        allow: npt.ArrayLike | None = None,
        max_results: int | None = None,
    ) -> tuple[IdArray, FloatArray, IdArray, IdArray]:
        """Every row at least as close as threshold: (lims, scores, ids, totals)."""
        query_matrix = prepare_queries(queries, self.dim, self.metric)
        limit = check_threshold(threshold)
        if limit is None:
            raise ValueError("range_search needs a threshold")
        cap = None if max_results is None else check_k(max_results)
        nq = len(query_matrix)
        hits: list[tuple[IdArray, FloatArray, IdArray]] = []  # (query, score, id)
        xp, scoring = self._xp, self._scoring
        with self._guard("range searching"):
            runs = self._runs(allow)
            for q0, q1 in self._query_chunks(nq, ranging=True):
                host_chunk = query_matrix[q0:q1]
                chunk = self._upload_queries(host_chunk)
                sq_norms = None
                if self.metric == "l2":
                    sq_norms = self._to_device(query_sq_norms(host_chunk))
                for keys, ids in self._key_tiles(chunk, runs, ranging=True):
                    tile = scoring.key_scores(keys, sq_norms, xp)
                    rows, cols = xp.nonzero(scoring.passes(tile, limit) & (keys > -np.inf))
                    if len(rows):
                        hits.append((self._to_host(rows) + q0, self._to_host(tile[rows, cols]),
                                     self._to_host(ids[cols])))
        return scoring.ranges_from_hits(hits, nq, cap)

    def get(self, ids: npt.ArrayLike) -> FloatArray:
        """Stored vectors for ids as float32 (n, dim); KeyError for an unknown id."""
        return self._vectors_at(self._rows.lookup(ids)).astype(np.float32, copy=False)

    def scan(self, rows: int = 16_384) -> Iterator[tuple[IdArray, FloatArray]]:
        """Every stored row once, in storage order, as (ids, float32 vectors) chunks of at
        most ``rows`` rows: views of the blocks where they are float32 on the host, no id
        lookups. The caller keeps writes out until the iteration ends."""
        rows = check_size("rows", rows, rows)
        for b in range(blocks_in_use(len(self._rows), self._block_rows)):
            start = b * self._block_rows
            n = min(self._block_rows, len(self._rows) - start)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                vectors = self._to_host(self._blocks[b][r0:r1])
                yield (self._rows.ids_at(slice(start + r0, start + r1)).copy(),
                       vectors.astype(np.float32, copy=False))

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._rows

    def memory_info(self) -> dict[str, Any]:
        """Rows and bytes held, the block and scratch sizes, the backend and its device."""
        capacity = sum(len(block) for block in self._blocks)
        return {
            "backend": self.backend,
            "vectors": len(self._rows),
            "capacity_rows": capacity,
            "block_rows": self._block_rows,
            "vector_bytes": len(self._rows) * self._row_bytes,
            "allocated_bytes": capacity * (self._row_bytes + 8 + 4 * self._keeps_sq_norms()),
            "scratch_budget_bytes": self._scratch_bytes,
            **self._device_info(),
        }

    # ------------------------------------------------------------------ shared internals
    def _runs(self, allow: npt.ArrayLike | None) -> list[Any]:
        """The backend's runs for every block holding rows a search may return."""
        allowed = self._rows.allowed_positions(allow)
        return [self._prepare_run(plan)
                for plan in plan_runs(allowed, len(self._rows), self._block_rows)]

    def _query_chunks(self, nq: int, ranging: bool = False) -> Iterator[tuple[int, int]]:
        step = max(1, min(nq, self._queries_per_chunk(nq, ranging)))
        for q0 in range(0, nq, step):
            yield q0, min(nq, q0 + step)

    def _vectors_at(self, positions: IdArray) -> np.ndarray:
        """Stored rows at positions, on the host in the storage dtype."""
        out = np.empty((len(positions), self.dim), self._storage)
        for b, offsets, where in split_by_block(positions, self._block_rows):
            out[where] = self._to_host(self._blocks[b][self._device_index(offsets)])
        return out

    def _drop_blocks(self, keep: int) -> None:
        """Free every block past the first ``keep``."""
        del self._blocks[keep:], self._block_sq_norms[keep:]

    # ------------------------------------------------------------------ host defaults
    def _keeps_sq_norms(self) -> bool:
        """Whether ``_block_sq_norms`` hold each row's |x|^2 (l2 ranks by them)."""
        return self.metric == "l2"

    def _open_device(self) -> None:
        """Set up the device (``_xp`` and the like) once the options are checked."""

    def _guard(self, doing: str) -> AbstractContextManager[None]:
        """Context for device work (``doing`` names it in errors); nothing on the host."""
        return _NO_GUARD

    def _device_info(self) -> dict[str, Any]:
        return {"device": "host"}

    def _to_device(self, array: np.ndarray) -> Any:
        return array

    def _to_host(self, array: Any) -> np.ndarray:
        return array

    def _device_index(self, index: RowIndex) -> Any:
        return index

    def _upload_queries(self, host_chunk: FloatArray) -> Any:
        """A chunk of checked float32 queries as the backend's key tiles take it."""
        return host_chunk

    # ------------------------------------------------------------------ backend
    @abstractmethod
    def _reserve(self, rows: int) -> None:
        """Room for ``rows`` rows in ``_blocks`` (and ``_block_sq_norms``)."""

    @abstractmethod
    def _write_rows(self, positions: IdArray, ids: IdArray, rows: np.ndarray) -> None:
        """Store host rows (storage dtype) with their ids at row positions."""

    @abstractmethod
    def _prepare_run(self, plan: BlockRun) -> Any:
        """What ``_key_tiles`` needs to score one block's candidate rows."""

    @abstractmethod
    def _key_tiles(self, chunk: Any, runs: list[Any], ranging: bool = False,
                   k: int | None = None) -> Iterator[tuple[Any, Any]]:
        """(keys (q, n), ids (n,)) per tile over the runs: higher is closer, -inf masked.

        keys and ids may be reused buffers, valid only until the next tile. ``ranging``: a
        range search, which filters whole tiles (more scratch per score than a top-k).
        ``k``: a top-k search's k; a backend may then yield, per tile, only the columns
        that can be in some query's top k, as keys (q, w) with ids (q, w)."""

    @abstractmethod
    def _merge_top_k(self, best: tuple[Any, Any] | None, keys: Any, ids: Any,
                     k: int) -> tuple[Any, Any]:
        """The exact top-k (key desc, id asc; unordered) of best and one tile."""

    @abstractmethod
    def _queries_per_chunk(self, nq: int, ranging: bool = False) -> int:
        """How many of nq queries to score together (``ranging``: for a range search)."""
