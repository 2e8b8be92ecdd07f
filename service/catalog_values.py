"""What the catalog hands out (collection info, hits, query results) and its input checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.errors import InvalidInput


@dataclass
class CollectionInfo:
    """A collection's schema and size; ``columns`` (metadata) in declared order."""

    name: str
    dim: int
    metric: str
    dtype: str
    columns: dict[str, str]
    count: int
    thumbnails: bool = False
    vector_column: str = "feature"
    column_order: list[str] = field(default_factory=list)  # id, vector, metadata, as declared
    vector_type: str = "VECTOR"
    auto_increment: bool = False
    shards: int | None = None

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

    @classmethod
    def affected(cls, n: int = 0, last_insert_id: int | None = None) -> QueryResult:
        """A write's answer: rows affected, and the first id it assigned when it did."""
        if last_insert_id is None:
            return cls(["rows_affected"], ["BIGINT"], [[int(n)]])
        return cls(["rows_affected", "last_insert_id"], ["BIGINT", "BIGINT"],
                   [[int(n), int(last_insert_id)]])

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"columns": self.columns, "types": self.types, "rows": self.rows}
        if self.explain is not None:
            body["explain"] = self.explain
        return body


ID_MAX = 2**63 - 1  # ids are signed 64-bit integers in storage: 0..ID_MAX
_ID_RANGE = f"0..{ID_MAX} (2^63-1)"


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool | np.bool_)


def as_id_array(ids: Any) -> npt.NDArray[np.int64]:
    """ids as a 1-d int64 array of integers in 0..2^63-1, or InvalidInput.

    Booleans are never ids (not True, not a bool array, not a bool inside a list), and
    integral floats are accepted only inside the range.
    """
    if _is_bool(ids) or (isinstance(ids, list | tuple) and any(_is_bool(i) for i in ids)):
        raise InvalidInput("ids must be integers, not booleans")
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"ids must be a list of integers: {exc}") from exc
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InvalidInput(f"ids must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    kind = arr.dtype.kind
    if kind == "b":
        raise InvalidInput("ids must be integers, not booleans")
    if kind == "O":  # Python ints beyond 64 bits, or values that are not numbers
        if not all(isinstance(i, int | np.integer) and not _is_bool(i) for i in arr):
            raise InvalidInput("ids must be integers")
        low, high = min(int(i) for i in arr), max(int(i) for i in arr)
    elif kind == "f":
        if not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise InvalidInput(f"ids must be integers, got dtype {arr.dtype}")
        if float(arr.max()) >= 2.0**63:  # 2^63-1 is no float64: 2^63 is the first outside
            raise InvalidInput(f"ids must be in {_ID_RANGE}, got {float(arr.max()):.0f}")
        low, high = int(arr.min()), int(arr.max())
    elif kind in "iu":
        low, high = int(arr.min()), int(arr.max())
    else:
        raise InvalidInput(f"ids must be integers, got dtype {arr.dtype}")
    if low < 0:
        raise InvalidInput(f"ids must be non-negative: in {_ID_RANGE}, got {low}")
    if high > ID_MAX:
        raise InvalidInput(f"ids must be in {_ID_RANGE}, got {high}")
    if kind == "O":
        return np.array([int(i) for i in arr], dtype=np.int64)
    return arr.astype(np.int64)


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
