"""Input checks every index shares: config, options, ids, vectors, queries, k, threshold."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import numpy.typing as npt

from cpu_fallback.core.contract import DTYPES, METRICS

Ids = npt.NDArray[np.int64]
Matrix = npt.NDArray[np.float32]


def check_config(dim: int, metric: str, dtype: str) -> None:
    """ValueError unless dim is a positive integer, metric in METRICS, dtype in DTYPES."""
    if not isinstance(dim, int | np.integer) or isinstance(dim, bool) or dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def check_size(name: str, value: int | None, default: int) -> int:
    """An engine option in rows or bytes: a positive integer, or None for ``default``."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer (or None), got {value!r}")
    return int(value)


def as_ids(ids: npt.ArrayLike, *, allow_empty: bool = False) -> Ids:
    """ids -> int64 (n,); non-negative (-1 is the padding id)."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D array of int64, got shape {arr.shape}")
    if arr.size == 0:
        if allow_empty:
            return np.empty(0, np.int64)
        raise ValueError("ids is empty: expected at least one id")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers (int64), got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise ValueError("ids must fit in int64")
    out = arr.astype(np.int64, copy=False)
    if out.min() < 0:
        raise ValueError(f"ids must be non-negative, got {int(out.min())}")
    return out


def as_matrix(values: npt.ArrayLike, dim: int, what: str) -> Matrix:
    """values -> float32 (n, dim), finite, n >= 1."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        raise TypeError(f"{what} must be a float array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{what} is empty: expected at least one row of {dim} values")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{what} row {row} holds NaN or inf (or overflows float32)")
    return out


def normalise_rows(matrix: Matrix, what: str) -> Matrix:
    """Unit-length rows for cosine; a zero row is an error, never a NaN."""
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64))
    zero = norms == 0
    if zero.any():
        raise ValueError(f"{what} row {int(np.flatnonzero(zero)[0])} is a zero vector: "
                         "cosine needs a non-zero length")
    return (matrix / norms[:, None]).astype(np.float32)


def check_k(k: int) -> int:
    """k as an int; ValueError unless it is a non-negative integer."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    return int(k)


def check_threshold(threshold: float | None) -> float | None:
    """threshold as a float (None stays None); ValueError unless finite."""
    if threshold is None:
        return None
    value = float(threshold)
    if not np.isfinite(value):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return value


def prepare_batch(
    ids: npt.ArrayLike, vectors: npt.ArrayLike, dim: int, metric: str, storage: np.dtype
) -> tuple[Ids, np.ndarray]:
    """Checked ids and vectors as stored (normalised under cosine, cast), last duplicate wins."""
    id_array = as_ids(ids)
    matrix = as_matrix(vectors, dim, "vectors")
    if len(id_array) != len(matrix):
        raise ValueError(f"got {len(id_array)} ids for {len(matrix)} vectors")
    if metric == "cosine":
        matrix = normalise_rows(matrix, "vectors")
    matrix = as_stored(matrix, storage)
    last = last_occurrences(id_array)
    if last is None:  # no duplicates: no copy
        return id_array, matrix
    return id_array[last], matrix[last]


def as_stored(matrix: Matrix, storage: np.dtype) -> np.ndarray:
    """Rows cast to the storage dtype; ValueError when a value overflows it (float16, and
    bfloat16 just below float32's largest)."""
    if storage == matrix.dtype:
        return matrix
    with np.errstate(over="ignore"):  # overflow is reported just below
        stored = matrix.astype(storage)
    if not np.isfinite(stored).all():
        raise ValueError(f"vectors overflow {storage.name} (largest magnitude "
                         f"{float(ml_dtypes.finfo(storage).max):g})")
    return stored


def last_occurrences(ids: Ids) -> npt.NDArray[np.intp] | None:
    """Positions of each id's last occurrence, in order (the last duplicate wins); None when
    every id is distinct."""
    unique, last_reversed = np.unique(ids[::-1], return_index=True)
    if len(unique) == len(ids):
        return None
    return np.sort(len(ids) - 1 - last_reversed)


def prepare_queries(queries: npt.ArrayLike, dim: int, metric: str) -> Matrix:
    """Checked queries as float32 (q, dim), unit length under cosine."""
    matrix = as_matrix(queries, dim, "queries")
    return normalise_rows(matrix, "queries") if metric == "cosine" else matrix
