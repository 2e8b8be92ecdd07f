"""Shared state of a running app and the Annotated dependencies the routers use."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from service.auth import Access, authenticate, authorize
from service.errors import InvalidInput, NotReady, PayloadTooLarge
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.batcher import SearchBatcher
    from service.catalog import Catalog
    from service.featurizer import Featurizer


@dataclass
class Services:
    """Everything a request handler needs, built once by the app's lifespan."""

    settings: Settings
    metrics: Metrics
    catalog: Catalog | None = None
    batcher: SearchBatcher | None = None
    featurizer: Featurizer | None = None
    featurizer_state: str = "disabled"  # disabled | loading | ready | failed
    featurizer_error: str | None = None
    backend: dict[str, Any] = field(default_factory=dict)
    featurizer_ready: threading.Event = field(default_factory=threading.Event)

    def need_catalog(self) -> Catalog:
        if self.catalog is None:
            raise NotReady("the storage is not open yet")
        return self.catalog

    def need_batcher(self) -> SearchBatcher:
        if self.batcher is None:
            raise NotReady("the search batcher is not running yet")
        return self.batcher

    def need_featurizer(self) -> Featurizer:
        if self.featurizer is None:
            why = {"loading": "the featurizer is still loading; retry shortly",
                   "failed": f"the featurizer failed to load: {self.featurizer_error}",
                   "disabled": "the featurizer is disabled on this server"}
            raise NotReady(why.get(self.featurizer_state, "the featurizer is not ready"))
        return self.featurizer


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
ApiKey = Annotated[str | None, Header(alias="X-API-Key", include_in_schema=False)]


def granted_access(request: Request, services: ServicesDep,
                   x_api_key: ApiKey = None) -> Access:
    """What the request's key allows: set by AuthMiddleware, else worked out here."""
    access: Access | None = getattr(request.state, "access", None)
    if access is None:
        s = services.settings
        access = authenticate(x_api_key, api_key=s.api_key,
                              read_only_api_key=s.read_only_api_key)
    return access


GrantedDep = Annotated[Access, Depends(granted_access)]


def require_read(granted: GrantedDep) -> None:
    authorize(granted, "read")


def require_write(granted: GrantedDep) -> None:
    authorize(granted, "write")


BodyT = TypeVar("BodyT", bound=BaseModel)

READ = [Depends(require_read)]
WRITE = [Depends(require_write)]


async def read_body(request: Request, limit: int) -> bytes:
    """The raw request body, refused with 413 beyond ``limit`` bytes (also when chunked)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, limit: int, model: type[BodyT], what: str) -> BodyT:
    """The body parsed as ``model`` straight from bytes; InvalidInput naming the first five
    problems ("invalid <what> body: loc: msg; ...") when it does not validate."""
    try:
        return model.model_validate_json(await read_body(request, limit))
    except ValidationError as exc:
        raise InvalidInput(f"invalid {what} body: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        ) from exc


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class SafeJSONResponse(JSONResponse):
    """JSON that never fails on NaN or infinity (they become null, as JSON has neither)."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, ensure_ascii=False, allow_nan=False,
                              separators=(",", ":"), default=str).encode("utf-8")
        except ValueError:
            return json.dumps(_finite(content), ensure_ascii=False, allow_nan=False,
                              separators=(",", ":"), default=str).encode("utf-8")


async def in_thread(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Engine, storage and model work runs off the event loop."""
    return await asyncio.to_thread(func, *args, **kwargs)
