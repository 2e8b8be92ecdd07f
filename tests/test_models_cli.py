"""`dotsearch train`: against a running server (HTTP) and on a data directory, with its
progress bar, metrics and one-line errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from typer.testing import CliRunner

from service.app import create_app
from service.catalog import Catalog
from service.cli import app
from service.client import Client
from service.settings import Settings
from tests.serve_support import free_port

runner = CliRunner()
D = 8
N = 240


def _fill(data_dir: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((2, D)) * 3
    y = rng.integers(0, 2, N)
    x = (centers[y] + rng.standard_normal((N, D))).astype(np.float32)
    with Catalog(data_dir, backend="cpu") as cat:
        cat.create_collection("pts", D, "dot", columns={"label": "VARCHAR"})
        cat.upsert("pts", np.arange(N), x, [{"label": ("yes", "no")[v]} for v in y])
    return x


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """A server (no featurizer) on a free port, in a thread, over a filled data directory."""
    x = _fill(tmp_path / "data")
    settings = Settings(data_dir=tmp_path / "data", load_featurizer=False,  # type: ignore[call-arg]
                        _env_file=None)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", x
    finally:
        srv.should_exit = True
        thread.join(30)


def test_train_over_http_with_a_progress_bar(server: tuple[str, np.ndarray]) -> None:
    url, x = server
    result = runner.invoke(app, ["train", "--collection", "pts", "--label-column", "label",
                                 "--name", "yn", "--kind", "mlp", "--epochs", "4", "--seed",
                                 "1", "--url", url])
    assert result.exit_code == 0, result.output
    assert "model yn (mlp, 8-d, 2 classes): accuracy 1.0000" in result.output
    assert "confusion" in result.output
    client = Client(url)
    assert client.model("yn")["state"] == "ready"
    got = [g["label"] for g in client.predict("yn", x[:3].tolist())]
    rows = client.query("SELECT PREDICT(yn, feature) FROM pts WHERE id < 3 ORDER BY id")
    assert got == [r[0] for r in rows["rows"]]
    again = runner.invoke(app, ["train", "-c", "pts", "-l", "label", "-n", "yn", "--url", url])
    assert again.exit_code == 1 and "conflict: model 'yn' already exists" in again.output
    missing = runner.invoke(app, ["train", "-c", "nope", "-l", "label", "-n", "x", "--url", url])
    assert missing.exit_code == 1 and "not_found: no collection named 'nope'" in missing.output
    assert client.drop_model("yn") == {"dropped": "yn"}


def test_train_on_a_data_directory(tmp_path: Path) -> None:
    x = _fill(tmp_path / "data")
    result = runner.invoke(app, ["train", "-c", "pts", "-l", "label", "-n", "local",
                                 "--epochs", "3", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert "model local (logistic" in result.output
    with Catalog(tmp_path / "data", backend="cpu") as cat:
        assert cat.models.get("local").state == "ready"
        assert len(cat.models.predict("local", x[:5])[0]) == 5
    bad = runner.invoke(app, ["train", "-c", "pts", "-l", "feature", "-n", "v",
                              "--data-dir", str(tmp_path / "data")])
    assert bad.exit_code == 1 and "vector column" in bad.output
