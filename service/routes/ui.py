"""The web page: GET / (index.html) and its static files under /static/ (no CDN, no build)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Only these files are served: a fixed list, so no path ever reaches the file system.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
}
# The page is small and changes with the server: revalidate instead of caching stale copies.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(tags=["web page"], include_in_schema=False)


def _file(name: str) -> FileResponse:
    media_type = FILES.get(name)
    path = STATIC_DIR / name
    if media_type is None or not path.is_file():
        raise NotFound(f"no static file {name!r}")
    return FileResponse(path, media_type=media_type, headers=HEADERS)


@router.get("/")
async def index() -> FileResponse:
    """The web page: search by image, add images, SQL console."""
    return _file("index.html")


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    return _file(name)
