"""HTTP test helpers shared by the API and security tests: an app client, a seeded collection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def make_client(tmp_path: Path, **settings: Any) -> TestClient:
    """A TestClient for an app on tmp_path/data (featurizer off unless asked for)."""
    settings.setdefault("load_featurizer", False)
    s = Settings(data_dir=tmp_path / "data", _env_file=None, **settings)  # type: ignore[call-arg]
    return TestClient(create_app(s))


def seed_t(client: TestClient, headers: dict[str, str] | None = None) -> None:
    """Collection `t`: 4-d cosine, label/year columns, ids 1..4."""
    r = client.post("/v1/collections", headers=headers, json={
        "name": "t", "dim": 4, "columns": {"label": "VARCHAR", "year": "BIGINT"}})
    assert r.status_code == 201, r.text
    r = client.post("/v1/collections/t/vectors", headers=headers, json={
        "ids": [1, 2, 3, 4],
        "vectors": [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]],
        "metadata": [{"label": "cat", "year": 2010}, {"label": "dog", "year": 2020},
                     {"label": "cat", "year": 2021}, {}]})
    assert r.status_code == 200 and r.json() == {"upserted": 4, "ids": [1, 2, 3, 4]}, r.text
