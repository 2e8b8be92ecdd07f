"""End to end: `dotsearch serve` as a subprocess; upload, search by image and SQL, restart."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.serve_support import free_port, start_server, wait_ready

pytestmark = pytest.mark.slow

NAMES = ("astronaut", "coffee", "chelsea")


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM: uvicorn drains, the lifespan closes storage, then re-raises the signal."""
    closed_before = log.read_text().count("storage closed")
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert log.read_text().count("storage closed") == closed_before + 1


def answers(base: str, query_jpeg: bytes) -> tuple[list, list]:
    r = httpx.post(f"{base}/v1/collections/e2e/search/image",
                   files={"file": ("q.jpg", query_jpeg, "image/jpeg")}, data={"k": 3},
                   timeout=60)
    assert r.status_code == 200, r.text
    hits = [(h["id"], round(h["score"], 5), h["metadata"]["label"]) for h in r.json()["results"]]
    sql = ("SELECT id, label FROM e2e ORDER BY DOT_PRODUCT(feature, "
           "(SELECT feature FROM e2e WHERE label = 'coffee')) DESC LIMIT 2")
    r = httpx.post(f"{base}/v1/query", json={"sql": sql}, timeout=60)
    assert r.status_code == 200, r.text
    return hits, r.json()["rows"]


def test_serve_upload_search_restart(tmp_path, photos, encode):
    from PIL import ImageOps

    port, data, log = free_port(), tmp_path / "data", tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    small = {}
    for name in NAMES:
        img = photos[name].copy()
        img.thumbnail((256, 256))
        small[name] = img
    proc = start_server(data, port, log)
    try:
        health = wait_ready(base, proc, log)
        assert health["featurizer"]["weights"] == "random" and health["backend"] == "cpu"
        files = [("files", (f"{n}.jpg", encode(small[n], "JPEG"), "image/jpeg")) for n in NAMES]
        r = httpx.post(f"{base}/v1/collections/e2e/images", files=files,
                       data={"labels": ",".join(NAMES)}, timeout=120)
        assert r.status_code == 200 and r.json()["ids"] == [0, 1, 2], r.text
        query = encode(ImageOps.mirror(small["chelsea"]), "JPEG")
        before = answers(base, query)
        assert before[0][0][0] == 2 and before[0][0][2] == "chelsea"
        assert before[1][0] == [1, "coffee"]
    finally:
        stop(proc, log)
    proc = start_server(data, port, log)
    try:
        health = wait_ready(base, proc, log)
        assert {"name": "e2e", "count": 3, "dim": 2048} in health["collections"]
        assert answers(base, query) == before
    finally:
        stop(proc, log)
