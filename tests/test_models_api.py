"""Trained models over HTTP: train in the background (202), progress, metrics, predict from
vectors and images, the same answers as SQL and the Python API, cancel, bad input, keys."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from service.app import create_app
from service.settings import Settings
from tests.api_support import make_client

D = 16
N = 400
LABELS = ["cat", "dog", "owl"]


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((3, D)) * 1.5
    y = rng.choice(3, size=N, p=[0.5, 0.3, 0.2])
    return (centers[y] + rng.standard_normal((N, D))).astype(np.float32), y


def _seed(client: TestClient, headers: dict[str, str] | None = None) -> np.ndarray:
    """Collection `pts` (dot): vectors, label (every 10th NULL), year; its vectors."""
    x, y = _data()
    r = client.post("/v1/collections", headers=headers, json={
        "name": "pts", "dim": D, "metric": "dot", "columns": {"label": "VARCHAR",
                                                               "year": "BIGINT"}})
    assert r.status_code == 201, r.text
    meta = [{"label": None if i % 10 == 0 else LABELS[v], "year": 2000 + i % 4}
            for i, v in enumerate(y)]
    r = client.post("/v1/collections/pts/vectors", headers=headers, json={
        "ids": list(range(N)), "vectors": x.tolist(), "metadata": meta})
    assert r.status_code == 200, r.text
    return x


def _wait(client: TestClient, name: str, headers: dict[str, str] | None = None
          ) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = client.get(f"/v1/models/{name}", headers=headers).json()
        if info["state"] != "training":
            return dict(info)
        time.sleep(0.05)
    raise AssertionError("training did not finish")


@pytest.fixture
def client(tmp_path: Path) -> Any:
    with make_client(tmp_path) as c:
        yield c


def test_train_in_the_background_then_predict_everywhere(client: TestClient) -> None:
    x = _seed(client)
    r = client.post("/v1/models", json={"name": "kind", "collection": "pts",
                                        "label_column": "label", "kind": "mlp",
                                        "filter": "year > 2000", "epochs": 8, "seed": 2,
                                        "hidden": 32})
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["state"] == "training" and started["classes"] == LABELS
    assert started["progress"] == {"epoch": 0, "epochs": 8, "loss": None}
    info = _wait(client, "kind")
    assert info["state"] == "ready" and info["error"] is None
    assert info["progress"]["epoch"] == 8 and info["progress"]["loss"] > 0
    m = info["metrics"]
    assert m["accuracy"] >= 0.95 and set(m["per_class"]) == set(LABELS)
    assert m["confusion"]["labels"] == LABELS
    assert m["counts"]["skipped_null_labels"] > 0  # the filter keeps some NULL labels
    assert client.get("/v1/models").json()["models"][0]["name"] == "kind"
    # REST, SQL and the Python API agree.
    one = client.post("/v1/models/kind/predict", json={"vector": x[5].tolist()}).json()
    probs = one["probabilities"]
    assert len(probs) == 3 and probs[0]["label"] == one["label"]
    assert [p["probability"] for p in probs] == sorted((p["probability"] for p in probs),
                                                       reverse=True)
    many = client.post("/v1/models/kind/predict", json={"vectors": x[:50].tolist()}).json()
    rest = [res["label"] for res in many["results"]]
    assert many["results"][5]["label"] == one["label"]  # batched: equal up to rounding
    assert [p["probability"] for p in many["results"][5]["probabilities"]] == pytest.approx(
        [p["probability"] for p in probs])
    sql = client.post("/v1/query", json={
        "sql": "SELECT PREDICT(kind, feature), PREDICT_PROBA(kind, feature) FROM pts "
               "WHERE id < 50 ORDER BY id"}).json()
    assert [row[0] for row in sql["rows"]] == rest
    assert sql["rows"][5][1] == pytest.approx({p["label"]: p["probability"] for p in probs})
    catalog = client.app.state.services.catalog  # type: ignore[attr-defined]
    assert catalog.models.predict("kind", x[:50])[0] == rest
    r = client.delete("/v1/models/kind")
    assert r.status_code == 200 and r.json() == {"dropped": "kind"}
    assert client.get("/v1/models/kind").status_code == 404
    assert client.get("/v1/models").json() == {"models": []}


@pytest.mark.parametrize(("body", "status", "error", "message"), [
    ({"collection": "nope"}, 404, "not_found", "no collection named 'nope'"),
    ({"label_column": "nope"}, 422, "invalid_input", "has no column 'nope'"),
    ({"label_column": "feature"}, 422, "invalid_input", "vector column"),
    ({"filter": "label = 'cat'"}, 422, "invalid_input", "at least two classes"),
    ({"filter": "year > 3000"}, 400, "query_error", "no rows"),
    ({"filter": "nope > 1"}, 400, "query_error", "nope"),
    ({"kind": "svm"}, 422, "invalid_input", "kind"),
    ({"holdout": 0.99}, 422, "invalid_input", "holdout"),
    ({"epochs": 0}, 422, "invalid_input", "epochs"),
    ({"name": "has space"}, 422, "invalid_input", "name"),
])
def test_bad_training_requests_create_nothing(client: TestClient, body: dict[str, Any],
                                              status: int, error: str, message: str) -> None:
    _seed(client)
    spec = {"name": "m", "collection": "pts", "label_column": "label", **body}
    r = client.post("/v1/models", json=spec)
    assert (r.status_code, r.json()["error"]) == (status, error), r.text
    assert message in r.text
    assert client.get("/v1/models").json() == {"models": []}


def test_clash_still_training_cancel_and_dimension(client: TestClient) -> None:
    x = _seed(client)
    spec = {"name": "slow", "collection": "pts", "label_column": "label", "kind": "mlp",
            "epochs": 1000}
    assert client.post("/v1/models", json=spec).status_code == 202
    r = client.post("/v1/models", json={**spec, "name": "SLOW"})
    assert r.status_code == 409 and r.json()["error"] == "conflict"
    r = client.post("/v1/models/slow/predict", json={"vector": x[0].tolist()})
    assert r.status_code == 409 and r.json()["error"] == "model_not_ready"
    r = client.post("/v1/query", json={"sql": "SELECT PREDICT(slow, feature) FROM pts"})
    assert r.status_code == 409 and r.json()["error"] == "model_not_ready"
    r = client.delete("/v1/models/slow")
    assert r.status_code == 200 and r.json() == {"dropped": "slow"}
    info = client.get("/v1/models/slow").json()
    assert info["state"] == "cancelled" and info["metrics"] is None
    assert client.delete("/v1/models/slow").status_code == 200  # forgets it
    assert client.get("/v1/models/slow").status_code == 404
    assert client.delete("/v1/models/slow").status_code == 404
    # A finished model: a vector of another length is refused.
    quick = {**spec, "name": "quick", "kind": "logistic", "epochs": 3}
    assert client.post("/v1/models", json=quick).status_code == 202
    assert _wait(client, "quick")["state"] == "ready"
    r = client.post("/v1/models", json=quick)
    assert r.status_code == 409 and "already exists" in r.json()["message"]
    r = client.post("/v1/models/quick/predict", json={"vector": [1.0, 2.0]})
    assert r.status_code == 422 and f"takes {D}-d vectors, got 2-d" in r.json()["message"]
    for bad in ({}, {"vector": [1.0] * D, "vectors": [[1.0] * D]}, {"vectors": []}):
        r = client.post("/v1/models/quick/predict", json=bad)
        assert r.status_code == 422, (bad, r.text)
    nan = '{"vector": [' + ", ".join(["NaN"] * D) + "]}"
    r = client.post("/v1/models/quick/predict", content=nan.encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    r = client.post("/v1/models/quick/predict", content=b"x", headers={
        "content-type": "text/plain"})
    assert r.status_code == 415
    assert client.post("/v1/models/nope/predict", json={"vector": [1.0]}).status_code == 404


def test_keys_reads_may_predict_writes_may_train(tmp_path: Path) -> None:
    rw, ro = {"X-API-Key": "rw-secret"}, {"X-API-Key": "ro-secret"}
    with make_client(tmp_path, api_key="rw-secret", read_only_api_key="ro-secret") as c:
        x = _seed(c, rw)
        spec = {"name": "m", "collection": "pts", "label_column": "label", "epochs": 2}
        assert c.post("/v1/models", json=spec).status_code == 401
        assert c.post("/v1/models", json=spec, headers=ro).status_code == 403
        assert c.post("/v1/models", json=spec, headers=rw).status_code == 202
        assert _wait(c, "m", ro)["state"] == "ready"
        assert c.get("/v1/models", headers=ro).status_code == 200
        r = c.post("/v1/models/m/predict", json={"vector": x[0].tolist()}, headers=ro)
        assert r.status_code == 200
        assert c.delete("/v1/models/m", headers=ro).status_code == 403
        r = c.post("/v1/query", headers=ro, json={"sql": "DROP MODEL m"})
        assert r.status_code == 403
        assert c.delete("/v1/models/m", headers=rw).status_code == 200


def _crop(img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    w, h = img.size
    return img.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))


def test_photographs_flips_are_predicted_as_their_photograph(tmp_path: Path, featurizer: Any,
                                                             photos: Any, encode: Any) -> None:
    """Classes are photographs; training rows are crops of each; the held-out horizontal
    flips of the whole photographs are predicted as their photograph, over REST (an image
    upload) and in SQL."""
    names = ("astronaut", "coffee", "chelsea", "rocket")
    boxes = [(0, 0, 1, 1), (0, 0, 0.85, 0.85), (0.15, 0.15, 1, 1), (0.1, 0, 0.9, 0.9)]
    s = Settings(data_dir=tmp_path / "data", load_featurizer=False,  # type: ignore[call-arg]
                 _env_file=None)
    with TestClient(create_app(s, featurizer=featurizer)) as c:
        small = {}
        for name in names:
            img = photos[name].copy()
            img.thumbnail((224, 224))
            small[name] = img
        files = [("files", (f"{n}-{i}.png", encode(_crop(small[n], b), "PNG"), "image/png"))
                 for n in names for i, b in enumerate(boxes)]
        labels = ",".join(n for n in names for _ in boxes)
        r = c.post("/v1/collections/pics/images", files=files, data={"labels": labels})
        assert r.status_code == 200, r.text
        r = c.post("/v1/models", json={"name": "which", "collection": "pics",
                                       "label_column": "label", "holdout": 0, "epochs": 30,
                                       "seed": 0})
        assert r.status_code == 202, r.text
        info = _wait(c, "which")
        assert info["state"] == "ready" and info["metrics"]["evaluated_on"] == "train"
        flips = {n: encode(ImageOps.mirror(small[n]), "PNG") for n in names}
        for name in names:
            r = c.post("/v1/models/which/predict",
                       files={"file": (f"{name}-flip.png", flips[name], "image/png")})
            assert r.status_code == 200, r.text
            assert r.json()["label"] == name
        vectors = [c.post("/v1/featurize", files={"file": ("f.png", flips[n], "image/png")}
                          ).json()["vector"] for n in names]
        for name, vector in zip(names, vectors, strict=True):
            got = c.post("/v1/query", json={"sql": "SELECT PREDICT(which, :v)",
                                            "params": {"v": vector}}).json()
            assert got["rows"] == [[name]]
