"""The vector index interface that gpu.GpuIndex and cpu_fallback.CpuIndex both satisfy."""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Metric = Literal["dot", "cosine", "l2"]
StorageDtype = Literal["float32", "float16"]

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]


@runtime_checkable
class VectorIndex(Protocol):
    """Exact (brute-force) vector index.

    Scores: ``dot`` and ``cosine`` are similarities (higher is closer); ``l2`` is the
    Euclidean distance (lower is closer). Results are best first, ties broken by id
    ascending; missing slots hold id -1 and score -inf (+inf for ``l2``).

    Bad input raises ``ValueError`` (wrong shape, NaN/inf, zero vector under cosine,
    negative id, empty batch) or ``TypeError`` (non-numeric dtype), and leaves the index
    unchanged. ``MemoryError`` means the device could not hold the data or the scratch.
    """

    dim: int
    metric: str  # a Metric
    dtype: str  # a StorageDtype

    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Upsert: ids int64 (n,), vectors float (n, dim); the last duplicate id wins."""
        ...

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove ids (unknown ids are ignored); returns how many were present."""
        ...

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
        ...

    def range_search(
        self,
        queries: npt.ArrayLike,
        threshold: float,
        allow: npt.ArrayLike | None = None,
        max_results: int | None = None,
    ) -> tuple[npt.NDArray[np.int64], FloatArray, IdArray, npt.NDArray[np.int64]]:
        """Every row at least as close as ``threshold``, per query, FAISS style.

        Returns ``(lims, scores, ids, totals)``: query i's hits are
        ``scores[lims[i]:lims[i+1]]`` and ``ids[...]``, best first, at most
        ``max_results`` of them; ``totals[i]`` counts all matches, even past the cap.
        """
        ...

    def get(self, ids: npt.ArrayLike) -> FloatArray:
        """Stored vectors (as float32, normalised under cosine) for ids; KeyError if absent."""
        ...

    def __len__(self) -> int: ...

    def __contains__(self, id_: object) -> bool: ...

    def memory_info(self) -> dict[str, Any]:
        """Sizes in bytes and rows, and the device it lives on."""
        ...
