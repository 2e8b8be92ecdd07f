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
    "TINYINT": "BIGINT",
    "SMALLINT": "BIGINT",
    "MEDIUMINT": "BIGINT",
    "DOUBLE": "DOUBLE",
    "FLOAT": "DOUBLE",
    "REAL": "DOUBLE",
    "VARCHAR": "VARCHAR",
    "TEXT": "VARCHAR",
    "STRING": "VARCHAR",
    "CHAR": "VARCHAR",
    "TINYTEXT": "VARCHAR",
    "MEDIUMTEXT": "VARCHAR",
    "LONGTEXT": "VARCHAR",
    "BOOLEAN": "BOOLEAN",
    "BOOL": "BOOLEAN",
    "TIMESTAMP": "TIMESTAMP",
    "DATETIME": "TIMESTAMP",
    "JSON": "JSON",
}


def check_name(kind: str, name: object) -> str:
    """A table or column name: letters, digits, underscore, starting with a letter."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
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


# What DuckDB's I/O errors carry (from strerror) -> the cause in the service's own words,
# and when writes work again.
FREED = "space is freed in the data directory"
WRITABLE = "the data directory is writable again"
STORAGE_CAUSES: tuple[tuple[str, str, str], ...] = (
    ("No space left", "the disk holding the data directory is full", FREED),
    ("Disk quota", "the data directory is over its disk quota", FREED),
    ("File too large", "a database file reached the file-size limit", FREED),
    ("Read-only file system", "the data directory is on a read-only file system", WRITABLE),
    ("Permission denied", "the server may not write to the data directory", WRITABLE),
)
ENGINE_STOPPED = "database has been invalidated"
STORAGE_LOST = ("storage is unavailable after a storage failure: restart the server once space "
                "is freed in the data directory (every acknowledged write is kept)")
# The DuckDB errors a failed read or write of the database files comes as (a failed COMMIT
# is a TransactionException, a failed checkpoint a FatalException).
STORAGE_FAILURES = (duckdb.IOException, duckdb.FatalException, duckdb.TransactionException,
                    duckdb.InternalException)


def storage_cause(exc: Exception) -> tuple[str, str] | None:
    """Why a storage operation failed and when writes work again, in our words (no paths,
    no DuckDB error names); None when ``exc`` is not a storage failure (a bad query, a
    constraint, a conflict)."""
    if not isinstance(exc, STORAGE_FAILURES):
        return None  # other errors may quote the user's values: never read causes from them
    text = str(exc)
    for needle, cause, remedy in STORAGE_CAUSES:
        if needle in text:
            return cause, remedy
    if isinstance(exc, duckdb.IOException) or "Could not write" in text:
        return "an I/O error occurred in the data directory", "the I/O error is resolved"
    if engine_stopped(exc):
        return "the database engine stopped after a storage failure", FREED
    if isinstance(exc, duckdb.InternalException):
        return "the database engine failed internally", "the server is restarted"
    return None  # a TransactionException that is a conflict, not a storage failure


def engine_stopped(exc: Exception) -> bool:
    """DuckDB invalidated its database: nothing works on it until it is opened again."""
    return isinstance(exc, duckdb.FatalException) or ENGINE_STOPPED in str(exc)


def _and_stopped(cause: str) -> str:
    return cause if "engine stopped" in cause else f"{cause}, and the database engine stopped"


def map_duckdb_error(exc: Exception, what: str) -> DotsearchError:
    """Translate a DuckDB exception into the service's hierarchy (message without SQL echo;
    storage failures in our own words, without DuckDB's internals or file paths)."""
    found = storage_cause(exc)
    if found is not None:
        head = what if what.endswith("failed") else f"{what} failed"
        if engine_stopped(exc):
            return StorageError(f"{head}: {_and_stopped(found[0])}; restart the server once "
                                f"{found[1]}")
        return StorageError(f"{head}: {found[0]}; writes work again once {found[1]}")
    message = in_our_words(str(exc))
    if isinstance(exc, duckdb.ConstraintException):
        return Conflict(f"{what}: {message}")
    if isinstance(exc, duckdb.ConversionException | duckdb.InvalidInputException):
        return InvalidInput(f"{what}: {message}")
    if isinstance(exc, duckdb.OutOfMemoryException):
        return StorageError(f"{what}: the database engine ran out of its memory budget "
                            "(DOTSEARCH_DUCKDB_MEMORY_LIMIT)")
    return QueryError(f"{what}: {message}")


# DuckDB's error class names ("Binder Error: "), and its hints that name its own functions.
DUCKDB_ERROR_CLASS = re.compile(r"^(?:[A-Z][A-Za-z]*(?: [A-Za-z]+)* )?Error: ")
DUCKDB_HINTS = ("Did you mean", "Candidate bindings", "Candidate functions",
                "You might need", "In order to select one")
# DuckDB's phrasing -> ours.
DUCKDB_PHRASES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r'Referenced column "?([^"!]+)"? not found in FROM clause!?'),
     r'unknown column "\1"'),
    (re.compile(r'Referenced table "?([^"!]+)"? not found!?'), r'unknown table "\1"'),
    (re.compile(r"(?:Scalar |Aggregate |Table )?Function with name \"?(\w+)\"? does not exist!?"),
     r'unknown function "\1"'),
    (re.compile(r"Type with name \"?(\w+)\"? does not exist!?"), r'unknown type "\1"'),
    (re.compile(r"Table with name \"?(\w+)\"? does not exist!?"), r'unknown table "\1"'),
    (re.compile(r"No function matches the given name and argument types '([^']*)'\.?"),
     r"no function matches \1"),
    (re.compile(r'Could not choose a best candidate function for the function call "([^"]*)"\.?'),
     r"no function or operator matches \1"),
    (re.compile(r"Python exception occurred while executing the UDF: (?:\w+: )?"), ""),
    (re.compile(r"_LITERAL\b"), ""),
    (re.compile(r"\b__[a-z]+\."), ""),  # the planner's internal table aliases
)
# The UDFs behind the vector functions, by the names users wrote.
UDF_SQL_NAMES = {"ds_dot_product": "DOT_PRODUCT", "ds_euclidean_distance": "EUCLIDEAN_DISTANCE",
                 "ds_cosine_similarity": "COSINE_SIMILARITY",
                 "ds_cosine_distance": "COSINE_DISTANCE",
                 "ds_json_array_unpack": "JSON_ARRAY_UNPACK",
                 "ds_json_array_pack": "JSON_ARRAY_PACK"}


def in_our_words(message: str) -> str:
    """A DuckDB error message without DuckDB's error class, its SQL echo, or hints that
    suggest its own types and functions; the first line only."""
    text = message.split("\nLINE", 1)[0].strip()
    text = DUCKDB_ERROR_CLASS.sub("", text.splitlines()[0] if text else "", count=1)
    for hint in DUCKDB_HINTS:
        text = text.split(hint, 1)[0]
    for pattern, replacement in DUCKDB_PHRASES:
        text = pattern.sub(replacement, text)
    for udf, name in UDF_SQL_NAMES.items():
        text = text.replace(udf, name)
    return text.strip().rstrip("!").strip() or "the statement failed"


def write_failure(exc: Exception, lead: str, *, reopened: bool | None) -> DotsearchError:
    """A failed write in our words. ``reopened``: None when DuckDB went on working, else
    whether the database could be opened again after DuckDB invalidated it."""
    found = storage_cause(exc)
    if found is None:
        return map_duckdb_error(exc, lead)
    cause, remedy = found
    if reopened is None:
        return StorageError(f"{lead}: {cause}; reads go on, and writes work again once {remedy}")
    if reopened:
        return StorageError(f"{lead}: {_and_stopped(cause)}; it was reopened from its last "
                            "committed state, so reads go on, and writes work again once "
                            f"{remedy}")
    return StorageError(f"{lead}: {_and_stopped(cause)} and could not be reopened: restart the "
                        f"server once {remedy} (every acknowledged write is kept)")


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
