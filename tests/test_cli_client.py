"""The CLI beside a running server: query and ingest over HTTP, the locked-directory line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from service.cli import app, lock_holder
from tests.serve_support import free_port, start_server, wait_ready

runner = CliRunner()


class LiveServer:
    def __init__(self, base: str, data_dir: Path, pid: int) -> None:
        self.base, self.data_dir, self.pid = base, data_dir, pid


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`dotsearch serve --weights random --backend cpu` on a free port of 127.0.0.1."""
    root = tmp_path_factory.mktemp("live")
    port, log = free_port(), root / "server.log"
    proc = start_server(root / "data", port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        yield LiveServer(base, root / "data", proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
            proc.wait()


def _image_folder(root: Path) -> Path:
    """Two small images in two subfolders, plus a file that is not an image."""
    folder = root / "imgs"
    for sub, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (folder / sub).mkdir(parents=True)
        img = Image.new("RGB", (64, 48), colour)
        img.paste((250, 250, 250), (8, 8, 24, 24))
        img.save(folder / sub / f"{sub}.png")
    (folder / "blue" / "broken.jpg").write_bytes(b"not an image at all")
    return folder


def test_query_goes_to_the_running_server(server: LiveServer) -> None:
    created = httpx.post(f"{server.base}/v1/collections",
                         json={"name": "docs", "dim": 2, "metric": "dot",
                               "columns": {"label": "VARCHAR"}})
    assert created.status_code == 201, created.text
    httpx.post(f"{server.base}/v1/collections/docs/vectors",
               json={"ids": [1, 2], "vectors": [[1, 0], [0, 1]],
                     "metadata": [{"label": "cat"}, {"label": "dog"}]}).raise_for_status()
    # The server holds the data directory: only an HTTP query can answer this.
    result = runner.invoke(app, ["query", "SELECT id, label FROM docs ORDER BY id",
                                 "--url", server.base])
    assert result.exit_code == 0, result.output
    assert "cat" in result.output and "dog" in result.output and "2 rows" in result.output


def test_query_error_over_http_is_one_line(server: LiveServer) -> None:
    result = runner.invoke(app, ["query", "SELEC nonsense", "--url", server.base])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "query_error" in result.output and "Traceback" not in result.output
    assert len([ln for ln in result.output.splitlines() if ln.strip()]) == 1


def test_ingest_goes_to_the_running_server(server: LiveServer, tmp_path: Path) -> None:
    folder = _image_folder(tmp_path)
    args = ["ingest", str(folder), "--collection", "pics", "--url", server.base,
            "--batch-size", "2", "--label-from-dir"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 added, 0 already there, 1 bad, of 3 files" in result.output
    assert "broken.jpg" in result.output
    info = httpx.get(f"{server.base}/v1/collections/pics").json()
    assert info["count"] == 2 and info["thumbnails"] is True
    rows = httpx.post(f"{server.base}/v1/query", json={
        "sql": "SELECT label, filename FROM pics ORDER BY label"}).json()["rows"]
    assert rows == [["blue", "blue/blue.png"], ["red", "red/red.png"]]
    again = runner.invoke(app, args)  # resumable: the server's filenames are skipped
    assert again.exit_code == 0, again.output
    assert "0 added, 2 already there, 1 bad" in again.output
    assert httpx.get(f"{server.base}/v1/collections/pics").json()["count"] == 2


def test_locked_directory_is_one_line_naming_the_process(server: LiveServer) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: the CLI opens the files
    result = runner.invoke(app, ["query", "SELECT 1", "--url", closed,
                                 "--data-dir", str(server.data_dir)])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # no uncaught error
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and "StorageError" not in result.output
    line = lines[0]
    assert f"process {server.pid}" in line and "locked" in line
    assert "stop that process" in line and "--url" in line and "dotsearch serve" in line


def test_ingest_into_a_directory_held_by_another_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from service.catalog import Catalog; "
         f"c = Catalog({str(data)!r}, 'cpu'); print('open', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"open"
        result = runner.invoke(app, ["ingest", str(_image_folder(tmp_path)), "-c", "pics",
                                     "--data-dir", str(data)])
    finally:
        holder.communicate(b"", timeout=60)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert f"locked by process {holder.pid}" in lines[0] and "Traceback" not in result.output


def test_lock_holder_reads_duckdb_message() -> None:
    cause = RuntimeError('IO Error: Could not set lock on file "/d/dotsearch.duckdb": '
                         "Conflicting lock is held in /usr/bin/python3.11 (PID 4693) by user "
                         "x. See also https://duckdb.org/docs/current/connect/concurrency")
    try:
        try:
            raise cause
        except RuntimeError as exc:
            raise ValueError("cannot open /d/dotsearch.duckdb") from exc
    except ValueError as outer:
        assert lock_holder(outer) == ("4693", "/usr/bin/python3.11")
    assert lock_holder(RuntimeError("a block was corrupt")) is None


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in server that answers /health and /v1/query and keeps each X-API-Key."""

    keys: ClassVar[list[str | None]] = []

    def _json(self, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json({"status": "ok", "featurizer": {"state": "ready"}, "collections": []})

    def do_POST(self) -> None:
        self.keys.append(self.headers.get("X-API-Key"))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._json({"columns": ["x"], "types": ["INTEGER"], "rows": [[7]], "took_ms": 0.1})

    def log_message(self, *args: Any) -> None:
        pass


def test_api_key_from_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    _Recorder.keys = []
    try:
        flag = runner.invoke(app, ["query", "SELECT 7", "--url", base, "--api-key", "k1"])
        monkeypatch.setenv("DOTSEARCH_API_KEY", "k2")
        monkeypatch.setenv("DOTSEARCH_URL", base)
        env = runner.invoke(app, ["query", "SELECT 7"])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert flag.exit_code == 0 and env.exit_code == 0, flag.output + env.output
    assert "1 rows" in flag.output and "1 rows" in env.output
    assert _Recorder.keys == ["k1", "k2"]


@pytest.mark.slow
def test_demo_goes_to_the_running_server(server: LiveServer) -> None:
    result = runner.invoke(app, ["demo", "--url", server.base, "--collection", "demo_http"])
    assert result.exit_code == 0, result.output
    assert "ingested 12 photographs" in result.output
    after = result.output.split("Similar to mirrored 'chelsea'")[1]
    rows = [line for line in after.splitlines() if "│" in line]
    assert "chelsea" in rows[0], result.output  # best hit first
    info = httpx.get(f"{server.base}/v1/collections/demo_http").json()
    assert info["count"] == 12 and info["thumbnails"] is True
