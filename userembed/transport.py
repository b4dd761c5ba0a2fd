"""The seam between the clients and the wire: one request, one answer, typed errors.

A transport makes exactly one request per call and raises :mod:`userembed.errors`
exceptions; deadlines, retries, hedging, splitting and coalescing are the clients'.
The URL's scheme picks the implementation: ``http://``/``https://`` (JSON with base64
vectors, httpx) or ``grpc://``/``grpcs://`` (the ``userembed.v1.Embeddings`` service).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

from userembed.results import Embedding

Precision = Literal["float16", "float32"]


class Transport(Protocol):
    def get(self, user_id: str, pin: str | None, timeout_s: float) -> Embedding:
        """One user's embedding, or the server's error."""
        ...

    def batch_get(
        self, user_ids: Sequence[str], pin: str | None, timeout_s: float
    ) -> list[Embedding]:
        """Answers in request order, each with its status (one request)."""
        ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    async def get(self, user_id: str, pin: str | None, timeout_s: float) -> Embedding:
        """One user's embedding, or the server's error."""
        ...

    async def batch_get(
        self, user_ids: Sequence[str], pin: str | None, timeout_s: float
    ) -> list[Embedding]:
        """Answers in request order, each with its status (one request)."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Target:
    """Where the server is: ``protocol`` and ``address`` (an HTTP base URL, or a gRPC
    ``host:port``), ``secure`` for TLS."""

    protocol: Literal["http", "grpc"]
    address: str
    secure: bool

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https") and parts.netloc:
            return cls("http", url.rstrip("/"), scheme == "https")
        if scheme in ("grpc", "grpcs") and parts.netloc and parts.path in ("", "/"):
            return cls("grpc", parts.netloc, scheme == "grpcs")
        raise ValueError(
            f"unsupported server URL {url!r}: use http://host:port (HTTP API, e.g. "
            "http://127.0.0.1:8000) or grpc://host:port (gRPC, e.g. grpc://127.0.0.1:50051); "
            "https:// and grpcs:// for TLS"
        )
