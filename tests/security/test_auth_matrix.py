"""Auth matrix generated from /openapi.json: every operation with no key, a wrong key, the
read-only key and the read-write key; the reviewed open routes; 401 before any body."""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.api_support import seed_t

RW_KEY, RO_KEY = "rw-key", "ro-key"
RW, RO = {"X-API-Key": RW_KEY}, {"X-API-Key": RO_KEY}
# Keys that must never authenticate: wrong, empty, wrong case, a prefix, a longer key.
BAD_KEYS = [None, "wrong-key", "", "RW-KEY", "ro-ke", "rw-key-x"]
ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
SCHEMA_METHODS = {"get", "head", "post", "put", "patch", "delete", "options", "trace"}

# Reviewed: the only routes that answer without a key (GET and HEAD only), each with a
# concrete URL to try. A new route that answers without a key fails
# test_server_leaves_open_exactly_the_reviewed_routes until it is reviewed and listed here.
OPEN_ROUTES = {
    "/health": "/health",
    "/metrics": "/metrics",
    "/": "/",
    "/static/{name}": "/static/app.css",
    "/docs": "/docs",
    "/docs/oauth2-redirect": "/docs/oauth2-redirect",
    "/redoc": "/redoc",
    "/openapi.json": "/openapi.json",
    "/docs/static/{name}": "/docs/static/swagger-ui.css",
    "/redoc/logo-mini.svg": "/redoc/logo-mini.svg",
}
OPEN_METHODS = ("GET", "HEAD")

# Reviewed: what the read-only key may do: every GET, and these POSTs. All else is a write.
READ_POSTS = frozenset({
    "/v1/collections/{name}/search",
    "/v1/collections/{name}/search/image",
    "/v1/collections/{name}/classify",
    "/v1/featurize",
    "/v1/query",
    "/v1/models/{name}/predict",
})

# Real values for path parameters: the seeded collection (and the model trained on it, both
# named t) and one of its ids.
PATH_VALUES = {"name": "t", "id": "1"}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = ("red.png", _png(), "image/png")

# Requests that an authorised key could really run against the seeded data (writes
# included, so "changes nothing" means something), and the status they then answer.
# The featurizer is disabled here, so the image routes answer 503 once past auth.
EXAMPLES: dict[tuple[str, str], tuple[dict[str, Any], int]] = {
    ("GET", "/health"): ({}, 200),
    ("GET", "/metrics"): ({}, 200),
    ("GET", "/v1/collections"): ({}, 200),
    ("POST", "/v1/collections"): ({"json": {"name": "u", "dim": 2}}, 201),
    ("GET", "/v1/collections/{name}"): ({}, 200),
    ("DELETE", "/v1/collections/{name}"): ({}, 200),
    ("POST", "/v1/collections/{name}/vectors"): (
        {"json": {"ids": [9], "vectors": [[0, 0, 0, 1]], "metadata": [{"label": "new"}]}}, 200),
    ("DELETE", "/v1/collections/{name}/vectors"): ({"json": {"ids": [1]}}, 200),
    ("GET", "/v1/collections/{name}/vectors/{id}"): ({}, 200),
    ("POST", "/v1/collections/{name}/search"): ({"json": {"vector": [1, 0, 0, 0], "k": 2}}, 200),
    ("POST", "/v1/collections/{name}/images"): ({"files": {"files": PNG}}, 503),
    ("POST", "/v1/collections/{name}/search/image"): ({"files": {"file": PNG}}, 503),
    ("POST", "/v1/collections/{name}/classify"): ({"files": {"file": PNG}}, 503),
    ("GET", "/v1/collections/{name}/vectors/{id}/thumbnail"): ({}, 404),  # none stored
    ("POST", "/v1/featurize"): ({"files": {"file": PNG}}, 503),
    ("POST", "/v1/query"): ({"json": {"sql": "SELECT COUNT(*) FROM t"}}, 200),
    ("GET", "/v1/query"): ({"params": {"q": "SELECT COUNT(*) FROM t"}}, 200),
    ("GET", "/v1/models"): ({}, 200),
    ("POST", "/v1/models"): ({"json": {"name": "u", "collection": "t", "label_column": "label",
                                       "epochs": 1}}, 202),
    ("GET", "/v1/models/{name}"): ({}, 200),
    ("DELETE", "/v1/models/{name}"): ({}, 200),
    ("POST", "/v1/models/{name}/predict"): ({"json": {"vector": [1, 0, 0, 0]}}, 200),
}


def make_settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, load_featurizer=False, api_key=RW_KEY,  # type: ignore[call-arg]
                    read_only_api_key=RO_KEY, _env_file=None)


def fetch_schema() -> dict[str, Any]:
    """The schema, fetched without a key from an app whose lifespan never runs."""
    unused = Path(tempfile.gettempdir()) / "dotsearch-auth-matrix-never-created"
    response = TestClient(create_app(make_settings(unused))).get("/openapi.json")
    assert response.status_code == 200, response.text
    schema: dict[str, Any] = response.json()
    return schema


SCHEMA = fetch_schema()
OPERATIONS = sorted((method.upper(), path) for path, ops in SCHEMA["paths"].items()
                    for method in ops if method in SCHEMA_METHODS)
OP_IDS = [f"{method} {path}" for method, path in OPERATIONS]


def is_open(method: str, path: str) -> bool:
    return method in OPEN_METHODS and path in OPEN_ROUTES


def is_read(method: str, path: str) -> bool:
    return method == "GET" or (method == "POST" and path in READ_POSTS)


def request_for(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The concrete URL and request arguments for one schema operation."""
    operation = SCHEMA["paths"][path][method.lower()]
    url = path
    for param in operation.get("parameters", []):
        if param["in"] == "path":
            if param["name"] not in PATH_VALUES:
                pytest.fail(f"{method} {path}: no real value for path parameter "
                            f"{param['name']!r}; add one to PATH_VALUES")
            url = url.replace("{" + param["name"] + "}", PATH_VALUES[param["name"]])
    assert "{" not in url, f"unfilled path parameter in {url}"
    kwargs, _ = EXAMPLES.get((method, path), ({}, 0))
    kwargs = dict(kwargs)
    for param in operation.get("parameters", []):
        if param["in"] == "query" and param.get("required"):
            assert param["name"] in kwargs.get("params", {}), (
                f"{method} {path}: required query parameter {param['name']!r} has no example")
    if "requestBody" in operation and not kwargs:
        kwargs["json"] = {}
    return url, kwargs


def send(client: TestClient, method: str, path: str, key: str | None, **override: Any) -> Any:
    url, kwargs = request_for(method, path)
    if "json" in override:  # the body is that JSON alone, whatever the example sends
        kwargs.pop("files", None)
    kwargs.update(override)
    headers = {} if key is None else {"X-API-Key": key}
    return client.request(method, url, headers=headers, **kwargs)


def seed(client: TestClient) -> None:
    """Collection `t`: 4-d cosine, label/year columns, ids 1..4, and model `t` trained on
    its labels (with the read-write key)."""
    seed_t(client, RW)
    r = client.post("/v1/models", headers=RW, json={"name": "t", "collection": "t",
                                                    "label_column": "label", "epochs": 1})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 30
    while client.get("/v1/models/t", headers=RW).json()["state"] == "training":
        assert time.monotonic() < deadline, "model t did not finish training"
        time.sleep(0.02)


def snapshot(client: TestClient) -> Any:
    """What a write would change, read with the read-write key."""
    collections = client.get("/v1/collections", headers=RW)
    row = client.get("/v1/collections/t/vectors/1", headers=RW)
    rows = client.post("/v1/query", headers=RW,
                       json={"sql": "SELECT id, label, year FROM t ORDER BY id"})
    models = client.get("/v1/models", headers=RW)
    assert collections.status_code == 200, collections.text
    return (collections.json(), (row.status_code, row.json()),
            (rows.status_code, rows.json().get("rows")), models.json())


def assert_error(response: Any, status: int, error: str) -> None:
    assert response.status_code == status, (response.request.method, response.request.url,
                                            response.status_code, response.text)
    body = response.json()
    assert body["error"] == error, body
    assert "detail" not in body, body


def assert_authorised(response: Any, method: str, path: str) -> None:
    """Past auth, and (for a reviewed operation) the status its example answers."""
    assert response.status_code not in (401, 403, 500), (method, path, response.text)
    if (method, path) in EXAMPLES:
        assert response.status_code == EXAMPLES[(method, path)][1], (method, path, response.text)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Any]]:
    """One seeded app for the requests that must change nothing, and its state."""
    data_dir = tmp_path_factory.mktemp("auth-matrix") / "data"
    with TestClient(create_app(make_settings(data_dir))) as client:
        seed(client)
        yield client, snapshot(client)


@contextmanager
def seeded_app(data_dir: Path) -> Iterator[TestClient]:
    """A seeded app of its own, for requests that really write."""
    with TestClient(create_app(make_settings(data_dir))) as client:
        seed(client)
        yield client


# ---- the schema the matrix is generated from -------------------------------------------

def test_matrix_covers_the_api_and_the_schema_is_the_served_one(shared):
    client, _ = shared
    assert set(OPERATIONS) == set(EXAMPLES), (
        "operations without a reviewed example (or examples for gone operations): "
        f"{set(OPERATIONS) ^ set(EXAMPLES)}")
    assert any(not is_read(m, p) for m, p in OPERATIONS)
    assert any(is_read(m, p) and not is_open(m, p) for m, p in OPERATIONS)
    for key in (None, RW_KEY, RO_KEY):
        headers = {} if key is None else {"X-API-Key": key}
        assert client.get("/openapi.json", headers=headers).json() == SCHEMA


# ---- every operation, every key ---------------------------------------------------------

@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=OP_IDS)
def test_without_a_valid_key(shared, method, path):
    client, before = shared
    for key in BAD_KEYS:
        response = send(client, method, path, key)
        if is_open(method, path):
            assert_authorised(response, method, path)
        else:
            assert_error(response, 401, "unauthorized")
            assert response.headers.get("WWW-Authenticate") == "X-API-Key", key
    assert snapshot(client) == before


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=OP_IDS)
def test_read_only_key(shared, method, path):
    client, before = shared
    if is_read(method, path):
        assert_authorised(send(client, method, path, RO_KEY), method, path)
        return
    # A write the read-write key could really run, and a body that is only valid JSON:
    # both refused by the authorising dependency, and nothing changes.
    assert_error(send(client, method, path, RO_KEY), 403, "forbidden")
    assert_error(send(client, method, path, RO_KEY, json={}), 403, "forbidden")
    assert snapshot(client) == before


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=OP_IDS)
def test_read_write_key(shared, tmp_path, method, path):
    def check(client: TestClient) -> Any:
        response = send(client, method, path, RW_KEY)
        assert_authorised(response, method, path)
        return response

    if is_read(method, path):
        client, before = shared
        check(client)
        assert snapshot(client) == before
        return
    with seeded_app(tmp_path / "data") as client:  # this request really writes
        before = snapshot(client)
        if check(client).status_code < 300:
            assert snapshot(client) != before, "a successful write changed nothing"


def test_bare_json_bodies_reach_validation_for_valid_keys(shared):
    """A bare `{}` gets past auth for the read-write key (and the read-only key on reads)."""
    client, before = shared
    for method, path in OPERATIONS:
        if "requestBody" not in SCHEMA["paths"][path][method.lower()]:
            continue
        keys = [RW_KEY, RO_KEY] if is_read(method, path) else [RW_KEY]
        for key in keys:
            response = send(client, method, path, key, json={})
            assert response.status_code not in (401, 403, 500), (method, path, response.text)
    assert snapshot(client) == before


# ---- the open routes -------------------------------------------------------------------

def walk_routes(routes: Any, prefix: str = "") -> Iterator[tuple[str, frozenset[str]]]:
    """(path template, methods) of every route the app serves, schema or not."""
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's included routers
        if included is not None:
            context = getattr(route, "include_context", None)
            yield from walk_routes(included.routes, prefix + getattr(context, "prefix", ""))
        elif getattr(route, "methods", None) is not None:
            yield prefix + route.path, frozenset(route.methods)
        elif getattr(route, "routes", None):  # a Mount
            yield from walk_routes(route.routes, prefix + route.path)


def concrete(template: str) -> str:
    if template in OPEN_ROUTES:
        return OPEN_ROUTES[template]
    url = template
    for name, value in PATH_VALUES.items():
        url = url.replace("{" + name + "}", value)
    assert "{" not in url, f"no value for a path parameter of {template}"
    return url


def test_server_leaves_open_exactly_the_reviewed_routes(shared):
    client, before = shared
    templates = {path for path, _ in walk_routes(client.app.routes)}
    assert {path for _, path in OPERATIONS} <= templates, "the route walk missed routes"
    assert set(OPEN_ROUTES) <= templates, "a reviewed open route is gone"
    answered = set()
    for template in sorted(templates):
        for method in ALL_METHODS:
            response = client.request(method, concrete(template))
            if response.status_code != 401:
                answered.add((method, template))
            elif method != "HEAD":
                assert response.json()["error"] == "unauthorized"
    assert answered == {(m, path) for path in OPEN_ROUTES for m in OPEN_METHODS}
    assert snapshot(client) == before


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
def test_open_pages_are_served_without_a_key(shared, key):
    client, _ = shared
    headers = {} if key is None else {"X-API-Key": key}
    page = client.get("/", headers=headers)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()
    for name, kind in (("app.css", "text/css"), ("app.js", "text/javascript")):
        static = client.get(f"/static/{name}", headers=headers)
        assert static.status_code == 200 and static.headers["content-type"].startswith(kind)
    for docs in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        response = client.get(docs, headers=headers)
        assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    assert client.get("/health", headers=headers).json()["status"] == "ok"
    assert client.get("/metrics", headers=headers).status_code == 200
    assert "paths" in client.get("/openapi.json", headers=headers).json()
    # Open means GET and HEAD only: another method on an open path needs a key.
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        assert_error(client.request(method, "/health", headers=headers), 401, "unauthorized")


# ---- authentication precedes body parsing and routing ----------------------------------

@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
@pytest.mark.parametrize("path", ["/v1/collections", "/v1/query"])
def test_malformed_json_without_a_valid_key_is_401(shared, path, key):
    client, before = shared
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    response = client.post(path, headers=headers, content=b"{not json")
    assert_error(response, 401, "unauthorized")
    assert "json" not in response.json()["message"].lower()
    assert snapshot(client) == before


UNKNOWN_PATHS = ["/nope", "/v1/nope", "/v1/collections/t/nope", "/health/", "/HEALTH",
                 "/docs/", "/static", "/openapi.json/x", "/v2/collections"]


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_unknown_paths_without_a_valid_key_are_401(shared, method, key):
    client, _ = shared
    headers = {} if key is None else {"X-API-Key": key}
    for path in UNKNOWN_PATHS:
        assert_error(client.request(method, path, headers=headers), 401, "unauthorized")
    # ...and with a valid key the same paths are merely unknown.
    for path in UNKNOWN_PATHS:
        if path in ("/health/", "/docs/"):
            continue  # a redirect to the open route is fine for an authenticated client
        for valid in (RO, RW):
            response = client.request(method, path, headers=valid, follow_redirects=False)
            assert response.status_code in (404, 405), (method, path, response.text)


def test_static_prefix_does_not_reach_other_routes(shared):
    client, _ = shared
    for url in ("/static/..%2Fv1%2Fcollections", "/static/%2E%2E/v1/collections"):
        response = client.get(url)
        assert response.status_code in (401, 404), (url, response.text)
        assert "collections" not in response.json(), response.text
