"""Slow clients (slowloris): request heads that never finish are closed, nothing else is cut."""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from service.http_server import http_protocol
from tests.serve_support import free_port, serving

HEADER_TIMEOUT_S = 1.0  # the real server's, through DOTSEARCH_HEADER_TIMEOUT_S in its .env
BODY_TIMEOUT_S = 4.0  # the real server's DOTSEARCH_BODY_TIMEOUT_S
TOY_TIMEOUT_S = 0.3  # the in-process toy servers'
TOY_HANDLER_S = 1.0  # how long the toy app's /slow takes: over three toy timeouts
CLOSE_BOUND_S = 15.0  # liveness bound: "closed at all", not a performance claim

# A request head that never ends: one more byte of a header value goes out per tick.
SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
GET = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


# ---- a raw-socket client ----------------------------------------------------------------

def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=CLOSE_BOUND_S)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP response with a content-length: (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    length = int(headers[b"content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), body[:length]  # a pipelined 408 may follow


def drip_until_closed(socks: list[socket.socket], interval: float,
                      between: Any = None) -> tuple[list[float | None], list[bytes]]:
    """Send one header byte per socket every ``interval`` s until the server closes each one.

    Returns, per socket, seconds until it was seen closed (None: still open after
    CLOSE_BOUND_S) and what the server said. ``between()`` runs once per tick.
    """
    start = time.monotonic()
    closed_after: list[float | None] = [None] * len(socks)
    said = [b""] * len(socks)
    for sock in socks:
        sock.setblocking(False)
    while any(t is None for t in closed_after) and time.monotonic() - start < CLOSE_BOUND_S:
        tick_end = time.monotonic() + interval
        while (remaining := tick_end - time.monotonic()) > 0:
            open_socks = [s for s, t in zip(socks, closed_after, strict=True) if t is None]
            readable, _, _ = select.select(open_socks, [], [], remaining)
            for sock in readable:
                i = socks.index(sock)
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:  # reset
                    chunk = b""
                said[i] += chunk
                if not chunk:
                    closed_after[i] = time.monotonic() - start
        for i, sock in enumerate(socks):
            if closed_after[i] is None:
                try:
                    sock.send(b"a")
                except OSError:  # the server closed it under us
                    closed_after[i] = time.monotonic() - start
        if between is not None:
            between()
    return closed_after, said


def assert_timed_out(closed_after: list[float | None], said: list[bytes], timeout: float
                     ) -> None:
    """Every socket closed, none before the timeout, each answered 408 if answered at all."""
    assert all(t is not None for t in closed_after), \
        f"{closed_after.count(None)} of {len(closed_after)} slow sockets still open"
    assert min(t for t in closed_after if t is not None) >= timeout * 0.9, closed_after
    answers = {s[:12] for s in said if s}
    assert answers <= {b"HTTP/1.1 408"}, answers


# ---- the real `dotsearch serve`, with DOTSEARCH_HEADER_TIMEOUT_S=1 ------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(base URL, port) of a `dotsearch serve` subprocess whose header timeout is 1 s."""
    root = tmp_path_factory.mktemp("slow_clients")
    # start_server strips DOTSEARCH_* from the environment; Settings also reads ./.env
    (root / ".env").write_text(f"DOTSEARCH_HEADER_TIMEOUT_S={HEADER_TIMEOUT_S}\n"
                               f"DOTSEARCH_BODY_TIMEOUT_S={BODY_TIMEOUT_S}\n")
    with serving(root, cwd=root) as served_at:
        yield served_at


@pytest.mark.slow  # with the server's start, about 12 s
def test_slow_heads_are_closed_while_normal_clients_are_served(served):
    base, port = served
    statuses: list[int] = []

    def normal_client() -> None:
        statuses.append(httpx.get(f"{base}/health", timeout=CLOSE_BOUND_S).status_code)

    slow = [connect(port) for _ in range(50)]
    silent = [connect(port) for _ in range(5)]  # connect, then never send a byte
    try:
        for sock in slow:
            sock.sendall(SLOW_HEAD)
        closed_after, said = drip_until_closed(slow, 0.5, between=normal_client)
        assert_timed_out(closed_after, said, HEADER_TIMEOUT_S)
        for sock in silent:
            sock.settimeout(CLOSE_BOUND_S)
            while sock.recv(65536):  # until EOF; a socket.timeout here is a failure
                pass
    finally:
        for sock in slow + silent:
            sock.close()
    assert statuses and set(statuses) == {200}, statuses


@pytest.mark.slow  # with the server's start, about 12 s
def test_idle_keep_alive_gap_and_next_request_are_not_cut(served):
    _, port = served
    with connect(port) as sock:
        sock.sendall(GET % b"/health")
        assert read_response(sock)[0] == 200
        time.sleep(2 * HEADER_TIMEOUT_S)  # idle, but under uvicorn's 5 s keep-alive
        sock.sendall(GET % b"/health")
        assert read_response(sock)[0] == 200


@pytest.mark.slow  # with the server's start, about 12 s
def test_slow_head_of_a_later_request_on_a_kept_alive_connection_is_closed(served):
    _, port = served
    with connect(port) as sock:
        sock.sendall(GET % b"/health")
        assert read_response(sock)[0] == 200
        sock.sendall(SLOW_HEAD)
        closed_after, said = drip_until_closed([sock], 0.25)
    assert_timed_out(closed_after, said, HEADER_TIMEOUT_S)
    assert said[0].startswith(b"HTTP/1.1 408")


@pytest.mark.slow  # with the server's start, about 12 s
def test_slow_body_after_a_complete_head_is_not_cut(served):
    _, port = served
    body = b'{"name": "slow_body", "dim": 4, "metric": "dot"}'
    with connect(port) as sock:
        sock.sendall(b"POST /v1/collections HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        for start in range(0, len(body), 6):  # 8 pieces 0.3 s apart: over twice the timeout
            time.sleep(0.3)
            sock.sendall(body[start:start + 6])
        status, answer = read_response(sock)
    assert status == 201, answer
    assert b"slow_body" in answer


@pytest.mark.slow
def test_a_stalled_body_is_refused_with_408_while_others_are_served(served):
    """A body that stops arriving (a slowloris on the body) holds no handler for long."""
    base, port = served
    with connect(port) as sock:
        sock.sendall(b"POST /v1/collections HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"name": "stal')
        started = time.monotonic()
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200  # others go on
        status, answer = read_response(sock)
        waited = time.monotonic() - started
        sock.settimeout(CLOSE_BOUND_S)
        assert sock.recv(1) == b""  # and the connection is closed
    assert status == 408, answer
    assert b"request_timeout" in answer and b"DOTSEARCH_BODY_TIMEOUT_S" in answer
    assert BODY_TIMEOUT_S * 0.9 <= waited < CLOSE_BOUND_S
    assert httpx.get(f"{base}/v1/collections/stal", timeout=5).status_code == 404


# ---- in-process toy servers: both parsers, and a pipelined head behind a slow response ----

async def toy_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers its length; /slow first takes TOY_HANDLER_S."""
    assert scope["type"] == "http"
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(TOY_HANDLER_S)
    reply = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(reply)).encode())]})
    await send({"type": "http.response.body", "body": reply})


@pytest.fixture(scope="module", params=["httptools", "h11"])
def toy_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """Port of a uvicorn server in a thread, with the header timeout on the given parser."""
    config = uvicorn.Config(toy_app, host="127.0.0.1", port=free_port(), lifespan="off",
                            log_level="warning",
                            http=http_protocol(TOY_TIMEOUT_S, parser=request.param))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + CLOSE_BOUND_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "toy server did not start"
        time.sleep(0.02)
    yield config.port
    server.should_exit = True
    thread.join(CLOSE_BOUND_S)


def test_toy_slow_head_is_closed_with_408(toy_port):
    with connect(toy_port) as sock:
        sock.sendall(SLOW_HEAD)
        closed_after, said = drip_until_closed([sock], 0.1)
    assert_timed_out(closed_after, said, TOY_TIMEOUT_S)
    assert said[0].startswith(b"HTTP/1.1 408")


def test_toy_slow_body_and_keep_alive_gap_are_not_cut(toy_port):
    with connect(toy_port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 8\r\n\r\n")
        for _ in range(8):  # 0.8 s of body: over twice the timeout
            time.sleep(0.1)
            sock.sendall(b"b")
        assert read_response(sock) == (200, b"8")
        time.sleep(2 * TOY_TIMEOUT_S)
        sock.sendall(GET % b"/")
        assert read_response(sock) == (200, b"0")


def test_toy_pipelined_slow_head_does_not_cut_the_response_in_flight(toy_port):
    with connect(toy_port) as sock:
        # /slow is answered after three timeouts; the pipelined head behind it never ends.
        sock.sendall(GET % b"/slow" + SLOW_HEAD)
        assert read_response(sock) == (200, b"0")
        sock.setblocking(False)
        closed_after, said = drip_until_closed([sock], 0.1)
    assert closed_after[0] is not None, "the pipelined slow head was never timed out"
    assert not said[0] or said[0].startswith(b"HTTP/1.1 408"), said[0]


@pytest.mark.slow
def test_a_body_dripped_slower_than_the_minimum_rate_is_refused(served):
    """A byte just inside every stall period never stalls, but the body is far from done
    by the timeout plus its length at 1 KiB/s."""
    _, port = served
    with connect(port) as sock:
        sock.sendall(b"POST /v1/collections HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        status, answer = 0, b""
        sock.settimeout(BODY_TIMEOUT_S * 0.6)
        while time.monotonic() - started < CLOSE_BOUND_S:
            try:
                sock.sendall(b" ")
                status, answer = read_response(sock)
                break
            except (TimeoutError, OSError):
                continue
    assert status == 408, answer
    assert b"bytes/s" in answer and time.monotonic() - started < 2 * BODY_TIMEOUT_S + 2
