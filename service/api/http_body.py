"""Request bodies under bounds: their size (by Content-Length before reading, and while
reading when it is absent); their nesting is bounded by :mod:`service.core.json_depth`."""

from __future__ import annotations

from starlette.types import Receive

from service.api.reads import ReadError


def too_large(limit: int) -> ReadError:
    return ReadError("request_too_large", f"request body over {limit} bytes")


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; ReadError ``request_too_large`` as soon as it passes
    ``limit`` bytes (the rest is never read), ``invalid_request`` if the client leaves."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ReadError("invalid_request", "client disconnected before sending the body")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # one message: no copy
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)
