"""Running `dotsearch serve` as a subprocess for end-to-end tests: start it, wait for it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(data_dir: Path, port: int, log: Path, cwd: Path | None = None,
                 *flags: str) -> subprocess.Popen[bytes]:
    """`dotsearch serve --weights random --backend cpu [flags]` on 127.0.0.1:port, output
    to log (a later `--backend` in ``flags`` wins)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOTSEARCH_")}
    exe = Path(sys.executable).with_name("dotsearch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port), "--weights", "random",
            "--backend", "cpu", "--data-dir", str(data_dir), *flags]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    """/health once the featurizer is ready; the server's log if it dies or takes 180 s."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()}")
        try:
            health = httpx.get(f"{base}/health", timeout=2).json()
            if health.get("status") == "ok" and health["featurizer"]["state"] == "ready":
                return dict(health)
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"server not ready in 180 s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it has not exited in 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@contextmanager
def serving(folder: Path, cwd: Path | None = None) -> Iterator[tuple[str, int]]:
    """(base URL, port) of a `dotsearch serve` on folder/data, ready; stopped afterwards."""
    port, log = free_port(), folder / "server.log"
    base = f"http://127.0.0.1:{port}"
    proc = start_server(folder / "data", port, log, cwd=cwd)
    try:
        wait_ready(base, proc, log)
        yield base, port
    finally:
        stop_server(proc)
