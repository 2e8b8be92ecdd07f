"""Input checks for CpuIndex: shapes, dtypes and values, all before anything changes."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

METRICS = ("dot", "cosine", "l2")
STORAGE_DTYPES = ("float32", "float16")


def check_config(dim: int, metric: str, dtype: str) -> None:
    if not isinstance(dim, int | np.integer) or isinstance(dim, bool) or dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")


def as_ids(ids: npt.ArrayLike, *, allow_empty: bool = False) -> npt.NDArray[np.int64]:
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


def as_matrix(values: npt.ArrayLike, dim: int, what: str) -> npt.NDArray[np.float32]:
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


def normalise_rows(matrix: npt.NDArray[np.float32], what: str) -> npt.NDArray[np.float32]:
    """Unit-length rows for cosine; a zero row is an error, never a NaN."""
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64))
    zero = norms == 0
    if zero.any():
        raise ValueError(f"{what} row {int(np.flatnonzero(zero)[0])} is a zero vector: "
                         "cosine needs a non-zero length")
    return (matrix / norms[:, None]).astype(np.float32)


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    return int(k)


def check_threshold(threshold: float | None) -> float | None:
    if threshold is None:
        return None
    value = float(threshold)
    if not np.isfinite(value):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return value
