"""HTTP API through TestClient: collections, vectors (JSON and binary), search, SQL, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.api_support import make_client, seed_t


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


@pytest.fixture
def filled(client):
    """Collection `t`: 4-d cosine, label/year columns, ids 1..4."""
    seed_t(client)
    return client


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "message"}
    return str(body["error"])


def test_health_and_docs(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["backend"] in ("cpu", "gpu") and body["device"]
    assert body["featurizer"]["state"] == "disabled" and body["collections"] == []
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/collections/{name}/search", "/v1/query", "/v1/featurize",
                 "/v1/collections/{name}/images", "/v1/collections/{name}/classify"):
        assert path in paths


def test_collection_lifecycle(client):
    r = client.post("/v1/collections", json={"name": "c", "dim": 3, "metric": "dot",
                                             "columns": {"label": "VARCHAR"}})
    assert r.json() == {"name": "c", "dim": 3, "metric": "dot", "dtype": "float32",
                        "columns": {"label": "VARCHAR"}, "count": 0, "thumbnails": False,
                        "column_order": ["id", "feature", "label"], "vector_type": "VECTOR(3)",
                        "auto_increment": False, "shards": None}
    assert [c["name"] for c in client.get("/v1/collections").json()["collections"]] == ["c"]
    assert client.get("/v1/collections/c").json()["dim"] == 3
    assert error_of(client.post("/v1/collections", json={"name": "c", "dim": 3}), 409)
    assert client.delete("/v1/collections/c").json() == {"dropped": "c"}
    assert error_of(client.get("/v1/collections/c"), 404) == "not_found"
    assert error_of(client.delete("/v1/collections/c"), 404) == "not_found"


@pytest.mark.parametrize("body", [
    {"name": "bad name", "dim": 3}, {"name": "x", "dim": 0}, {"name": "x"},
    {"name": "x", "dim": 3, "metric": "hamming"}, {"name": "x", "dim": 3, "extra": 1}])
def test_bad_collection_bodies_are_422(client, body):
    assert error_of(client.post("/v1/collections", json=body), 422) == "invalid_input"


def test_search_single_batch_filter_threshold_offset(filled):
    r = filled.post("/v1/collections/t/search", json={"vector": [1, 0, 0, 0], "k": 2})
    body = r.json()
    assert [h["id"] for h in body["results"]] == [1, 3] and body["took_ms"] >= 0
    assert body["results"][0] == {"id": 1, "score": pytest.approx(1.0),
                                  "metadata": {"label": "cat", "year": 2010}}
    r = filled.post("/v1/collections/t/search",
                    json={"vectors": [[1, 0, 0, 0], [0, 1, 0, 0]], "k": 1})
    assert [[h["id"] for h in row] for row in r.json()["results"]] == [[1], [2]]
    r = filled.post("/v1/collections/t/search",
                    json={"vector": [1, 0, 0, 0], "k": 5, "filter": "year > 2015"})
    assert [h["id"] for h in r.json()["results"]] == [3, 2]
    r = filled.post("/v1/collections/t/search",
                    json={"vector": [1, 0, 0, 0], "k": 5, "threshold": 0.5})
    assert [h["id"] for h in r.json()["results"]] == [1, 3]
    r = filled.post("/v1/collections/t/search",
                    json={"vector": [1, 0, 0, 0], "k": 2, "offset": 1})
    assert [h["id"] for h in r.json()["results"]] == [3, 2]


@pytest.mark.parametrize("body", [
    {"k": 2}, {"vector": [1, 0, 0, 0], "vectors": [[1, 0, 0, 0]]},
    {"vector": [1, 0, 0, "x"]}, {"vector": [1, 0, 0, 0], "k": 0},
    {"vector": [1, 0, 0, 0], "threshold": "nan"}])
def test_bad_search_bodies_are_422(filled, body):
    assert error_of(filled.post("/v1/collections/t/search", json=body), 422) == "invalid_input"


def test_non_finite_floats_are_rejected(filled):
    for raw in ('{"vector": [1, 0, 0, NaN]}', '{"vector": [1, 0, 0, Infinity]}',
                '{"vector": [1e999, 0, 0, 0]}'):
        r = filled.post("/v1/collections/t/search", content=raw,
                        headers={"content-type": "application/json"})
        assert error_of(r, 422) == "invalid_input"
    r = filled.post("/v1/collections/t/vectors", content='{"vectors": [[NaN, 0, 0, 0]]}',
                    headers={"content-type": "application/json"})
    assert error_of(r, 422) == "invalid_input"


def test_search_errors(filled):
    r = filled.post("/v1/collections/nope/search", json={"vector": [1, 0, 0, 0]})
    assert error_of(r, 404) == "not_found"
    r = filled.post("/v1/collections/t/search", json={"vector": [1, 0, 0]})
    assert error_of(r, 422) == "invalid_input"  # wrong dimension
    r = filled.post("/v1/collections/t/search", json={"vector": [1, 0, 0, 0], "filter": "nope >"})
    assert error_of(r, 400) == "query_error"


def test_vectors_get_delete_and_assigned_ids(filled):
    r = filled.get("/v1/collections/t/vectors/2").json()
    assert r["id"] == 2 and r["metadata"] == {"label": "dog", "year": 2020}
    assert np.allclose(r["vector"], [0, 1, 0, 0])
    assert error_of(filled.get("/v1/collections/t/vectors/99"), 404) == "not_found"
    r = filled.request("DELETE", "/v1/collections/t/vectors", json={"ids": [2, 99]})
    assert r.json() == {"deleted": 1}
    assert filled.get("/v1/collections/t").json()["count"] == 3
    r = filled.post("/v1/collections/t/vectors", json={"vectors": [[0, 0, 0, 1]]})
    assert r.json()["ids"] == [5]
    r = filled.post("/v1/collections/t/vectors", json={"ids": [7], "vectors": [[1, 0, 0, 0]],
                                                       "metadata": [{"colour": "red"}]})
    assert error_of(r, 422) == "invalid_input"  # unknown column: nothing written
    assert error_of(filled.get("/v1/collections/t/vectors/7"), 404)
    r = filled.post("/v1/collections/t/vectors", json={"ids": [8, 9], "vectors": [[1, 0, 0, 0]]})
    assert error_of(r, 422) == "invalid_input"


def test_binary_upserts(filled):
    vecs = np.random.default_rng(0).standard_normal((3, 4)).astype("<f4")
    r = filled.post("/v1/collections/t/vectors?ids=10,11,12", content=vecs.tobytes(),
                    headers={"content-type": "application/octet-stream"})
    assert r.json() == {"upserted": 3, "ids": [10, 11, 12]}
    got = np.array(filled.get("/v1/collections/t/vectors/11").json()["vector"])
    assert np.allclose(got, vecs[1] / np.linalg.norm(vecs[1]), atol=1e-6)
    buf = io.BytesIO()
    np.save(buf, vecs.astype(np.float64))
    r = filled.post("/v1/collections/t/vectors?id_start=20", content=buf.getvalue(),
                    headers={"content-type": "application/x-npy"})
    assert r.json()["ids"] == [20, 21, 22]
    ids = io.BytesIO()
    np.save(ids, np.array([30, 31, 32], dtype=np.int64))
    buf.seek(0)
    r = filled.post("/v1/collections/t/vectors", files={
        "vectors": ("v.npy", buf.getvalue()), "ids": ("ids.npy", ids.getvalue()),
        "metadata": (None, '[{"label": "a"}, {"label": "b"}, {"year": 1999}]')})
    assert r.json()["ids"] == [30, 31, 32], r.text
    assert filled.get("/v1/collections/t/vectors/32").json()["metadata"]["year"] == 1999
    assert filled.get("/v1/collections/t").json()["count"] == 13
    r = filled.post("/v1/collections/t/vectors", content=vecs.tobytes()[:-4],
                    headers={"content-type": "application/octet-stream"})
    assert error_of(r, 422) == "invalid_input"
    bad = vecs.copy()
    bad[0, 0] = np.nan
    r = filled.post("/v1/collections/t/vectors", content=bad.tobytes(),
                    headers={"content-type": "application/octet-stream"})
    assert error_of(r, 422) == "invalid_input"
    r = filled.post("/v1/collections/t/vectors", content=b"x",
                    headers={"content-type": "text/plain"})
    assert error_of(r, 415) == "unsupported_media_type"


def test_sql_post_and_get(filled):
    r = filled.post("/v1/query", json={"sql": "SELECT id, label FROM t WHERE year > 2015 "
                                              "ORDER BY id"})
    body = r.json()
    assert body["columns"] == ["id", "label"] and body["rows"] == [[2, "dog"], [3, "cat"]]
    assert body["took_ms"] >= 0
    r = filled.post("/v1/query", json={
        "sql": "SELECT id FROM t ORDER BY DOT_PRODUCT(feature, :q) DESC LIMIT 1",
        "params": {"q": [0, 0, 1, 0]}})
    assert r.json()["rows"] == [[4]], r.text
    r = filled.get("/v1/query", params={"q": "SELECT count(*) AS n FROM t"})
    assert r.json()["rows"] == [[4]]
    assert error_of(filled.post("/v1/query", json={"sql": "SELEC 1"}), 400) == "query_error"
    assert error_of(filled.post("/v1/query", json={"sql": ""}), 422) == "invalid_input"
    assert error_of(filled.get("/v1/query"), 422) == "invalid_input"


def test_api_keys(tmp_path):
    with make_client(tmp_path, api_key="rw-secret", read_only_api_key="ro-secret") as c:
        assert c.get("/health").status_code == 200
        assert error_of(c.get("/v1/collections"), 401) == "unauthorized"
        bad = {"X-API-Key": "wrong"}
        assert error_of(c.get("/v1/collections", headers=bad), 401) == "unauthorized"
        ro, rw = {"X-API-Key": "ro-secret"}, {"X-API-Key": "rw-secret"}
        body = {"name": "k", "dim": 2}
        assert error_of(c.post("/v1/collections", json=body, headers=ro), 403) == "forbidden"
        assert c.post("/v1/collections", json=body, headers=rw).status_code == 201
        assert c.get("/v1/collections", headers=ro).status_code == 200
        r = c.post("/v1/collections/k/search", json={"vector": [1, 0]}, headers=ro)
        assert r.status_code == 200
        up = {"vectors": [[1, 0]]}
        assert error_of(c.post("/v1/collections/k/vectors", json=up, headers=ro), 403)
        assert c.post("/v1/query", json={"sql": "SHOW TABLES"}, headers=ro).status_code == 200
        r = c.post("/v1/query", json={"sql": "DROP TABLE k"}, headers=ro)
        assert error_of(r, 403) == "forbidden"
        r = c.post("/v1/query", json={"sql": "SELECT 1; DROP TABLE k"}, headers=ro)
        assert error_of(r, 403) == "forbidden"
        assert error_of(c.delete("/v1/collections/k", headers=ro), 403)
        assert c.delete("/v1/collections/k", headers=rw).status_code == 200


def test_body_limit_is_413(tmp_path):
    with make_client(tmp_path, max_body_bytes=1000) as c:
        c.post("/v1/collections", json={"name": "t", "dim": 4})
        r = c.post("/v1/collections/t/vectors", content=b"\0" * 4096,
                   headers={"content-type": "application/octet-stream"})
        assert error_of(r, 413) == "payload_too_large"


def test_unknown_route_and_method(client):
    assert error_of(client.get("/v1/nothing"), 404) == "not_found"
    assert error_of(client.put("/v1/collections"), 405) == "method_not_allowed"


def test_internal_errors_do_not_leak(tmp_path):
    s = Settings(data_dir=tmp_path / "d", load_featurizer=False, _env_file=None)  # type: ignore[call-arg]
    app = create_app(s)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
        assert r.status_code == 500
        assert r.json() == {"error": "internal_error", "message": "internal server error"}


def test_image_routes_503_without_featurizer(filled, encode):
    from PIL import Image

    png = encode(Image.new("RGB", (8, 8)), "PNG")
    r = filled.post("/v1/featurize", files={"file": ("a.png", png, "image/png")})
    assert error_of(r, 503) == "not_ready"


def test_metrics(filled):
    for _ in range(3):
        filled.post("/v1/collections/t/search", json={"vector": [1, 0, 0, 0]})
    text = filled.get("/metrics").text
    assert 'route="/v1/collections/{name}/search"' in text
    assert "dotsearch_search_batch_queries_count" in text
    assert 'dotsearch_collection_vectors{collection="t"} 4.0' in text


def test_concurrent_searches_are_batched(filled):
    import asyncio

    import httpx

    app = filled.app

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            rs = await asyncio.gather(*(ac.post("/v1/collections/t/search",
                                                json={"vector": [1, 0, i, 0], "k": 1})
                                        for i in range(16)))
        return [r.json()["results"][0]["id"] for r in rs]

    services = app.state.services
    services.batcher.window_s = 0.05
    before = services.metrics.batch_rows._sum.get()
    ids = asyncio.run(main())
    assert ids[0] == 1 and ids[15] == 4
    assert services.metrics.batch_rows._sum.get() - before == 16
    text = filled.get("/metrics").text
    calls = [line for line in text.splitlines()
             if line.startswith("dotsearch_search_batch_queries_count")]
    assert calls and float(calls[0].split()[-1]) < 16  # fewer engine calls than requests
