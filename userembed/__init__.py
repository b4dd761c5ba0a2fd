"""userembed's client for rankers: fresh user embeddings as numpy arrays, over the
HTTP or gRPC read API of ``userembed serve``.

    from userembed import Client

    with Client("http://127.0.0.1:8000") as client:
        vector = client.get("u42").vector          # float32 numpy array
        batch = client.get_many(["u1", "u2"])       # per-user status, request order
        both = client.get_many(["u1", "u2"], models=["default", "clicks"])
        clicks = both["clicks"].matrix()            # one Batch per model

``grpc://host:50051`` selects gRPC; :class:`AsyncClient` is the asyncio form (with
optional coalescing of concurrent gets). The server is the ``service`` package; this
package imports nothing of it but the generated gRPC code.
"""

from userembed.async_client import AsyncClient
from userembed.client import Client
from userembed.errors import (
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    ServerError,
    Unauthenticated,
    Unavailable,
    UnknownModel,
    UserembedError,
    VersionMismatch,
)
from userembed.results import DEFAULT_MODEL, Batch, Embedding, ModelBatches, ModelInfo, Status
from userembed.retry import NO_RETRIES, RetryPolicy

__all__ = [
    "DEFAULT_MODEL",
    "NO_RETRIES",
    "AsyncClient",
    "Batch",
    "Client",
    "DeadlineExceeded",
    "Embedding",
    "InvalidRequest",
    "ModelBatches",
    "ModelInfo",
    "NotFound",
    "RetryPolicy",
    "ServerError",
    "Status",
    "Unauthenticated",
    "Unavailable",
    "UnknownModel",
    "UserembedError",
    "VersionMismatch",
]
