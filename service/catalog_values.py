"""What the catalog hands out (collection info, hits, query results) and its input checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.errors import InvalidInput


@dataclass
class CollectionInfo:
    """A collection's schema and size."""

    name: str
    dim: int
    metric: str
    dtype: str
    columns: dict[str, str]
    count: int
    thumbnails: bool = False
    vector_column: str = "feature"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Hit:
    """One search result: id, score (similarity, or distance for l2), metadata."""

    id: int
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QueryResult:
    """A SQL result: column names, DuckDB type names, JSON-friendly rows; EXPLAIN text."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    explain: str | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"columns": self.columns, "types": self.types, "rows": self.rows}
        if self.explain is not None:
            body["explain"] = self.explain
        return body


def as_id_array(ids: Any) -> npt.NDArray[np.int64]:
    """ids as a 1-d int64 array of non-negative integers, or InvalidInput."""
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"ids must be a list of integers: {exc}") from exc
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InvalidInput(f"ids must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise InvalidInput(f"ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= 2**63:
        raise InvalidInput("ids must fit in a signed 64-bit integer")
    out = arr.astype(np.int64)
    if out.size and int(out.min()) < 0:
        raise InvalidInput(f"ids must be non-negative, got {int(out.min())}")
    return out


def as_vectors(vectors: Any, dim: int, expected_rows: int | None = None) -> npt.NDArray[np.float32]:
    """vectors as a C-contiguous float32 (n, dim) array of finite values, or InvalidInput."""
    try:
        arr = np.asarray(vectors)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"vectors must be a list of lists of numbers: {exc}") from exc
    if arr.dtype.kind not in "fiu":
        raise InvalidInput(f"vectors must be numbers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidInput(f"vectors must have shape (n, {dim}), got {arr.shape}")
    if expected_rows is not None and arr.shape[0] != expected_rows:
        raise InvalidInput(f"{arr.shape[0]} vectors for {expected_rows} ids")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise InvalidInput("vectors contain NaN or infinity (or values beyond float32 range)")
    return out
