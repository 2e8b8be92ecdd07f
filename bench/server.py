"""A dotsearch server in a subprocess for a benchmark: a free port, start, wait, stop."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(cmd: list[str], env: dict[str, str], port: int, log_path: Path,
                   ready: Callable[[dict[str, Any]], bool], timeout_s: float = 120
                   ) -> Iterator[str]:
    """Run ``cmd`` (a server on 127.0.0.1:``port``) until ``ready(/health)``; yield its
    base URL; terminate it afterwards (kill after 30 s)."""
    import httpx

    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
            try:
                if ready(httpx.get(f"{url}/health", timeout=2).json()):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready in {timeout_s:g} s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
