"""The index contract: metric and dtype names, engine sizes, and the VectorIndex base class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, Literal, get_args

import ml_dtypes
import numpy as np
import numpy.typing as npt

Metric = Literal["dot", "cosine", "l2"]
StorageDtype = Literal["float32", "float16", "bfloat16"]
BackendName = Literal["cpu", "gpu"]

METRICS: tuple[str, ...] = get_args(Metric)
DTYPES: tuple[str, ...] = get_args(StorageDtype)
BACKEND_NAMES: tuple[str, ...] = get_args(BackendName)

# numpy has no bfloat16 of its own: ml_dtypes' is the one JAX and TensorFlow share (it
# rounds to nearest even, as torch and cuBLAS do).
STORAGE_NUMPY: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]

# Storage grows by whole blocks of about this many bytes: growth never copies the index.
BLOCK_BYTES = 256 << 20
# Scratch (score tiles) per search, by backend: a CPU tile stays near the cache; the GPU
# scores as many blocks side by side as this holds.
CPU_SCRATCH_BYTES = 16 << 20
GPU_SCRATCH_BYTES = 1 << 30
# Under an allow-list, a block whose allowed fraction is below this has its allowed rows
# gathered and scored alone; at or above it, the whole block is scored and the rest masked.
GATHER_FRACTION = 0.5
# The engine options every backend's constructor takes as keywords (None: the default):
# block_bytes (a block's size in bytes), block_rows (overrides block_bytes), scratch_bytes.
ENGINE_OPTIONS = ("block_bytes", "block_rows", "scratch_bytes")


class IndexUnavailable(RuntimeError):
    """The index cannot answer now (a shard is down, restarting, rebuilding or not
    answering); nothing was changed by the call that raised it, unless stated.

    A caller answers "not ready" (HTTP 503) and tries again later: never a partial answer.
    """


class VectorIndex(ABC):
    """Exact (brute-force) vector index: the interface every backend implements.

    Scores: ``dot`` and ``cosine`` are similarities (higher is closer); ``l2`` is the
    Euclidean distance (lower is closer). Results are best first, ties broken by id
    ascending; missing slots hold id -1 and score -inf (+inf for ``l2``).

    Bad input raises ``ValueError`` (wrong shape, NaN/inf, zero vector under cosine,
    negative id, empty batch) or ``TypeError`` (non-numeric dtype), and leaves the index
    unchanged. ``MemoryError`` means the device could not hold the data or the scratch.
    A distributed index (``service.cluster.ShardedIndex``) may also raise
    ``IndexUnavailable`` from any method when a shard cannot answer.
    Not thread-safe: callers serialise writes against reads.

    The shard methods at the end (``check_ready``, ``shard_states``, ``refresh``,
    ``reload_shard``, ``close``) have one-process defaults, so callers need not ask which
    kind of index they hold.
    """

    backend: ClassVar[str]  # "cpu", "gpu" or "ray": what callers report, never guessed
    dim: int
    metric: str  # a Metric
    dtype: str  # a StorageDtype

    @abstractmethod
    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike, *, prepared: bool = False
            ) -> None:
        """Upsert: ids int64 (n,), vectors float (n, dim); the last duplicate id wins.

        ``prepared``: the caller has already applied ``prepare_batch``'s rules (ids distinct
        and non-negative, rows finite float32 of this dim, unit length under cosine, no
        storage overflow), so they are not run again; only the storage cast remains.
        """

    @abstractmethod
    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove ids (unknown ids are ignored); returns how many were present."""

    @abstractmethod
    def search(
        self,
        queries: npt.ArrayLike,
        k: int,
        threshold: float | None = None,
        allow: npt.ArrayLike | None = None,
    ) -> tuple[FloatArray, IdArray]:
        """Top-k: queries (q, dim) -> scores float32 (q, k), ids int64 (q, k).

        ``threshold`` keeps only rows at least as close (score >= t, or distance <= t
        for l2); ``allow`` restricts results to those ids (exact pre-filter).
        """

    @abstractmethod
    def range_search(
        self,
        queries: npt.ArrayLike,
        threshold: float,
        allow: npt.ArrayLike | None = None,
        max_results: int | None = None,
    ) -> tuple[IdArray, FloatArray, IdArray, IdArray]:
        """Every row at least as close as ``threshold``, per query, FAISS style.

        Returns ``(lims, scores, ids, totals)``: query i's hits are
        ``scores[lims[i]:lims[i+1]]`` and ``ids[...]``, best first, at most
        ``max_results`` of them; ``totals[i]`` counts all matches, even past the cap.
        """

    @abstractmethod
    def get(self, ids: npt.ArrayLike) -> FloatArray:
        """Stored vectors (as float32, normalised under cosine) for ids; KeyError if absent."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, id_: object) -> bool: ...

    @abstractmethod
    def memory_info(self) -> dict[str, Any]:
        """Sizes in bytes and rows, the backend and the device it lives on."""

    def scan(self, rows: int = 16_384) -> Iterator[tuple[IdArray, FloatArray]]:
        """Every stored row once as (ids, float32 vectors) chunks of at most ``rows`` rows.

        An index whose rows live elsewhere (the sharded one) cannot: callers then ``get``
        the rows by id."""
        raise NotImplementedError(f"a {self.backend} index does not scan its rows here")

    def describe_kernel(self, nq: int, ranging: bool = False) -> str:
        """How a search of nq queries is scored (for EXPLAIN)."""
        return f"exact scoring of {getattr(self, 'dtype', 'float32')} rows"

    # ------------------------------------------------------------------ shards
    # One process holds every row: always ready, nothing to watch or reload.
    def check_ready(self) -> None:
        """IndexUnavailable naming the first shard that cannot answer; a no-op here."""
        return None

    def shard_states(self) -> list[dict[str, Any]]:
        """Each shard's number, state, node, device, rows, bytes, latest latency; none here."""
        return []

    def refresh(self, timeout_s: float | None = None) -> list[int]:
        """Poll the shards; the numbers of those that must be reloaded. None here."""
        return []

    def reload_shard(self, shard: int,
                     chunks: Iterable[tuple[npt.ArrayLike, npt.ArrayLike]]) -> int:
        """Rebuild one shard from (ids, vectors) chunks of every row; rows loaded."""
        raise ValueError(f"a {self.backend} index has no shards to reload")

    def close(self) -> None:
        """Let go of what the index holds outside this process; a no-op here."""
        return None

    def holds_any(self, ids: npt.ArrayLike) -> bool:
        """Whether any of ``ids`` is stored (one question per shard on a sharded index)."""
        return any(int(i) in self for i in np.asarray(ids).reshape(-1))

    def shards_touched(self, allow: npt.ArrayLike | None = None) -> tuple[int, int] | None:
        """(shards a search under ``allow`` asks, shards in all); None for one process."""
        return None
