"""DuckDB scalar functions for vector math over packed float32 BLOBs (the general slow path)."""

from __future__ import annotations

import json
import math
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt

# SQL function name -> the DuckDB UDF that computes it row by row.
UDF_NAMES = {
    "dot": "ds_dot_product",
    "l2": "ds_euclidean_distance",
    "cos_sim": "ds_cosine_similarity",
    "cos_dist": "ds_cosine_distance",
    "unpack": "ds_json_array_unpack",
    "pack": "ds_json_array_pack",
}


def unpack(blob: bytes | None) -> npt.NDArray[np.float32] | None:
    if blob is None:
        return None
    if len(blob) % 4:
        raise ValueError(f"a vector BLOB must hold whole float32 values, got {len(blob)} bytes")
    return np.frombuffer(blob, dtype="<f4")


def pack_json(text: str) -> bytes:
    """'[1, 2.5, ...]' -> packed little-endian float32; ValueError when not a flat numeric list."""
    try:
        values = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a JSON array of numbers: {exc}") from exc
    return pack_values(values)


def pack_values(values: Any) -> bytes:
    if not isinstance(values, list) or not values:
        raise ValueError("a vector must be a non-empty JSON array of numbers")
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError("a vector must be a flat array of numbers") from exc
    if arr.ndim != 1 or arr.dtype.kind not in "fiu":
        raise ValueError("a vector must contain only numbers")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or np.any(np.abs(arr) > np.finfo(np.float32).max):
        raise ValueError("a vector must not contain NaN or infinity")
    return arr.astype("<f4").tobytes()


def _pair(a: bytes | None, b: bytes | None) -> tuple[Any, Any] | None:
    va, vb = unpack(a), unpack(b)
    if va is None or vb is None:
        return None
    if va.shape != vb.shape:
        raise ValueError(f"vector lengths differ: {va.size} and {vb.size}")
    return va.astype(np.float64), vb.astype(np.float64)


def dot(a: bytes | None, b: bytes | None) -> float | None:
    pair = _pair(a, b)
    return None if pair is None else float(np.dot(*pair))


def euclidean(a: bytes | None, b: bytes | None) -> float | None:
    pair = _pair(a, b)
    return None if pair is None else float(np.linalg.norm(pair[0] - pair[1]))


def cosine_similarity(a: bytes | None, b: bytes | None) -> float | None:
    pair = _pair(a, b)
    if pair is None:
        return None
    denom = float(np.linalg.norm(pair[0]) * np.linalg.norm(pair[1]))
    return None if denom == 0 or not math.isfinite(denom) else float(np.dot(*pair)) / denom


def cosine_distance(a: bytes | None, b: bytes | None) -> float | None:
    sim = cosine_similarity(a, b)
    return None if sim is None else 1.0 - sim


def unpack_json(blob: bytes | None) -> str | None:
    return None if blob is None else json.dumps(vector_values(blob))


def vector_values(blob: bytes) -> list[float]:
    """A packed float32 vector as numbers printed as short as float32 round-trips allow
    (0.1, not 0.10000000149011612): numpy's shortest float32 text, read as float64."""
    values = unpack(blob)
    assert values is not None
    return [float(text) for text in values.astype(str)]


def pack_text(text: str | None) -> bytes | None:
    return None if text is None else pack_json(text)


def register_functions(con: duckdb.DuckDBPyConnection) -> None:
    """Register the vector UDFs on a connection (visible to its cursors too)."""
    specs: list[tuple[str, Any, list[str], str]] = [
        (UDF_NAMES["dot"], dot, ["BLOB", "BLOB"], "DOUBLE"),
        (UDF_NAMES["l2"], euclidean, ["BLOB", "BLOB"], "DOUBLE"),
        (UDF_NAMES["cos_sim"], cosine_similarity, ["BLOB", "BLOB"], "DOUBLE"),
        (UDF_NAMES["cos_dist"], cosine_distance, ["BLOB", "BLOB"], "DOUBLE"),
        (UDF_NAMES["unpack"], unpack_json, ["BLOB"], "JSON"),
        (UDF_NAMES["pack"], pack_text, ["VARCHAR"], "BLOB"),
    ]
    create: Any = con.create_function
    for name, fn, args, ret in specs:
        create(name, fn, args, ret, null_handling="special")
