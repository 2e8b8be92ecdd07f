"""What a collection checks before it stores anything: a new collection's record, and a
batch of rows (ids, vectors as stored, metadata, thumbnails)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_fallback.core import as_stored, last_occurrences, normalise_rows
from service.catalog_values import as_id_array, as_vectors
from service.duck_values import canonical_type, check_name
from service.errors import InvalidInput
from service.index_protocol import DTYPES, METRICS
from service.storage import RESERVED_COLUMNS, CollectionRecord

MAX_DIM = 65536
MAX_SHARDS = 256
# The element type a VECTOR column declares for each storage dtype: VECTOR(d, F16) etc.
VECTOR_ELEMENTS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# A declared vector type, kept as spelled for DESCRIBE: VECTOR(4, F16), binary(4096), BLOB.
VECTOR_TYPE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_(), ]{0,39}$")

Rows = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], Sequence[dict[str, Any]] | None,
             Sequence[bytes | None] | None]


def new_record(name: str, dim: int, metric: str, dtype: str, columns: dict[str, str] | None,
               thumbnails: bool, vector_column: str, *, column_order: Sequence[str] | None = None,
               vector_type: str | None = None, auto_increment: bool = False,
               shards: int | None = None) -> CollectionRecord:
    """The record of a new collection, or InvalidInput naming what is wrong. The vector
    column's type defaults to `VECTOR(dim)` (`VECTOR(dim, F16)` for float16 storage,
    `VECTOR(dim, BF16)` for bfloat16)."""
    check_name("collection", name)
    if name.lower().startswith("_dotsearch") or name.lower().startswith("duckdb"):
        raise InvalidInput(f"collection name {name!r} is reserved")
    check_name("column", vector_column)
    if vector_column.lower() in RESERVED_COLUMNS:
        raise InvalidInput(f"column name {vector_column!r} is reserved")
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or not 0 < dim <= MAX_DIM:
        raise InvalidInput(f"dim must be an integer in 1..{MAX_DIM}, got {dim!r}")
    if metric not in METRICS:
        raise InvalidInput(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if dtype not in DTYPES:
        raise InvalidInput(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int)
                               or not 1 <= shards <= MAX_SHARDS):
        raise InvalidInput(f"shards must be an integer in 1..{MAX_SHARDS}, got {shards!r}")
    if vector_type is None:
        element = VECTOR_ELEMENTS[dtype]
        vector_type = f"VECTOR({int(dim)}{'' if element == 'F32' else ', ' + element})"
    if not isinstance(vector_type, str) or not VECTOR_TYPE_RE.fullmatch(vector_type):
        raise InvalidInput(f"vector type must be at most 40 characters of letters, digits, "
                           f"'_(), ' starting with a letter, got {vector_type!r}")
    canon: dict[str, str] = {}
    for col, sql_type in (columns or {}).items():
        check_name("column", col)
        lowered = {c.lower() for c in canon}
        if col.lower() in RESERVED_COLUMNS or col.lower() == vector_column.lower():
            raise InvalidInput(f"column name {col!r} is reserved")
        if col.lower() in lowered:
            raise InvalidInput(f"column {col!r} given twice")
        canon[col] = canonical_type(col, sql_type)
    order = ["id", vector_column, *canon]
    if column_order is not None:
        given = list(column_order) if isinstance(column_order, list | tuple) else None
        if (given is None or not all(isinstance(c, str) for c in given)
                or len({c.lower() for c in given}) != len(given) or set(given) != set(order)):
            raise InvalidInput(f"column order must name {', '.join(order)} once each, got "
                               f"{column_order!r}")
        order = given
    return CollectionRecord(name, int(dim), metric, dtype, canon, bool(thumbnails),
                            vector_column, order, vector_type, bool(auto_increment), shards)


def prepare_rows(rec: CollectionRecord, ids: Any, vectors: Any,
                 metadata: Sequence[dict[str, Any]] | None,
                 thumbnails: Sequence[bytes | None] | None) -> Rows:
    """A batch as it will be stored, by the engine's own rules (unit rows under cosine, the
    last duplicate wins), or InvalidInput; nothing is stored yet."""
    id_arr = as_id_array(ids)
    if id_arr.size == 0:
        raise InvalidInput("an upsert needs at least one vector")
    vec_arr = as_vectors(vectors, rec.dim, len(id_arr))
    if metadata is not None:
        if not isinstance(metadata, Sequence) or len(metadata) != len(id_arr):
            raise InvalidInput(f"metadata must be a list of {len(id_arr)} objects")
        for row in metadata:
            if not isinstance(row, dict):
                raise InvalidInput("each metadata entry must be an object")
            unknown = set(row) - set(rec.columns)
            if unknown:
                raise InvalidInput(f"unknown metadata columns {sorted(unknown)}; collection "
                                   f"{rec.name!r} has {sorted(rec.columns)}")
    if thumbnails is not None:
        if not rec.thumbnails:
            raise InvalidInput(f"collection {rec.name!r} does not keep thumbnails")
        if len(thumbnails) != len(id_arr):
            raise InvalidInput(f"thumbnails must be a list of {len(id_arr)} entries")
    if rec.metric == "cosine":
        try:
            vec_arr = normalise_rows(vec_arr, "vectors")
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
    if rec.dtype != "float32":  # refused now, not by the index after the commit
        try:
            as_stored(vec_arr, np.dtype(rec.dtype))
        except ValueError as exc:
            raise InvalidInput(f"{exc}; collection {rec.name!r} stores {rec.dtype}") from exc
    keep = last_occurrences(id_arr)
    if keep is not None:
        id_arr, vec_arr = id_arr[keep], vec_arr[keep]
        if metadata is not None:
            metadata = [metadata[i] for i in keep]
        if thumbnails is not None:
            thumbnails = [thumbnails[i] for i in keep]
    return id_arr, vec_arr, metadata, thumbnails
