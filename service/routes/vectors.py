"""Vectors: upsert (JSON, packed float32, .npy or multipart), delete, get one."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Query, Request
from pydantic import ValidationError

from service.errors import BadRequest, InvalidInput, UnsupportedMediaType
from service.routes.deps import READ, WRITE, ServicesDep, in_thread, read_body
from service.schemas import (
    ERROR_RESPONSES,
    DeleteBody,
    DeleteOut,
    UpsertBody,
    UpsertOut,
    VectorOut,
)

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
"""


def _vectors_from_bytes(data: bytes, dim: int, npy: bool | None) -> npt.NDArray[np.float32]:
    if npy or (npy is None and data[:6] == b"\x93NUMPY"):
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            raise InvalidInput(f"not a readable .npy array: {exc}") from exc
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
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype.kind not in "iu":
            raise InvalidInput(f"ids must be integers, got {arr.dtype}")
        return arr.reshape(-1).astype(np.int64)
    try:
        return _ids_from_text(data.decode("ascii"))
    except (UnicodeDecodeError, InvalidInput):
        if len(data) % 8:
            raise InvalidInput("ids part is neither text, .npy nor packed int64") from None
        return np.frombuffer(data, dtype="<i8").astype(np.int64)


def _ids_from_text(text: str) -> npt.NDArray[np.int64]:
    try:
        return np.array([int(p) for p in text.replace(" ", "").split(",") if p],
                        dtype=np.int64)
    except ValueError as exc:
        raise InvalidInput(f"ids must be comma-separated integers: {exc}") from exc


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
            ids = _ids_from_text(ids_part)
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
        ids = _ids_from_text(ids_q) if ids_q else None
        metadata = None
    if id_start is not None:
        if ids is not None:
            raise BadRequest("give ids or id_start, not both")
        ids = np.arange(id_start, id_start + len(vectors), dtype=np.int64)
    _check_finite(vectors)
    return ids, vectors, metadata


@router.post("", dependencies=WRITE, description=BINARY_DOC, openapi_extra={
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": UpsertBody.model_json_schema()},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "vectors": {"type": "string", "format": "binary"},
            "ids": {"type": "string"}, "metadata": {"type": "string"}}}}}}})
async def upsert(name: str, request: Request, services: ServicesDep,
                 ids: str | None = Query(None, description="binary bodies: 1,2,3"),
                 id_start: int | None = Query(None, ge=0, description="binary bodies")
                 ) -> UpsertOut:
    catalog = services.need_catalog()
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype in ("application/json", ""):
        try:
            body = UpsertBody.model_validate_json(
                await read_body(request, services.settings.max_body_bytes))
        except ValidationError as exc:
            raise InvalidInput("invalid upsert body: " + "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            ) from exc
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
        id_arr = await in_thread(catalog.next_ids, name, len(vectors))
    count = await in_thread(catalog.upsert, name, id_arr, vectors, metadata)
    return UpsertOut(upserted=int(count), ids=[int(i) for i in id_arr])


@router.delete("", dependencies=WRITE)
async def delete(name: str, body: DeleteBody, services: ServicesDep) -> DeleteOut:
    deleted = await in_thread(services.need_catalog().delete, name, body.ids)
    return DeleteOut(deleted=int(deleted))


@router.get("/{id}", dependencies=READ)
async def get_vector(name: str, id: int, services: ServicesDep) -> VectorOut:
    vector, metadata = await in_thread(services.need_catalog().get_vector, name, id)
    return VectorOut(id=id, vector=vector.tolist(), metadata=metadata)
