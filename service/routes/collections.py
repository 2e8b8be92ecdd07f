"""Collections: list, create, describe, drop."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.routes.deps import READ, WRITE, ServicesDep, in_thread
from service.schemas import (
    ERROR_RESPONSES,
    CollectionCreate,
    CollectionList,
    CollectionOut,
    NamePath,
)

router = APIRouter(prefix="/v1/collections", tags=["collections"], responses=ERROR_RESPONSES)


def collection_out(info: Any) -> CollectionOut:
    return CollectionOut(name=info.name, dim=info.dim, metric=info.metric, dtype=info.dtype,
                         columns=dict(info.columns), count=info.count,
                         thumbnails=info.thumbnails, column_order=list(info.column_order),
                         vector_type=info.vector_type, auto_increment=info.auto_increment,
                         shards=info.shards)


@router.get("", dependencies=READ)
async def list_collections(services: ServicesDep) -> CollectionList:
    infos = await in_thread(services.need_catalog().list_collections)
    return CollectionList(collections=[collection_out(i) for i in infos])


@router.post("", status_code=201, dependencies=WRITE)
async def create_collection(body: CollectionCreate, services: ServicesDep) -> CollectionOut:
    """A collection has the columns id, feature (its vector) and the named metadata columns."""
    catalog = services.need_catalog()
    info = await in_thread(catalog.create_collection, body.name, body.dim, body.metric,
                           body.dtype, body.columns, thumbnails=body.thumbnails,
                           shards=body.shards)
    return collection_out(info)


@router.get("/{name}", dependencies=READ)
async def get_collection(name: NamePath, services: ServicesDep) -> CollectionOut:
    return collection_out(await in_thread(services.need_catalog().get_collection, name))


@router.delete("/{name}", dependencies=WRITE)
async def drop_collection(name: NamePath, services: ServicesDep) -> dict[str, str]:
    await in_thread(services.need_catalog().drop_collection, name)
    return {"dropped": name}
