"""A light HTTP/1.1 load generator: keep-alive connections, requests encoded once.

The server and the load generator share this machine's cores, so the client must cost
as little as possible per request (httpx's AsyncClient costs several ms of CPU per
request at 64 connections, more than the server does). Like wrk, each connection sends
one pre-encoded request, reads one response by its Content-Length, and repeats.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    """What ``clients`` connections got in ``elapsed`` seconds."""

    elapsed: float
    latencies: list[float] = field(default_factory=list)  # seconds, 2xx responses only
    errors: int = 0  # non-2xx responses


def encode_post(url: str, path: str, body: bytes,
                content_type: str = "application/json") -> bytes:
    """One complete HTTP/1.1 POST request (keep-alive) as bytes."""
    host = urlsplit(url).netloc
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one response that carries a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    if length is None:
        raise RuntimeError("response without Content-Length: the load generator cannot frame it")
    return status, await reader.readexactly(length)


async def _connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    return await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 80)


async def run_load(url: str, requests: list[bytes], clients: int, seconds: float) -> LoadResult:
    """``clients`` connections, each sending ``requests`` in turn (from its own offset)
    until ``seconds`` have passed; every response is read before the next request."""
    result = LoadResult(elapsed=0.0)
    stop = time.perf_counter() + seconds

    async def connection(offset: int) -> None:
        reader, writer = await _connect(url)
        try:
            i = offset
            while time.perf_counter() < stop:
                started = time.perf_counter()
                writer.write(requests[i % len(requests)])
                status, _ = await read_response(reader)
                i += 1
                if 200 <= status < 300:
                    result.latencies.append(time.perf_counter() - started)
                else:
                    result.errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection(c) for c in range(clients)))
    result.elapsed = time.perf_counter() - started
    return result


async def sequential_latencies(url: str, requests: list[bytes], count: int,
                               offset: int = 0) -> list[float]:
    """Seconds per request of ``count`` requests sent one after another on one keep-alive
    connection (after one untimed request that opens it); raises on a non-2xx answer."""
    reader, writer = await _connect(url)
    times: list[float] = []
    try:
        for i in range(offset, offset + count + 1):
            started = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status, body = await read_response(reader)
            if not 200 <= status < 300:
                raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
            if i > offset:
                times.append(time.perf_counter() - started)
    finally:
        writer.close()
    return times
