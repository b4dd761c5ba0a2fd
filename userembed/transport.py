"""The seam between the clients and the wire: one request, one answer, typed errors.

A transport makes exactly one request per call and raises :mod:`userembed.errors`
exceptions; deadlines, retries, hedging, splitting and coalescing are the clients'.
What a read asks for besides its users (models, pins) is one :class:`Query`.
The URL's scheme picks the implementation: ``http://``/``https://`` (JSON with base64
vectors, httpx) or ``grpc://``/``grpcs://`` (the ``userembed.v1.Embeddings`` service).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

from userembed.results import DEFAULT_MODEL, Embedding, ModelInfo

Precision = Literal["float16", "float32"]


@dataclass(frozen=True, slots=True)
class Query:
    """The models a read names and their pins (hashable: coalesced gets share a query).

    ``models`` empty: the server's default model without naming it, the request of a
    client from before there were several models (answers carry no model). ``pins``:
    (model, space) pairs; the unnamed default model's pin is under ``"default"``.
    """

    models: tuple[str, ...] = ()
    pins: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, models: Sequence[str], pins: Mapping[str, str | None]) -> Query:
        """``models`` pinned by ``pins`` (model -> space; a None or empty space is no pin)."""
        return cls(tuple(models), tuple((m, space) for m, space in pins.items() if space))

    @property
    def names(self) -> tuple[str, ...]:
        """The models read, the default one when none is named."""
        return self.models or (DEFAULT_MODEL,)

    def pin(self, model: str = DEFAULT_MODEL) -> str | None:
        """The space ``model`` is pinned to, if any."""
        return next((space for name, space in self.pins if name == model), None)


class Transport(Protocol):
    def get(self, user_id: str, query: Query, timeout_s: float) -> Embedding:
        """One user's embedding of ``query``'s one model, or the server's error."""
        ...

    def batch_get(self, user_ids: Sequence[str], query: Query, timeout_s: float) -> list[Embedding]:
        """Answers user-major in request order (each user's answer of each of ``query``'s
        models in turn), each with its status (one request)."""
        ...

    def list_models(self, timeout_s: float) -> list[ModelInfo]:
        """The served models (one request)."""
        ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    async def get(self, user_id: str, query: Query, timeout_s: float) -> Embedding:
        """One user's embedding of ``query``'s one model, or the server's error."""
        ...

    async def batch_get(
        self, user_ids: Sequence[str], query: Query, timeout_s: float
    ) -> list[Embedding]:
        """Answers user-major in request order, each with its status (one request)."""
        ...

    async def list_models(self, timeout_s: float) -> list[ModelInfo]:
        """The served models (one request)."""
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
