"""uvicorn HTTP/1.1 protocols with a request-head read timeout (slowloris defence)."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # uvicorn[standard] brings httptools; plain uvicorn falls back to h11, as "auto" does
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover
    HttpToolsProtocol = None  # type: ignore[assignment, misc]

logger = logging.getLogger("dotsearch.http")

# Sent, then the connection is closed, when a request head is not complete in time.
REQUEST_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\n"
                            b"content-type: text/plain; charset=utf-8\r\n"
                            b"content-length: 33\r\n"
                            b"connection: close\r\n\r\n"
                            b"request headers were not received")

# The rule, the same for both parsers: the clock starts when a connection is made, and on a
# kept-alive connection when the first byte of a later request arrives (uvicorn's own
# `timeout_keep_alive` bounds the idle time between requests). It stops when the request
# head (request line and headers) is complete, so neither a slow body upload nor a slow
# handler is ever timed by it. When it runs out the client gets a 408 and the connection is
# closed, unless an earlier response on the connection (HTTP pipelining) is still being
# produced: that response is never cut, the check is simply made again one timeout later.


class _HeadDeadline:
    """The timer half shared by both protocols; each says what "a response in flight" is."""

    header_timeout_s: float = 10.0  # replaced per server by http_protocol()
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    _head_timer: asyncio.TimerHandle | None = None

    def _response_in_flight(self) -> bool:
        cycle = getattr(self, "cycle", None)  # uvicorn's current request/response cycle
        return cycle is not None and not cycle.response_complete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_head_timer(self) -> None:
        """Start the clock unless it is already running for this request head."""
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._response_in_flight():
            self._arm_head_timer()
            return
        logger.debug("closing %s: no complete request head within %.1f s",
                     self.transport.get_extra_info("peername"), self.header_timeout_s)
        self.transport.write(REQUEST_TIMEOUT_RESPONSE)
        self.transport.close()


class H11HeadTimeoutProtocol(_HeadDeadline, H11Protocol):
    """uvicorn's h11 protocol; h11's `their_state` is IDLE exactly while a head is awaited."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # feeds h11 and handles every complete event
        # A head is awaited, with bytes of it in hand or not: start (or keep) the clock. A
        # pipelined head buffered while a response was in flight waits for more bytes here;
        # if none come, uvicorn's keep-alive timer closes the connection.
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()
        else:
            self._disarm_head_timer()


if HttpToolsProtocol is not None:

    class HttpToolsHeadTimeoutProtocol(_HeadDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol; llhttp's callbacks say where a head ends."""

        _awaiting_head = True  # the next bytes belong to a request head

        def data_received(self, data: bytes) -> None:
            if self._awaiting_head:  # bytes of a head, or CRLFs that llhttp skips silently
                self._arm_head_timer()
            super().data_received(data)  # runs the parser callbacks below

        def on_message_begin(self) -> None:
            self._arm_head_timer()  # a head may begin in the data that ended the last request
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._awaiting_head = False
            self._disarm_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._awaiting_head = True  # whatever follows on this connection is a new request


def http_protocol(header_timeout_s: float,
                  parser: Literal["auto", "httptools", "h11"] = "auto") -> type[asyncio.Protocol]:
    """The protocol class for `uvicorn.run(..., http=...)`, timing request heads.

    ``parser``: "auto" is httptools where installed, else h11 (uvicorn's own choice).
    """
    if header_timeout_s <= 0:
        raise ValueError(f"header_timeout_s must be positive, got {header_timeout_s}")
    base: type[asyncio.Protocol]
    if parser == "h11" or (parser == "auto" and HttpToolsProtocol is None):
        base = H11HeadTimeoutProtocol
    elif HttpToolsProtocol is None:
        raise ValueError("httptools is not installed")
    else:
        base = HttpToolsHeadTimeoutProtocol
    return type(base.__name__, (base,), {"header_timeout_s": float(header_timeout_s)})
