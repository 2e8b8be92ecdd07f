"""The API docs work offline (issue 12): /docs (Swagger UI) and /redoc load their scripts and
styles from the server itself, never from a CDN, and those assets need no API key.

The fast tests read the HTML and fetch every asset through TestClient with keys configured.
The browser test runs `dotsearch serve` and opens both pages in headless Chromium with every
request to another host aborted, then checks that each page rendered every operation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.serve_support import serving

RW_KEY, RO_KEY = "docs-rw-key", "docs-ro-key"
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# A machine name, as on a cluster: Swagger UI and ReDoc treat localhost specially in places.
# The browser maps it to 127.0.0.1 and resolves no other name at all.
CLUSTER_HOST = "dotsearch.test"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--host-resolver-rules=MAP {CLUSTER_HOST} 127.0.0.1, MAP * ~NOTFOUND, "
                 "EXCLUDE 127.0.0.1"]
# Any absolute or protocol-relative URL in a docs page: a CDN, fonts, anything off the server.
OFF_SERVER = re.compile(r"(?:https?:)?//", re.I)
ATTRIBUTE_URL = re.compile(r'(?:src|href|spec-url)="([^"]*)"')
KINDS = {".js": "text/javascript", ".css": "text/css", ".png": "image/png",
         ".svg": "image/svg+xml"}
# What each asset must be: the real Swagger UI / ReDoc dist files, not some stand-in.
SIGNATURES = {"swagger-ui-bundle.js": b"SwaggerUIBundle", "swagger-ui.css": b".swagger-ui",
              "redoc.standalone.js": b"Redoc", "favicon.png": b"\x89PNG\r\n\x1a\n",
              "logo-mini.svg": b"<svg"}
# The ReDoc bundle asks for <its page's path>/logo-mini.svg.
REDOC_LOGO = "/redoc/logo-mini.svg"
# Operations that each page must show (the issue names these two).
MUST_SHOW = (("post", "/v1/collections/{name}/search"), ("post", "/v1/query"))


# ---- fast: the HTML and the assets, through TestClient, keys configured ------------------

@pytest.fixture(scope="module")
def keyed_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("docs_data"), backend="cpu",
                        load_featurizer=False, api_key=RW_KEY, read_only_api_key=RO_KEY)
    with TestClient(create_app(settings)) as client:
        yield client


def page_urls(html: str) -> list[str]:
    """Every URL a docs page loads: src, href, ReDoc's spec-url, Swagger UI's `url:`."""
    urls = ATTRIBUTE_URL.findall(html) + re.findall(r"\burl: '([^']*)'", html)
    assert urls, "no URL found in the page: has its HTML changed shape?"
    return urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
def test_docs_pages_load_only_local_assets_without_a_key(keyed_client: TestClient, page: str,
                                                          key: str | None) -> None:
    headers = {} if key is None else {"X-API-Key": key}
    response = keyed_client.get(page, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    found = OFF_SERVER.search(html)
    assert found is None, f"{page} refers to another host: ...{html[found.start():][:80]}"
    assets = 0
    for url in page_urls(html):
        assert url.startswith("/"), f"{page}: {url!r} is not a path on this server"
        path = url.split("?", 1)[0]
        suffix = Path(path).suffix
        for method in ("HEAD", "GET"):
            asset = keyed_client.request(method, url, headers=headers)
            assert asset.status_code == 200, f"{method} {url} without a valid key: " \
                                             f"{asset.status_code} {asset.text[:200]}"
        if suffix == ".json":
            assert "paths" in asset.json()
            continue
        assets += 1
        assert asset.headers["content-type"].startswith(KINDS[suffix]), (url, asset.headers)
        assert asset.headers.get("x-content-type-options") == "nosniff"
        name = Path(path).name
        assert SIGNATURES[name] in asset.content, f"{url} is not the real {name}"
    assert assets >= 2, f"{page}: expected a script and a favicon at least"


def test_swagger_page_loads_its_script_and_styles_from_the_server(
        keyed_client: TestClient) -> None:
    html = keyed_client.get("/docs").text
    urls = [url.split("?", 1)[0] for url in page_urls(html)]
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"):
        assert f"/docs/static/{name}" in urls, urls
    assert "/openapi.json" in urls
    assert "'/docs/oauth2-redirect'" in html
    redoc = [url.split("?", 1)[0] for url in page_urls(keyed_client.get("/redoc").text)]
    assert "/docs/static/redoc.standalone.js" in redoc and "/openapi.json" in redoc


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
def test_redoc_logo_is_local_and_open(keyed_client: TestClient, key: str | None) -> None:
    """The ReDoc bundle's sidebar logo: the package points it at the page's own path."""
    bundle = keyed_client.get("/docs/static/redoc.standalone.js",
                              headers={"X-API-Key": RW_KEY}).content
    assert b"cdn.redoc.ly" not in bundle
    assert b'window.location.pathname+"/logo-mini.svg"' in bundle
    headers = {} if key is None else {"X-API-Key": key}
    logo = keyed_client.get(REDOC_LOGO, headers=headers)
    assert logo.status_code == 200, logo.text
    assert logo.headers["content-type"].startswith("image/svg+xml")
    assert SIGNATURES["logo-mini.svg"] in logo.content


def test_only_the_listed_assets_are_served(keyed_client: TestClient) -> None:
    key = {"X-API-Key": RW_KEY}
    assert keyed_client.get("/docs/static/swagger-ui.css", headers=key).status_code == 200
    for url in ("/docs/static/nothing.js", "/docs/static/LICENSE",
                "/docs/static/..%2Fswagger%2FLICENSE", "/docs/static/%2E%2E%2F__init__.py",
                "/redoc/redoc.standalone.js"):
        response = keyed_client.get(url, headers=key)
        assert response.status_code == 404, (url, response.status_code)
    # Open means GET and HEAD only.
    response = keyed_client.post("/docs/static/swagger-ui.css")
    assert response.status_code == 401


# ---- slow: both pages in a real browser with the network cut off -------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, Any]]]:
    """`dotsearch serve` on a free port: its port and its OpenAPI schema."""
    with serving(tmp_path_factory.mktemp("docs_server"), cwd=REPO) as (base, port):
        yield port, httpx.get(f"{base}/openapi.json", timeout=10).json()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright Python package is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                              headless=True)
        try:
            yield b
        finally:
            b.close()


class OfflinePage:
    """A browser page that may reach only `origin`: every other request is aborted and
    recorded, and so are failed requests, error responses and script errors."""

    def __init__(self, browser: Any, origin: str) -> None:
        self.origin = origin
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.blocked: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        self.page.route("**/*", self._route)
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} {r.failure}"))
        self.page.on("response", self._response)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _route(self, route: Any) -> None:
        url = route.request.url
        if url == self.origin or url.startswith(self.origin + "/"):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("internetdisconnected")

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.failed.append(f"{response.url} answered {response.status}")

    def assert_nothing_blocked(self) -> None:
        assert self.blocked == [], f"{len(self.blocked)} requests left the server: " \
                                   f"{self.blocked}"

    def assert_offline_and_clean(self) -> None:
        self.assert_nothing_blocked()
        assert self.failed == [], self.failed
        assert self.errors == [], self.errors

    def close(self) -> None:
        self.context.close()


def operations(schema: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(method, path, operationId) of every operation in the schema."""
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    out = [(method, path, op["operationId"]) for path, item in schema["paths"].items()
           for method, op in item.items() if method in methods]
    for must in MUST_SHOW:
        assert must in {(m, p) for m, p, _ in out}, f"the schema lost {must}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("host", ["127.0.0.1", CLUSTER_HOST], ids=["loopback", "machine-name"])
def test_swagger_ui_renders_offline(server: tuple[int, dict[str, Any]], browser: Any,
                                    host: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    port, schema = server
    ops = operations(schema)
    origin = f"http://{host}:{port}"
    offline = OfflinePage(browser, origin)
    page = offline.page
    try:
        page.goto(f"{origin}/docs")
        offline.assert_nothing_blocked()  # the page's own scripts and styles, by "load"
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("dotsearch")
        expect(page.locator(".swagger-ui .opblock")).to_have_count(len(ops))
        for method, path in MUST_SHOW:
            block = page.locator(f".opblock-{method}",
                                 has=page.locator(f'.opblock-summary-path[data-path="{path}"]'))
            expect(block).to_be_visible()
        # The script works, not just the markup: open /v1/query and find "Try it out".
        query = page.locator(".opblock-post",
                             has=page.locator('.opblock-summary-path[data-path="/v1/query"]'))
        query.locator(".opblock-summary").click()
        expect(query.locator(".try-out__btn")).to_be_visible()
        expect(page.locator(".swagger-ui .errors-wrapper")).to_have_count(0)
        page.screenshot(path=str(tmp_path / "swagger.png"), full_page=False)
        offline.assert_offline_and_clean()
    finally:
        offline.close()


@pytest.mark.slow
@pytest.mark.parametrize("host", ["127.0.0.1", CLUSTER_HOST], ids=["loopback", "machine-name"])
def test_redoc_renders_offline(server: tuple[int, dict[str, Any]], browser: Any, host: str,
                               tmp_path: Path) -> None:
    from playwright.sync_api import expect

    port, schema = server
    ops = operations(schema)
    origin = f"http://{host}:{port}"
    offline = OfflinePage(browser, origin)
    page = offline.page
    try:
        page.goto(f"{origin}/redoc")
        offline.assert_nothing_blocked()
        expect(page.locator("h1").first).to_have_text(
            f"{schema['info']['title']} ({schema['info']['version']})")
        sections = page.locator("[data-section-id^='operation/']")
        expect(sections).to_have_count(len(ops))
        by_path = {(m, p): op_id for m, p, op_id in ops}
        for must in MUST_SHOW:
            section = page.locator(f'[data-section-id="operation/{by_path[must]}"]')
            expect(section).to_have_count(1)
            expect(section).to_contain_text(must[1])
        # The sidebar's logo comes from the server too, and loads.
        logo = page.locator("img[alt='redocly logo']")
        expect(logo).to_have_js_property("src", f"{origin}{REDOC_LOGO}")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                               arg=logo.element_handle())
        page.screenshot(path=str(tmp_path / "redoc.png"), full_page=False)
        offline.assert_offline_and_clean()
    finally:
        offline.close()

