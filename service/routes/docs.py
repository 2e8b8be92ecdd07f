"""The API documentation pages, /docs (Swagger UI) and /redoc, with no CDN: their assets come
from the installed fastapi-standalone-docs package, so the pages work offline."""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse

from service.errors import NotFound

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# Swagger UI, ReDoc and the favicon: GET/HEAD without a key (OPEN_PREFIXES in service/auth.py).
ASSET_PREFIX = "/docs/static/"
# The ReDoc bundle loads its sidebar logo from <page path>/logo-mini.svg (the package patched
# the bundle's CDN address to that), so this one path is fixed by the bundle.
REDOC_LOGO_URL = f"{REDOC_URL}/logo-mini.svg"

PACKAGE = "fastapi_standalone_docs"
PACKAGE_DIR = Path(str(resources.files(PACKAGE))) / "static"
PACKAGE_VERSION = metadata.version("fastapi-standalone-docs")

# Only these files are served: a fixed list, so no path ever reaches the file system.
# URL name -> (file under the package's static/, media type).
ASSETS: dict[str, tuple[str, str]] = {
    "swagger-ui-bundle.js": ("swagger/swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("swagger/swagger-ui.css", "text/css; charset=utf-8"),
    "redoc.standalone.js": ("redoc/redoc.standalone.js", "text/javascript; charset=utf-8"),
    "favicon.png": ("fastapi/favicon.png", "image/png"),
}
REDOC_LOGO = ("redoc/logo-mini.svg", "image/svg+xml")
# The asset URLs carry the package version, so a browser may keep them for a day; an upgrade
# changes the URLs.
ASSET_HEADERS = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}

router = APIRouter(tags=["documentation"], include_in_schema=False)


def asset_url(request: Request, name: str) -> str:
    """The local URL of one asset, under the app's root path, with the package version."""
    root_path = str(request.scope.get("root_path", "")).rstrip("/")
    return f"{root_path}{ASSET_PREFIX}{name}?v={PACKAGE_VERSION}"


def _openapi_url(request: Request) -> str:
    root_path = str(request.scope.get("root_path", "")).rstrip("/")
    return f"{root_path}{request.app.openapi_url}"


def _file(relative: str, media_type: str) -> FileResponse:
    path = PACKAGE_DIR / relative
    if not path.is_file():
        raise NotFound(f"{PACKAGE} {PACKAGE_VERSION} lacks {relative}; reinstall it")
    return FileResponse(path, media_type=media_type, headers=ASSET_HEADERS)


@router.api_route(DOCS_URL, methods=["GET", "HEAD"])
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI: try the API from the browser."""
    app = request.app
    root_path = str(request.scope.get("root_path", "")).rstrip("/")
    # No online validator (validator.swagger.io), whatever layout a later change picks.
    parameters: dict[str, Any] = {"validatorUrl": None, **(app.swagger_ui_parameters or {})}
    return get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{app.title} - Swagger UI",
        swagger_js_url=asset_url(request, "swagger-ui-bundle.js"),
        swagger_css_url=asset_url(request, "swagger-ui.css"),
        swagger_favicon_url=asset_url(request, "favicon.png"),
        oauth2_redirect_url=f"{root_path}{OAUTH2_REDIRECT_URL}",
        init_oauth=app.swagger_ui_init_oauth,
        swagger_ui_parameters=parameters,
    )


@router.api_route(OAUTH2_REDIRECT_URL, methods=["GET", "HEAD"])
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.api_route(REDOC_URL, methods=["GET", "HEAD"])
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc: the API reference on one page."""
    return get_redoc_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=asset_url(request, "redoc.standalone.js"),
        redoc_favicon_url=asset_url(request, "favicon.png"),
        with_google_fonts=False,
    )


@router.api_route(ASSET_PREFIX + "{name}", methods=["GET", "HEAD"])
async def docs_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise NotFound(f"no documentation asset {name!r}")
    return _file(*ASSETS[name])


@router.api_route(REDOC_LOGO_URL, methods=["GET", "HEAD"])
async def redoc_logo() -> FileResponse:
    return _file(*REDOC_LOGO)
