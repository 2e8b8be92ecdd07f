"""API keys in the X-API-Key header (read-write, read-only): who a request is, before any body."""

from __future__ import annotations

import hmac
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import DotsearchError, Forbidden, Unauthorized

Access = Literal["read", "write"]

# The reviewed list of routes that answer without a key (GET and HEAD only): liveness,
# Prometheus scraping, the web page's own files and the API documentation. Everything
# else, unknown paths included, needs a key whenever keys are configured.
OPEN_PATHS = frozenset({"/health", "/metrics", "/", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/redoc/logo-mini.svg", "/openapi.json"})
OPEN_PREFIXES = ("/static/", "/docs/static/")
OPEN_METHODS = frozenset({"GET", "HEAD"})


def _same(given: str, expected: str | None) -> bool:
    if not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def authenticate(given: str | None, *, api_key: str | None,
                 read_only_api_key: str | None) -> Access:
    """What ``given`` may do: "write" (read-write key, or no keys configured) or "read".

    Raises Unauthorized (401) when keys are configured and ``given`` is missing or wrong.
    """
    if not api_key and not read_only_api_key:
        return "write"
    if not given:
        raise Unauthorized("this server requires an API key in the X-API-Key header")
    is_rw = _same(given, api_key)
    is_ro = _same(given, read_only_api_key)  # always compute both: no early exit
    if is_rw:
        return "write"
    if is_ro:
        return "read"
    raise Unauthorized("invalid API key")


def authorize(granted: Access, needed: Access) -> None:
    """Forbidden (403) when a read-only key asks for a write."""
    if needed == "write" and granted != "write":
        raise Forbidden("the read-only API key cannot modify data")


def is_open(method: str, path: str) -> bool:
    return method in OPEN_METHODS and (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES))


class AuthMiddleware:
    """Authenticates every request but the open routes before routing or reading a body.

    The key's access ("read" or "write") goes to ``scope["state"]["access"]``; each route
    then authorises what it does (the SQL route by the parsed statements).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, read_only_api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key
        self.read_only_api_key = read_only_api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                      if k == b"x-api-key"), None)
        try:
            access = authenticate(given, api_key=self.api_key,
                                  read_only_api_key=self.read_only_api_key)
        except DotsearchError as exc:
            if not is_open(scope.get("method", ""), scope.get("path", "")):
                from service.routes.deps import SafeJSONResponse

                response = SafeJSONResponse(exc.to_dict(), status_code=exc.status_code,
                                            headers={"WWW-Authenticate": "X-API-Key"})
                await response(scope, receive, send)
                return
            access = "read"
        scope.setdefault("state", {})["access"] = access
        await self.app(scope, receive, send)
