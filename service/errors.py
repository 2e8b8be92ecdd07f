"""The one error hierarchy of the service, each class carrying its HTTP status and stable name."""

from __future__ import annotations

from typing import Any, ClassVar


class DotsearchError(Exception):
    """Base of every error the service reports to a client.

    ``status_code`` is the HTTP status, ``error`` a stable machine-readable name, and
    ``position`` an optional ``{"line": int, "column": int}`` pointing into a query.
    """

    status_code: ClassVar[int] = 500
    error: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, position: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.position is not None:
            body["position"] = self.position
        return body

    def __str__(self) -> str:
        if self.position:
            line, column = self.position.get("line"), self.position.get("column")
            return f"{self.message} (line {line}, column {column})"
        return self.message


class QueryError(DotsearchError):
    """A SQL statement or filter expression that cannot run (syntax, names, types, values)."""

    status_code = 400
    error = "query_error"


class QueryTimeout(QueryError):
    """A statement ran past DOTSEARCH_SQL_TIMEOUT_S and was interrupted."""

    error = "query_timeout"


class QueryTooLarge(QueryError):
    """SQL text, tokens or nesting beyond the configured bounds."""

    error = "query_too_large"


class QueryResourceLimit(QueryError):
    """A statement needed more memory, result bytes or list/string size than allowed."""

    error = "query_resource_limit"


class BadRequest(DotsearchError):
    status_code = 400
    error = "bad_request"


class Unauthorized(DotsearchError):
    status_code = 401
    error = "unauthorized"


class Forbidden(DotsearchError):
    status_code = 403
    error = "forbidden"


class NotFound(DotsearchError):
    status_code = 404
    error = "not_found"


class Conflict(DotsearchError):
    status_code = 409
    error = "conflict"


class PayloadTooLarge(DotsearchError):
    status_code = 413
    error = "payload_too_large"


class UnsupportedMediaType(DotsearchError):
    status_code = 415
    error = "unsupported_media_type"


class InvalidInput(DotsearchError):
    """Well-formed request whose vectors, ids or metadata are not acceptable."""

    status_code = 422
    error = "invalid_input"


class NotReady(DotsearchError):
    status_code = 503
    error = "not_ready"


class StorageError(DotsearchError):
    """The system of record could not complete a write (disk full, I/O error, lock)."""

    status_code = 507
    error = "storage_error"


class SchemaVersionError(StorageError):
    """The data directory was written by an incompatible version of dotsearch."""

    error = "schema_version_mismatch"


ALL_ERRORS: tuple[type[DotsearchError], ...] = (
    DotsearchError,
    QueryError,
    QueryTimeout,
    QueryTooLarge,
    QueryResourceLimit,
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    InvalidInput,
    NotReady,
    StorageError,
    SchemaVersionError,
)
