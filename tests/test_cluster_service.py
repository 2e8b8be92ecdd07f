"""The service on the ray backend: the same answers as on the CPU over HTTP (REST, SQL, an
image upload), shards in /health, /metrics and EXPLAIN, and failures that answer 503 and
never a partial answer."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.catalog import Catalog
from service.settings import Settings
from tests.serve_support import free_port, start_server, stop_server, wait_ready

ray = pytest.importorskip("ray")

N, D = 240, 8
LABELS = ("cat", "dog", "bird")


def settings(path: Path, backend: str, **extra: Any) -> Settings:
    return Settings(data_dir=path, backend=backend, load_featurizer=False,  # type: ignore[call-arg]
                    shards=3, shard_timeout_s=5.0, shard_check_s=0.2, _env_file=None, **extra)


def seed(client: TestClient, vectors: np.ndarray) -> None:
    r = client.post("/v1/collections", json={"name": "t", "dim": D, "metric": "dot",
                                             "columns": {"label": "VARCHAR", "n": "BIGINT"}})
    assert r.status_code == 201, r.text
    r = client.post("/v1/collections/t/vectors", json={
        "ids": list(range(N)), "vectors": vectors.tolist(),
        "metadata": [{"label": LABELS[i % 3], "n": i} for i in range(N)]})
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    # Small integers: exact dot products, and ties to break by id.
    return np.random.default_rng(5).integers(-3, 4, (N, D)).astype(np.float32)


@pytest.fixture(scope="module")
def pair(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory, data: np.ndarray,
         featurizer: Any) -> Iterator[tuple[TestClient, TestClient]]:
    """The same data served by the CPU backend and by the ray backend (3 shards)."""
    clients = [TestClient(create_app(settings(tmp_path_factory.mktemp(b), b),
                                     featurizer=featurizer)) for b in ("cpu", "ray")]
    with clients[0] as cpu, clients[1] as sharded:
        for c in (cpu, sharded):
            seed(c, data)
        yield cpu, sharded


QUERIES = [
    "SELECT id, feature <*> :q AS score FROM t WHERE label = 'cat' ORDER BY score DESC LIMIT 7",
    "SELECT id FROM t ORDER BY DOT_PRODUCT(feature, (SELECT feature FROM t WHERE id = 17)) DESC "
    "LIMIT 5",
    "SELECT label, COUNT(*) AS n FROM (SELECT label FROM t ORDER BY feature <*> :q DESC "
    "LIMIT 15) GROUP BY label ORDER BY n DESC, label",
    "SELECT id, feature <*> :q AS score FROM t WHERE score > 6 ORDER BY id",
    "SELECT id, feature <-> :q AS d FROM t ORDER BY d LIMIT 4 OFFSET 3",
]


@pytest.mark.parametrize("sql", QUERIES)
def test_sql_answers_equal_the_cpu_backend(pair: tuple[TestClient, TestClient], sql: str
                                           ) -> None:
    q = [1, 0, -1, 2, 0, 1, 1, -2]
    got = [c.post("/v1/query", json={"sql": sql, "params": {"q": q}}) for c in pair]
    assert [r.status_code for r in got] == [200, 200], got[1].text
    assert got[0].json()["rows"] == got[1].json()["rows"]


def test_rest_search_and_image_upload_equal_the_cpu_backend(
        pair: tuple[TestClient, TestClient], photos: dict[str, Any]) -> None:
    body = {"vectors": [[1, 1, 0, 0, 2, 0, -1, 0], [0, 0, 0, 0, 0, 0, 0, 1]], "k": 9,
            "filter": "n % 2 = 0"}
    got = [c.post("/v1/collections/t/search", json=body).json() for c in pair]
    assert got[0]["results"] == got[1]["results"]
    buf = io.BytesIO()
    photos["coffee"].convert("RGB").resize((160, 160)).save(buf, "JPEG")
    files = [("files", ("coffee.jpg", buf.getvalue(), "image/jpeg"))]
    for c in pair:
        r = c.post("/v1/collections/pics/images", files=files, data={"labels": "drink"})
        assert r.status_code == 200, r.text
    found = [c.post("/v1/collections/pics/search/image", files=[
        ("file", ("q.jpg", buf.getvalue(), "image/jpeg"))], data={"k": "1"}).json()
        for c in pair]
    assert found[0]["results"][0]["id"] == found[1]["results"][0]["id"]


def test_shards_are_visible(pair: tuple[TestClient, TestClient]) -> None:
    _, sharded = pair
    health = sharded.get("/health").json()
    entry = next(c for c in health["collections"] if c["name"] == "t")
    assert [s["index"] for s in entry["shards"]] == [0, 1, 2]
    assert {s["state"] for s in entry["shards"]} == {"ready"}
    assert sum(s["rows"] for s in entry["shards"]) == N
    assert all(s["node"] and s["device"] for s in entry["shards"])
    metrics = sharded.get("/metrics").text
    assert 'dotsearch_shard_state{collection="t",shard="2",state="ready"} 1.0' in metrics
    assert "dotsearch_shard_latency_seconds" in metrics
    plan = sharded.post("/v1/query", json={"sql": "EXPLAIN SELECT id FROM t ORDER BY feature "
                                           "<*> '[1,0,0,0,0,0,0,0]' DESC LIMIT 3"}).json()
    assert "shards: 3 of 3 asked" in plan["explain"]


def test_collection_shard_count_by_rest_and_sql(pair: tuple[TestClient, TestClient]) -> None:
    _, sharded = pair
    r = sharded.post("/v1/collections", json={"name": "four", "dim": 2, "shards": 4})
    assert r.status_code == 201 and r.json()["shards"] == 4
    r = sharded.post("/v1/query", json={
        "sql": "CREATE TABLE five (id BIGINT PRIMARY KEY, v VECTOR(2)) "
               "COMMENT = 'metric=cosine shards=5'"})
    assert r.status_code == 200, r.text
    health = sharded.get("/health").json()["collections"]
    counts = {c["name"]: len(c["shards"]) for c in health if c["name"] in ("four", "five")}
    assert counts == {"four": 4, "five": 5}
    for name in ("four", "five"):
        assert sharded.delete(f"/v1/collections/{name}").status_code == 200


def _index(catalog: Catalog, name: str) -> Any:
    return catalog.collection(name).index


def _reference(vectors: dict[int, np.ndarray], q: np.ndarray, k: int) -> list[int]:
    ids = np.array(sorted(vectors), dtype=np.int64)
    scores = np.stack([vectors[int(i)] for i in ids]).astype(np.float64) @ q
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].tolist()


def test_a_killed_shard_answers_503_never_partial_and_recovers(
        ray_cluster: None, tmp_path: Path, data: np.ndarray) -> None:
    """Searches and upserts stream while one shard actor is killed: every search is exact
    or a 503; every acknowledged write is there once Ray restarts the shard."""
    app = create_app(settings(tmp_path, "ray"))
    with TestClient(app) as client:
        seed(client, data)
        catalog = app.state.services.catalog
        stored = {i: data[i] for i in range(N)}
        lock = threading.Lock()
        outcomes: dict[str, int] = {"exact": 0, "503": 0, "wrong": 0, "acked": 0}
        errors: list[str] = []
        stop = threading.Event()
        q = np.array([2, -1, 0, 1, 1, 0, -2, 1], dtype=np.float64)

        pending: dict[int, np.ndarray] = {}  # a write on its way: either answer is exact
        states = [dict(stored)]  # what was acknowledged, after each write

        def search() -> None:
            while not stop.is_set():
                with lock:
                    first = len(states) - 1
                r = client.post("/v1/collections/t/search", json={"vector": q.tolist(),
                                                                   "k": 10})
                with lock:  # exact at some moment the search could have seen
                    seen = [*states[first:], {**states[-1], **pending}]
                    if r.status_code == 503:
                        outcomes["503"] += 1
                    elif r.status_code == 200 and [h["id"] for h in r.json()["results"]] in [
                            _reference(state, q, 10) for state in seen]:
                        outcomes["exact"] += 1
                    else:
                        outcomes["wrong"] += 1
                        errors.append(r.text)

        def write() -> None:
            i = N
            rng = np.random.default_rng(9)
            while not stop.is_set():
                vec = rng.integers(-3, 4, D).astype(np.float32)
                with lock:
                    pending[i] = vec
                r = client.post("/v1/collections/t/vectors",
                                json={"ids": [i], "vectors": [vec.tolist()]})
                with lock:
                    del pending[i]
                    # A shard that dies after the commit: stored, and said so.
                    if r.status_code == 200 or "was stored" in r.text:
                        stored[i] = vec
                        states.append(dict(stored))
                        outcomes["acked"] += 1
                    elif r.status_code == 503:
                        outcomes["503"] += 1
                    else:
                        errors.append(r.text)
                i += 1
                time.sleep(0.01)

        threads = [threading.Thread(target=f) for f in (search, write)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        ray.kill(_index(catalog, "t").handles[1], no_restart=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and outcomes["503"] == 0:
            time.sleep(0.05)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _all_ready(client):
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        assert outcomes["wrong"] == 0 and not errors, (outcomes, errors[:3])
        assert outcomes["503"] > 0 and outcomes["exact"] > 0 and outcomes["acked"] > 0, outcomes
        assert _all_ready(client)
        # Every acknowledged write is there, and answers equal the reference again.
        r = client.post("/v1/collections/t/search", json={"vector": q.tolist(), "k": 25})
        assert [h["id"] for h in r.json()["results"]] == _reference(stored, q, 25)
        count = client.post("/v1/query", json={"sql": "SELECT COUNT(*) FROM t"}).json()
        assert count["rows"] == [[len(stored)]] == [[len(_index(catalog, "t"))]]


def _all_ready(client: TestClient) -> bool:
    health = client.get("/health").json()
    return all(s["state"] == "ready" for c in health["collections"]
               for s in c.get("shards", []))


def test_writes_with_a_shard_down_are_refused_and_change_nothing(
        ray_cluster: None, tmp_path: Path, data: np.ndarray) -> None:
    app = create_app(settings(tmp_path, "ray").model_copy(update={"shard_check_s": 600.0}))
    with TestClient(app) as client:
        seed(client, data)
        index = _index(app.state.services.catalog, "t")
        ray.kill(index.handles[0], no_restart=False)
        r = client.post("/v1/collections/t/search", json={"vector": [1] * D, "k": 3})
        assert r.status_code == 503 and r.json()["error"] == "not_ready"
        assert "shard 0" in r.json()["message"]
        r = client.post("/v1/collections/t/vectors", json={"ids": [N + 1],
                                                           "vectors": [[1] * D]})
        assert r.status_code == 503, r.text
        sql = client.post("/v1/query", json={"sql": "SELECT id FROM t ORDER BY feature <*> "
                                             "'[1,1,1,1,1,1,1,1]' DESC LIMIT 2"})
        assert sql.status_code == 503
        count = client.post("/v1/query", json={"sql": "SELECT COUNT(*) FROM t"}).json()
        assert count["rows"] == [[N]]  # nothing was written
        deadline = time.monotonic() + 60  # Ray restarts the actor; the watch reloads it
        while not app.state.services.catalog._shard_watch.check_now():
            assert time.monotonic() < deadline, "the shard never came back"
            time.sleep(0.2)
        r = client.post("/v1/collections/t/vectors", json={"ids": [N + 1],
                                                           "vectors": [[1] * D]})
        assert r.status_code == 200, r.text
        r = client.post("/v1/collections/t/search", json={"vector": [1] * D, "k": 1})
        assert r.status_code == 200 and len(_index(app.state.services.catalog, "t")) == N + 1


def test_serve_with_the_ray_backend_stops_gracefully(tmp_path: Path) -> None:
    """`dotsearch serve --backend ray`: a real server answers, and SIGTERM still finishes
    gracefully (Ray's own SIGTERM handler, which exits at once, is not left in place)."""
    port, log = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    proc = start_server(tmp_path / "data", port, log, None, "--backend", "ray", "--shards", "2")
    try:
        health = wait_ready(base, proc, log)
        assert health["backend"] == "ray"
        assert httpx.post(f"{base}/v1/collections", json={"name": "t", "dim": 2}).status_code == 201
        r = httpx.post(f"{base}/v1/collections/t/vectors", json={"vectors": [[1, 0], [0, 1]]})
        assert r.status_code == 200
        hits = httpx.post(f"{base}/v1/collections/t/search", json={"vector": [1, 0.1], "k": 1})
        assert hits.json()["results"][0]["id"] == 0
        shards = httpx.get(f"{base}/health").json()["collections"][0]["shards"]
        assert len(shards) == 2 and {s["state"] for s in shards} == {"ready"}
    finally:
        stop_server(proc)
    # uvicorn re-raises SIGTERM once it has shut down gracefully: -15 is a clean stop here.
    assert proc.returncode in (0, -15), log.read_text()
    assert "storage closed" in log.read_text() and "Finished server process" in log.read_text()
