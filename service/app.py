"""The FastAPI app factory: lifespan (storage, batcher, featurizer), error mapping, routers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cpu_fallback.core import IndexUnavailable
from service.auth import AuthMiddleware
from service.batcher import SearchBatcher
from service.errors import DotsearchError, PayloadTooLarge
from service.metrics import LatencyMiddleware, Metrics
from service.routes import (
    collections,
    docs,
    featurize,
    health,
    images,
    models,
    query,
    search,
    ui,
    vectors,
)
from service.routes.deps import SafeJSONResponse, Services
from service.settings import Settings, get_settings

if TYPE_CHECKING:
    from service.catalog import Catalog

log = logging.getLogger("dotsearch")


def _error(status: int, error: str, message: str, detail: Any = None,
           headers: dict[str, str] | None = None) -> SafeJSONResponse:
    body: dict[str, Any] = {"error": error, "message": message}
    if detail is not None:
        body["detail"] = detail
    return SafeJSONResponse(body, status_code=status, headers=headers)


def _validation_detail(errors: Any) -> list[dict[str, Any]]:
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
             "type": str(e.get("type", ""))} for e in errors]


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette names only the first route's)."""
    allowed = []
    for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def install_error_handlers(app: FastAPI) -> None:
    """The one place where errors become HTTP status codes and JSON bodies."""

    @app.exception_handler(DotsearchError)
    async def dotsearch_error(request: Request, exc: DotsearchError) -> SafeJSONResponse:
        if exc.status_code >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return SafeJSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(IndexUnavailable)
    async def index_unavailable(request: Request, exc: IndexUnavailable) -> SafeJSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return _error(503, "not_ready", str(exc))

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        detail = _validation_detail(exc.errors())
        first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return _error(422, "invalid_input", f"{where}: {first['msg']}", detail)

    @app.exception_handler(ValidationError)
    async def model_invalid(request: Request, exc: ValidationError) -> SafeJSONResponse:
        return _error(422, "invalid_input", "invalid input", _validation_detail(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        names = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                 413: "payload_too_large"}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return _error(exc.status_code, names.get(exc.status_code, "http_error"),
                      str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> SafeJSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal_error", "internal server error")


# Past DOTSEARCH_BODY_TIMEOUT_S, a body still arriving must average at least this (bytes/s).
MIN_BODY_RATE = 1024


class BodyLimitMiddleware:
    """Refuses a request body over the limit with 413, however it arrives: a declared
    Content-Length is refused before reading, and a chunked body once it has grown past
    the limit (the bytes are counted as the app reads them). A body that stalls (no bytes
    for ``stall_s`` while more are due) or is not complete by ``stall_s`` plus its length
    at MIN_BODY_RATE is refused with 408: a client cannot hold a connection and its
    handler open by sending a body slowly enough (a slowloris on the body; heads have their
    own timeout in service/http_server.py)."""

    def __init__(self, app: ASGIApp, limit: int, stall_s: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.stall_s = stall_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = 0
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit():
                declared = int(value)
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                exc = PayloadTooLarge(f"request body of {int(value)} bytes; "
                                      f"the limit is {self.limit}")
                response = SafeJSONResponse(exc.to_dict(), status_code=413)
                await response(scope, receive, send)
                return
        received = 0
        body_done = False
        started = time.monotonic()

        async def counted() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body: only a disconnect can come, whenever it does
                return await receive()
            deadline = started + self.stall_s + max(declared, received) / MIN_BODY_RATE
            wait = min(self.stall_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except TimeoutError:
                # An HTTPException passes through FastAPI's body parsing unchanged.
                raise StarletteHTTPException(
                    408, f"the request body stalled or came too slowly: no bytes for "
                    f"{self.stall_s:g} s, or under {MIN_BODY_RATE} bytes/s past that "
                    "(DOTSEARCH_BODY_TIMEOUT_S)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.limit:
                    raise StarletteHTTPException(
                        413, f"request body over the limit of {self.limit} bytes")
            else:
                body_done = True
            return message

        await self.app(scope, counted, send)


def _backend_info(settings: Settings, catalog: Catalog) -> dict[str, Any]:
    try:
        from service.backend import select_backend

        choice = select_backend(settings.backend)
        return {"backend": choice.name, "device": str(choice.device)}
    except ImportError:
        return {"backend": catalog.backend_name, "device": "cpu"}


def _load_featurizer(services: Services) -> None:
    from service.featurizer import Featurizer

    try:
        featurizer = Featurizer(services.settings.weights,
                                batch_size=services.settings.featurizer_batch)
        services.featurizer = featurizer
        services.featurizer_state = "ready"
        log.info("featurizer ready: %s", featurizer.info())
    except Exception as exc:
        services.featurizer_state = "failed"
        services.featurizer_error = str(exc)
        log.error("featurizer failed to load: %s", exc)
    finally:
        services.featurizer_ready.set()


def _state_sql_bound(app: FastAPI, max_chars: int) -> None:
    """The OpenAPI schema states the SQL length this server takes (DOTSEARCH_SQL_MAX_CHARS),
    not the default that the models are declared with."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            body = schema["components"]["schemas"]["QueryBody"]["properties"]["sql"]
            body["maxLength"] = max_chars
            for parameter in schema["paths"]["/v1/query"]["get"]["parameters"]:
                if parameter["name"] == "q":
                    parameter["schema"]["maxLength"] = max_chars
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, *, catalog: Catalog | None = None,
               featurizer: Any = None) -> FastAPI:
    """A ready-to-serve app. ``catalog`` / ``featurizer`` may be injected (tests, embedding);
    an injected catalog is not closed on shutdown."""
    settings = settings or get_settings()
    metrics = Metrics()
    services = Services(settings=settings, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from service.catalog import Catalog

        owned = catalog is None
        if catalog is None:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            cat = Catalog.from_settings(settings)
        else:
            cat = catalog
        services.catalog = cat
        services.backend = _backend_info(settings, cat)
        log.info("storage %s open, backend %s", settings.data_dir, services.backend)
        services.batcher = SearchBatcher(
            lambda name, q, k, threshold, filter_: cat.search(
                name, q, k, threshold=threshold, filter=filter_),
            window_s=settings.batch_window_ms / 1000.0, max_batch=settings.batch_max,
            on_batch=metrics.observe_batch)
        metrics.add_state(lambda: [(c.name, c.count) for c in cat.list_collections()],
                          health.gpu_memory, cat.shard_states)
        if featurizer is not None:
            services.featurizer, services.featurizer_state = featurizer, "ready"
            services.featurizer_ready.set()
        elif settings.load_featurizer:
            services.featurizer_state = "loading"
            threading.Thread(target=_load_featurizer, args=(services,), daemon=True,
                             name="featurizer-loader").start()
        try:
            yield
        finally:
            if owned:
                cat.close()
                log.info("storage closed")
            services.catalog = None

    # docs_url/redoc_url None: service/routes/docs.py serves /docs and /redoc from local assets.
    app = FastAPI(title="dotsearch", version="0.1.0", lifespan=lifespan,
                  description="GPU-accelerated exact vector search for image features, "
                              "with a SQL face.",
                  docs_url=None, redoc_url=None)
    app.state.services = services
    _state_sql_bound(app, settings.sql_max_chars)
    install_error_handlers(app)
    for module in (health, collections, vectors, search, images, featurize, query, models, ui,
                   docs):
        app.include_router(module.router)
    # The last added runs first: time everything, authenticate, then limit the body.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes,
                       stall_s=settings.body_timeout_s)
    app.add_middleware(AuthMiddleware, api_key=settings.api_key,
                       read_only_api_key=settings.read_only_api_key)
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    return app
