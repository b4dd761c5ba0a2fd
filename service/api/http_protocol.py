"""uvicorn's httptools protocol, writing each response in one system call, and bounding
what a slow or hostile client can hold: the time to send a request's head and body, and
the size of its head.

Joined writes. uvicorn writes a response's status line and headers, then its body, as
two ``transport.write`` calls; on uvloop each is a ``send`` on the socket, and the
client may wake twice. For a small JSON answer the second call is a measurable share of
the read path (py-spy: ~10% of the API's CPU), so the header write is held until the
body's write and both go out joined. A held write is also flushed on the next loop turn,
so nothing waits on a response that never sends a body.

Bounds (:class:`HttpLimits`, from the ``api_*`` settings):

- head timeout: a new connection's first request, and a request whose head arrived in
  part, must have its whole line and headers within ``head_timeout_s`` (counted from the
  connection, or from the head's first bytes); otherwise 408 (nothing when nothing was
  sent) and the connection is closed. Idle keep-alive connections keep uvicorn's
  ``timeout_keep_alive``.
- body timeout: a body that started must have arrived within ``body_timeout_s``.
- head size: a request line plus headers over ``max_header_bytes`` is a 431 and closed.

Timers cost nothing on the usual request: they are armed only when a ``data_received``
ends inside a head or a body (a request split over packets), and cancelled when that part
completes (``loop.call_later`` handles, like uvicorn's keep-alive timer); one is armed per
new connection. Blank lines between requests arm the head timer too.

Every refusal here is in the API's error envelope (uvicorn's own 400 is plain text).
Closing while the client may still be sending (a 413 answered before the body is read, a
431 mid-head) half-closes first and drains for ``LINGER_S``, so the client reads the
answer instead of a connection reset.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Final

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.api.frontend import error_body

log = logging.getLogger(__name__)

LINGER_S: Final = 2.0
# the parser callbacks extended below, called directly: super() costs ~0.1 us a call
_ON_MESSAGE_BEGIN: Final = HttpToolsProtocol.on_message_begin
_ON_HEADERS_COMPLETE: Final = HttpToolsProtocol.on_headers_complete
_ON_MESSAGE_COMPLETE: Final = HttpToolsProtocol.on_message_complete


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Protocol-level bounds of one HTTP server (``service.settings`` api_* defaults)."""

    head_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 1024


class _HeadTooLarge(Exception):
    """Raised from a parser callback: stops the parser, answered 431."""


class _JoinedWrites:
    """A transport proxy that joins a held write with the next one; ``close`` lingers
    while the protocol says a request body may still be arriving."""

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        protocol: JoinedWritesHttpToolsProtocol,
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._protocol = protocol
        self._held: bytes | None = None
        self._draining = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is None:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
            return
        held, self._held = self._held, None
        self._transport.write(held + data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held)

    def is_closing(self) -> bool:
        """Closing, or half-closed and draining (uvicorn then starts nothing more)."""
        return self._draining or self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        if not self._draining and self._protocol.client_may_be_sending() and self._linger():
            return
        self._transport.close()

    def _linger(self) -> bool:
        """Half-close and drain what the client still sends, then close (True), or
        False when the transport cannot half-close."""
        if self._transport.is_closing() or not self._transport.can_write_eof():
            return False
        try:
            self._transport.write_eof()
        except (OSError, RuntimeError):
            return False
        self._draining = True
        self._protocol.start_draining(self._loop.call_later(LINGER_S, self._transport.close))
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class JoinedWritesHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with joined response writes and :class:`HttpLimits`
    (``uvicorn.Config(http=...)``; the limits are ``config.http_limits`` when set)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = getattr(self.config, "http_limits", None) or HttpLimits()
        self._head_timeout_s = limits.head_timeout_s
        self._body_timeout_s = limits.body_timeout_s
        self._max_header_bytes = limits.max_header_bytes
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # a head began and is not complete
        self._in_body = False  # a head completed and its message is not
        self._began = False  # a head began in the current data_received
        self._chunk_bytes = 0  # the size of the current data_received
        self._partial_head_bytes = 0  # bytes of whole chunks inside an incomplete head

    # --- connection ------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        joined: Any = _JoinedWrites(transport, self.loop, self)
        super().connection_made(joined)
        # a connection that never sends a whole head is closed (no keep-alive timer yet)
        self._head_timer = self.loop.call_later(self._head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        super().connection_lost(exc)

    def client_may_be_sending(self) -> bool:
        """True while the current request's head or body has not all arrived."""
        return self._in_head or self._in_body

    def start_draining(self, close_timer: asyncio.TimerHandle) -> None:
        """Half-closed: discard what arrives (reading resumed: uvicorn may have paused it
        for an unread body) until ``close_timer`` or the client closes."""
        self._cancel_timers()
        self._unset_keepalive_if_required()
        self._drain_timer = close_timer
        self.flow.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._drain_timer is not None:
            return  # answered and half-closed: what still arrives is discarded
        self._unset_keepalive_if_required()
        self._began = False
        self._chunk_bytes = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse(431, "headers_too_large", str(exc.__context__))
            else:
                log.info("event=http_parse_error reason=%r", str(exc))
                self._refuse(400, "invalid_request", f"invalid HTTP request: {exc}")
            return
        if self._in_head:
            # httptools buffers a header until it is complete: bound it before that
            if not self._began:
                self._partial_head_bytes += len(data)
                if self._partial_head_bytes > self._max_header_bytes:
                    self._refuse(431, "headers_too_large", self._too_large_message())
                    return
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self._head_timeout_s, self._head_timed_out)
        elif self._in_body:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self._body_timeout_s, self._body_timed_out)
        elif (  # between requests (after leading CRLFs, say): as on a new connection
            self._head_timer is None
            and self.timeout_keep_alive_task is None
            and (self.cycle is None or self.cycle.response_complete)
        ):
            self._head_timer = self.loop.call_later(self._head_timeout_s, self._head_timed_out)

    # --- parser callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        _ON_MESSAGE_BEGIN(self)
        self._in_head = self._began = True
        self._partial_head_bytes = 0

    def on_headers_complete(self) -> None:
        # a head that began in a chunk no larger than the limit fits: no need to add up
        if not self._began or self._chunk_bytes > self._max_header_bytes:
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > self._max_header_bytes:
                raise _HeadTooLarge(self._too_large_message())
        self._in_head = False
        self._in_body = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        _ON_HEADERS_COMPLETE(self)

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        _ON_MESSAGE_COMPLETE(self)

    # --- timeouts and refusals ---------------------------------------------------

    def _too_large_message(self) -> str:
        return f"request line and headers over {self._max_header_bytes} bytes"

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._in_head:
            self._in_head = False  # the client is too slow to wait for: no lingering
            self._refuse(
                408, "request_timeout", f"request head not received in {self._head_timeout_s} s"
            )
        elif self.cycle is None or self.cycle.response_complete:
            self.transport.close()  # nothing sent: as uvicorn's keep-alive timeout, no word

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or not self._in_body:
            return
        if self.flow.read_paused:  # the app has not read what came: not the client's delay
            self._body_timer = self.loop.call_later(self._body_timeout_s, self._body_timed_out)
            return
        self._in_body = False  # the client is too slow to wait for: no lingering
        self._refuse(
            408, "request_timeout", f"request body not received in {self._body_timeout_s} s"
        )

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` in the error envelope and close (lingering if the client may
        still be sending): the request is not served. Its app, if it runs, reads a
        disconnect. When an earlier response is still due (pipelining) or this one has
        begun, there is no answering in order: the connection is just closed."""
        self._cancel_timers()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.scope is not self.scope or cycle.response_started or self.pipeline:
                self.transport.close()
                return
            cycle.disconnected = True  # the app's receive() answers http.disconnect
            cycle.message_event.set()
        if not self.transport.is_closing():
            body = error_body(code, message)
            content = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend(
                [
                    b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
            self.transport.write(b"".join(content))
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
