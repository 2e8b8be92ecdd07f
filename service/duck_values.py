"""Values between Python and DuckDB: names and quoting, metadata types, JSON, blobs, errors."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt

from service.errors import (
    Conflict,
    DotsearchError,
    InvalidInput,
    QueryError,
    StorageError,
)

THUMBNAIL_COLUMN = "_thumbnail"
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")

# Accepted metadata column types -> the canonical DuckDB type stored.
TYPE_ALIASES: dict[str, str] = {
    "BIGINT": "BIGINT",
    "INT": "BIGINT",
    "INTEGER": "BIGINT",
    "INT64": "BIGINT",
    "DOUBLE": "DOUBLE",
    "FLOAT": "DOUBLE",
    "REAL": "DOUBLE",
    "VARCHAR": "VARCHAR",
    "TEXT": "VARCHAR",
    "STRING": "VARCHAR",
    "BOOLEAN": "BOOLEAN",
    "BOOL": "BOOLEAN",
    "TIMESTAMP": "TIMESTAMP",
    "DATETIME": "TIMESTAMP",
    "JSON": "JSON",
}


def check_name(kind: str, name: object) -> str:
    """A table or column name: letters, digits, underscore, starting with a letter."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(
            f"{kind} name must match [A-Za-z][A-Za-z0-9_]{{0,62}}, got {name!r}"
        )
    return name


def canonical_type(column: str, sql_type: object) -> str:
    if not isinstance(sql_type, str) or sql_type.strip().upper() not in TYPE_ALIASES:
        raise InvalidInput(
            f"column {column!r}: type must be one of BIGINT, DOUBLE, VARCHAR/TEXT, BOOLEAN, "
            f"TIMESTAMP, JSON; got {sql_type!r}"
        )
    return TYPE_ALIASES[sql_type.strip().upper()]


def quote(name: str) -> str:
    """Quote an identifier that has already passed check_name (no quotes inside)."""
    return '"' + name.replace('"', '""') + '"'


def metadata_text(column: str, sql_type: str, value: Any) -> str | None:
    """One metadata value as the text DuckDB casts to the column type; InvalidInput if wrong."""
    if value is None:
        return None
    text = _metadata_text(sql_type, value)
    if text is None:
        raise InvalidInput(f"metadata {column!r} ({sql_type}): unacceptable value {value!r}")
    return text


def _metadata_text(sql_type: str, value: Any) -> str | None:
    """The text for a non-null value, or None when it does not fit the column type."""
    if sql_type == "BIGINT":
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            return None
        if not -(2**63) <= int(value) < 2**63:
            return None
        return str(int(value))
    if sql_type == "DOUBLE":
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            return None
        if not math.isfinite(float(value)):
            return None
        return repr(float(value))
    if sql_type == "VARCHAR":
        if not isinstance(value, str):
            return None
        return value
    if sql_type == "BOOLEAN":
        if not isinstance(value, bool | np.bool_):
            return None
        return "true" if value else "false"
    if sql_type == "TIMESTAMP":
        if isinstance(value, datetime | date):
            return value.isoformat()
        if isinstance(value, str):
            return value
        return None
    if sql_type == "JSON":
        try:
            return json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            return None
    return None


def map_duckdb_error(exc: Exception, what: str) -> DotsearchError:
    """Translate a DuckDB exception into the service's hierarchy (message without SQL echo)."""
    message = str(exc).split("\n\nLINE", 1)[0].split("\nLINE", 1)[0].strip()
    if isinstance(exc, duckdb.ConstraintException):
        return Conflict(f"{what}: {message}")
    if isinstance(exc, duckdb.ConversionException | duckdb.InvalidInputException):
        return InvalidInput(f"{what}: {message}")
    io_words = ("No space left", "Could not write", "File too large", "Permission denied",
                "Disk quota")
    if isinstance(
        exc, duckdb.IOException | duckdb.FatalException | duckdb.InternalException
    ) or any(word in message for word in io_words):
        return StorageError(f"{what} failed in storage: {message}")
    if isinstance(exc, duckdb.OutOfMemoryException):
        return StorageError(f"{what}: DuckDB ran out of its memory budget: {message}")
    return QueryError(f"{what}: {message}")


def first_row(cur: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
    """The first row of a small result, consuming it all (DuckDB 2 wants results finished)."""
    rows = cur.fetchall()
    return rows[0] if rows else None


def blob_column(vectors: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
    """Packed little-endian float32 rows as an object array of bytes (DuckDB BLOB)."""
    packed = np.ascontiguousarray(vectors, dtype="<f4")
    out = np.empty(len(packed), dtype=object)
    for i in range(len(packed)):
        out[i] = packed[i].tobytes()
    return out


def object_column(values: Sequence[Any]) -> npt.NDArray[Any]:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def decode_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return json_value(value)


def json_value(value: Any) -> Any:
    """A DuckDB value made JSON-friendly: timestamps as ISO text, bytes as 0x-hex."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return json_value(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
