"""uvicorn's httptools protocol, writing each response in one system call.

uvicorn writes a response's status line and headers, then its body, as two
``transport.write`` calls; on uvloop each is a ``send`` on the socket, and the
client may wake twice. For a small JSON answer the second call is a measurable
share of the read path (py-spy: ~10% of the API's CPU), so the header write is
held until the body's write and both go out joined. A held write is also flushed on
the next loop turn, so nothing waits on a response that never sends a body.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _JoinedWrites:
    """A transport proxy that joins a held write with the next one."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

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

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class JoinedWritesHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose responses leave in one write (``uvicorn.Config(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        joined: Any = _JoinedWrites(transport, self.loop)
        super().connection_made(joined)
