"""Vectors: upsert (JSON, packed float32, .npy or multipart), delete, get one."""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError, WithJsonSchema

from service.catalog_values import as_id_array
from service.errors import BadRequest, InvalidInput, UnsupportedMediaType
from service.routes.deps import READ, WRITE, ServicesDep, in_thread, json_body, read_body
from service.schemas import (
    DECIMAL,
    ERROR_RESPONSES,
    ID_MAX,
    IDS_TEXT_PATTERN,
    DeleteBody,
    DeleteOut,
    IdPath,
    NamePath,
    UpsertBody,
    UpsertOut,
    VectorOut,
    inline_json_body,
)

if TYPE_CHECKING:
    from service.catalog import Catalog

router = APIRouter(prefix="/v1/collections/{name}/vectors", tags=["vectors"],
                   responses=ERROR_RESPONSES)

BINARY_DOC = """Upsert vectors, atomically (all or nothing).

Body forms, chosen by Content-Type:

* `application/json`: `{"ids": [..], "vectors": [[..], ..], "metadata": [{..}, ..]}`
  (`ids` and `metadata` optional; ids are assigned when absent).
* `application/octet-stream`: packed little-endian float32, row-major, n x dim
  (n = body bytes / (4 dim)).
* `application/x-npy`: a `.npy` file of shape (n, dim), float16/32/64, no pickles.
* `multipart/form-data`: part `vectors` (a .npy or packed float32 file), optional part
  `ids` (.npy int64, packed little-endian int64, or comma-separated text) and optional
  part `metadata` (a JSON array of objects, one per vector).

For the two binary bodies, ids come from the query string: `ids=1,2,3` or
`id_start=1000` (ids 1000..1000+n-1); with neither they are assigned.
Every id is an integer in 0..2^63-1 (9223372036854775807), id_start + n - 1 included.
"""


# Query parameters of a binary upsert. Absent or given, never null: plain schemas.
IdsQuery = Annotated[str | None, Query(
    pattern=IDS_TEXT_PATTERN, description=f"binary bodies: 1,2,3 (each in 0..{ID_MAX})"),
    WithJsonSchema({"type": "string", "pattern": IDS_TEXT_PATTERN})]
IdStartQuery = Annotated[int | None, Query(
    ge=0, le=ID_MAX, description=f"binary bodies: first id; id_start + n - 1 <= {ID_MAX}"),
    DECIMAL, WithJsonSchema({"type": "integer", "minimum": 0, "maximum": ID_MAX})]


def _read_npy(data: bytes, what: str) -> npt.NDArray[Any]:
    """One array in .npy format: no pickles, no .npz archive (np.load opens both), and no
    header that declares more data than the body holds (numpy would allocate it first)."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(buf)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(buf)
        if dtype.hasobject:
            raise ValueError("object arrays are not accepted")
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if declared > len(data) - buf.tell():
            raise ValueError(f"its header declares {declared} bytes of data, the body holds "
                             f"{len(data) - buf.tell()}")
        arr: npt.NDArray[Any] = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise InvalidInput(f"{what} is not a readable .npy array: {exc}") from exc
    return arr


def _vectors_from_bytes(data: bytes, dim: int, npy: bool | None) -> npt.NDArray[np.float32]:
    if npy or (npy is None and data[:6] == b"\x93NUMPY"):
        arr = _read_npy(data, "the vectors body")
        if arr.ndim == 1 and arr.size == dim:
            arr = arr.reshape(1, dim)
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise InvalidInput(f"expected an array of shape (n, {dim}), got {arr.shape}")
        if arr.dtype.kind != "f":
            raise InvalidInput(f"expected a float array, got {arr.dtype}")
        return np.ascontiguousarray(arr, dtype=np.float32)
    if len(data) == 0 or len(data) % (4 * dim):
        raise InvalidInput(f"packed float32 body of {len(data)} bytes is not a whole "
                           f"number of {dim}-d vectors ({4 * dim} bytes each)")
    return np.frombuffer(data, dtype="<f4").reshape(-1, dim).astype(np.float32)


def _ids_from_bytes(data: bytes) -> npt.NDArray[np.int64]:
    if data[:6] == b"\x93NUMPY":
        arr = _read_npy(data, "the ids part")
        if arr.dtype.kind not in "iu":
            raise InvalidInput(f"ids must be integers, got {arr.dtype}")
        return as_id_array(arr.reshape(-1))
    text = data.decode("latin-1")
    if text.strip(" ,") and not text.strip(" ,0123456789"):
        return ids_from_text(text)  # digits and commas: text, whatever its length
    if len(data) % 8:
        raise InvalidInput("ids part is neither text, .npy nor packed int64")
    return as_id_array(np.frombuffer(data, dtype="<i8"))


def ids_from_text(text: str) -> npt.NDArray[np.int64]:
    """Comma-separated decimal ids (spaces ignored), each in 0..2^63-1, or InvalidInput."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise InvalidInput(f"ids must be comma-separated integers in 0..{ID_MAX}, "
                           f"got {text[:80]!r}")
    return as_id_array([int(p) for p in parts])


def id_range(id_start: int, n: int) -> npt.NDArray[np.int64]:
    """ids id_start..id_start+n-1, refused (422) when the last one would pass 2^63-1."""
    if id_start < 0 or id_start + n - 1 > ID_MAX:
        raise InvalidInput(f"id_start {id_start} with {n} vectors needs ids up to "
                           f"{id_start + n - 1}; ids must be in 0..{ID_MAX} (2^63-1)")
    return np.arange(id_start, id_start + n, dtype=np.int64)


async def fresh_ids(catalog: Catalog, name: str, n: int) -> npt.NDArray[np.int64]:
    """n ids the catalog has not handed out (422 when none are left below 2^63-1)."""
    ids: npt.NDArray[np.int64] = await in_thread(catalog.next_ids, name, n)
    return ids


def _check_finite(vectors: npt.NDArray[np.float32]) -> None:
    if not np.isfinite(vectors).all():
        raise InvalidInput("vectors contain NaN or infinity")


async def _parse_binary(request: Request, services: Any, dim: int, ids_q: str | None,
                        id_start: int | None, kind: str) -> tuple[Any, Any, Any]:
    limit = services.settings.max_body_bytes
    if kind == "multipart":
        form = await request.form(max_part_size=limit)
        part = form.get("vectors")
        if part is None or isinstance(part, str):
            raise InvalidInput("multipart upsert needs a file part named 'vectors'")
        vectors = _vectors_from_bytes(await part.read(), dim, None)
        ids_part = form.get("ids")
        if ids_part is None:
            ids = None
        elif isinstance(ids_part, str):
            ids = ids_from_text(ids_part)
        else:
            ids = _ids_from_bytes(await ids_part.read())
        meta_part = form.get("metadata")
        metadata = None
        if meta_part is not None:
            raw = meta_part if isinstance(meta_part, str) else (await meta_part.read()).decode()
            try:
                metadata = json.loads(raw)
            except ValueError as exc:
                raise InvalidInput(f"metadata part is not JSON: {exc}") from exc
            if not isinstance(metadata, list):
                raise InvalidInput("metadata part must be a JSON array of objects")
    else:
        vectors = _vectors_from_bytes(await read_body(request, limit), dim, kind == "npy")
        ids = ids_from_text(ids_q) if ids_q else None
        metadata = None
    if id_start is not None:
        if ids is not None:
            raise BadRequest("give ids or id_start, not both")
        ids = id_range(id_start, len(vectors))
    _check_finite(vectors)
    return ids, vectors, metadata


@router.post("", dependencies=WRITE, description=BINARY_DOC, openapi_extra={
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": UpsertBody.model_json_schema()},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["vectors"],
                                           "properties": {
            "vectors": {"type": "string", "format": "binary"},
            "ids": {"type": "string", "description": ".npy, packed int64 or 1,2,3"},
            "metadata": {"type": "string", "description": "a JSON array of objects"}}}}}}})
async def upsert(name: NamePath, request: Request, services: ServicesDep,
                 ids: IdsQuery = None, id_start: IdStartQuery = None) -> UpsertOut:
    catalog = services.need_catalog()
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype in ("application/json", ""):
        body = await json_body(request, services.settings.max_body_bytes, UpsertBody,
                               "upsert")
        id_arr: Any = body.ids
        vectors: Any = np.asarray(body.vectors, dtype=np.float32)
        metadata: Any = body.metadata
    else:
        kinds = {"application/octet-stream": "raw", "application/x-npy": "npy",
                 "application/npy": "npy", "multipart/form-data": "multipart"}
        if ctype not in kinds:
            raise UnsupportedMediaType(f"cannot upsert from {ctype}; use one of "
                                       f"application/json, {', '.join(kinds)}")
        info = await in_thread(catalog.get_collection, name)
        id_arr, vectors, metadata = await _parse_binary(request, services, info.dim, ids,
                                                        id_start, kinds[ctype])
    if id_arr is None:
        id_arr = await fresh_ids(catalog, name, len(vectors))
    count = await in_thread(catalog.upsert, name, id_arr, vectors, metadata)
    return UpsertOut(upserted=int(count), ids=[int(i) for i in id_arr])


@router.delete("", dependencies=WRITE, openapi_extra=inline_json_body(DeleteBody))
async def delete(name: NamePath, request: Request, services: ServicesDep) -> DeleteOut:
    """Delete ids (unknown ones are ignored): `{"ids": [1, 2]}`."""
    raw = await read_body(request, services.settings.max_body_bytes)
    try:
        body = DeleteBody.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    deleted = await in_thread(services.need_catalog().delete, name, body.ids)
    return DeleteOut(deleted=int(deleted))


@router.get("/{id}", dependencies=READ)
async def get_vector(name: NamePath, id: IdPath, services: ServicesDep) -> VectorOut:
    vector, metadata = await in_thread(services.need_catalog().get_vector, name, id)
    return VectorOut(id=id, vector=vector.tolist(), metadata=metadata)
