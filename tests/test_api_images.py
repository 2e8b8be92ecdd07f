"""Image routes over HTTP with the seeded random featurizer: upload, search, classify."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from service.app import create_app
from service.settings import Settings

NAMES = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def small(photos, encode):
    """name -> (PIL image, JPEG bytes), shrunk to keep the tests fast."""
    out = {}
    for name in NAMES:
        img = photos[name].copy()
        img.thumbnail((320, 320))
        out[name] = (img, encode(img, "JPEG", quality=90))
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory, featurizer, small):
    data = tmp_path_factory.mktemp("api-images")
    s = Settings(data_dir=data, load_featurizer=False, max_image_pixels=2_000_000,  # type: ignore[call-arg]
                 _env_file=None)
    with TestClient(create_app(s, featurizer=featurizer)) as c:
        files = [("files", (f"{n}.jpg", small[n][1], "image/jpeg")) for n in NAMES]
        r = c.post("/v1/collections/pics/images", files=files,
                   data={"labels": "person,drink,cat,rocket"})
        assert r.status_code == 200, r.text
        assert r.json()["ids"] == [0, 1, 2, 3] and r.json()["count"] == 4
        yield c


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_upload_created_an_image_collection(client):
    info = client.get("/v1/collections/pics").json()
    assert info["dim"] == 2048 and info["metric"] == "cosine" and info["thumbnails"]
    assert info["columns"] == {"label": "VARCHAR", "filename": "VARCHAR"} and info["count"] == 4
    meta = client.get("/v1/collections/pics/vectors/2").json()["metadata"]
    assert meta == {"label": "cat", "filename": "chelsea.jpg"}
    health = client.get("/health").json()
    assert health["featurizer"]["weights"] == "random"
    assert {"name": "pics", "count": 4, "dim": 2048} in health["collections"]


def test_own_image_comes_back_first(client, small):
    for i, name in enumerate(NAMES):
        r = client.post("/v1/collections/pics/search/image",
                        files={"file": ("q.jpg", small[name][1], "image/jpeg")}, data={"k": 2})
        hits = r.json()["results"]
        assert hits[0]["id"] == i and hits[0]["score"] > 0.999, (name, hits)


def test_flipped_and_cropped_copies_find_their_original(client, small):
    for i, name in enumerate(NAMES):
        img = small[name][0]
        w, h = img.size
        for variant in (ImageOps.mirror(img), img.crop((w // 20, h // 20, w - w // 20,
                                                        h - h // 20))):
            r = client.post("/v1/collections/pics/search/image",
                            files={"file": ("q.jpg", jpeg(variant), "image/jpeg")},
                            data={"k": 3})
            assert i in [hit["id"] for hit in r.json()["results"]], name


def test_search_image_with_filter(client, small):
    r = client.post("/v1/collections/pics/search/image",
                    files={"file": ("q.jpg", small["chelsea"][1], "image/jpeg")},
                    data={"k": 5, "filter": "label <> 'cat'"})
    assert 2 not in [h["id"] for h in r.json()["results"]] and len(r.json()["results"]) == 3


def test_classify_by_neighbours(client, small):
    img = ImageOps.mirror(small["rocket"][0])
    r = client.post("/v1/collections/pics/classify",
                    files={"file": ("q.jpg", jpeg(img), "image/jpeg")}, data={"k": 1})
    body = r.json()
    assert body["label"] == "rocket" and body["votes"] == {"rocket": 1}
    assert body["neighbors"][0]["id"] == 3
    r = client.post("/v1/collections/pics/classify",
                    files={"file": ("q.jpg", jpeg(img), "image/jpeg")},
                    data={"k": 3, "label_column": "colour"})
    assert r.status_code == 422


def test_featurize(client, small, featurizer):
    r = client.post("/v1/featurize", files={"file": ("a.jpg", small["coffee"][1], "image/jpeg")})
    body = r.json()
    assert body["dim"] == 2048 and len(body["vector"]) == 2048
    assert body["weights"] == "random" and body["labels"] is None
    stored = client.get("/v1/collections/pics/vectors/1").json()["vector"]
    assert sum(a * b for a, b in zip(body["vector"], stored, strict=True)) > 0.999


def test_thumbnail(client):
    r = client.get("/v1/collections/pics/vectors/0/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert max(thumb.size) == 128
    assert client.get("/v1/collections/pics/vectors/99/thumbnail").status_code == 404


def test_bad_images_over_http(client, encode):
    r = client.post("/v1/featurize", files={"file": ("cat.jpg", b"hello, not an image",
                                                      "image/jpeg")})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    assert "known format" in r.json()["message"] and " at 0x" not in r.json()["message"]
    bomb = encode(Image.new("1", (3000, 3000)), "PNG")  # over this app's 2 M pixel limit
    r = client.post("/v1/featurize", files={"file": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    r = client.post("/v1/collections/pics/images",
                    files=[("files", ("a.jpg", b"junk", "image/jpeg"))])
    assert r.status_code == 415
    assert client.get("/v1/collections/pics").json()["count"] == 4  # nothing written
    r = client.post("/v1/collections/fresh/images",
                    files=[("files", ("a.jpg", b"junk", "image/jpeg"))])
    assert r.status_code == 415
    assert client.get("/v1/collections/fresh").status_code == 404  # not created either
    r = client.post("/v1/featurize")
    assert r.status_code == 422 and r.json()["error"] == "invalid_input"


def test_upload_mismatches(client, small):
    files = [("files", ("a.jpg", small["coffee"][1], "image/jpeg"))]
    r = client.post("/v1/collections/pics/images", files=files, data={"ids": "1,2"})
    assert r.status_code == 422
    r = client.post("/v1/collections/pics/images", files=files, data={"ids": "x"})
    assert r.status_code == 422
    client.post("/v1/collections", json={"name": "small", "dim": 8})
    r = client.post("/v1/collections/small/images", files=files)
    assert r.status_code == 422 and "2048" in r.json()["message"]


def test_upload_with_explicit_ids_replaces(client, small):
    files = [("files", ("c2.jpg", small["coffee"][1], "image/jpeg"))]
    r = client.post("/v1/collections/pics/images", files=files,
                    data={"ids": ["100"], "labels": ["drink"]})
    assert r.json()["ids"] == [100]
    r = client.get("/v1/query", params={"q": "SELECT id FROM pics WHERE label = 'drink' "
                                              "ORDER BY id"})
    assert r.json()["rows"] == [[1], [100]]
    # a repeated field is taken whole: a label may hold a comma
    r = client.post("/v1/collections/pics/images", files=files,
                    data={"ids": ["101"], "labels": ["coffee, black"]})
    assert client.get("/v1/collections/pics/vectors/101").json()["metadata"]["label"] == \
        "coffee, black"
    client.request("DELETE", "/v1/collections/pics/vectors", json={"ids": [100, 101]})


def test_oversized_image_is_413(tmp_path, featurizer, small):
    s = Settings(data_dir=tmp_path, load_featurizer=False, max_image_bytes=1000,  # type: ignore[call-arg]
                 _env_file=None)
    with TestClient(create_app(s, featurizer=featurizer)) as c:
        r = c.post("/v1/featurize", files={"file": ("a.jpg", small["coffee"][1], "image/jpeg")})
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
