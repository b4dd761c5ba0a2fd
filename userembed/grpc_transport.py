"""The gRPC transport: ``userembed.v1.Embeddings`` (GetEmbedding, BatchGetEmbeddings,
ListModels) over one channel per client, vectors as packed little-endian float16 (or
float32).

Uses the generated code committed with the server (``service/api/proto``), which
imports nothing else of the server. API keys travel as ``authorization`` metadata; the
server's error code comes back as ``userembed-error-code`` trailing metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import grpc
import grpc.aio

from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.api.proto.userembed.v1 import embeddings_pb2_grpc as pb_grpc
from userembed.errors import ServerError, UserembedError, error_from_grpc
from userembed.results import (
    DEFAULT_MODEL,
    ColdStartStatus,
    Embedding,
    ModelInfo,
    Status,
    stack_vectors,
)
from userembed.transport import Precision, Query

_STATUS: Final[dict[int, Status]] = {
    pb.STATUS_FRESH: "fresh",
    pb.STATUS_STALE: "stale",
    pb.STATUS_COLD_START: "cold_start",
    pb.STATUS_NOT_FOUND: "not_found",
    pb.STATUS_VERSION_MISMATCH: "version_mismatch",
}
_COLD_START: Final[dict[int, ColdStartStatus]] = {
    pb.COLD_START_AVAILABLE: "available",
    pb.COLD_START_UNAVAILABLE: "unavailable",
    pb.COLD_START_DISABLED: "disabled",
}
ERROR_CODE_METADATA: Final = "userembed-error-code"  # the server's error code, trailing
_ENCODING: Final[dict[str, pb.Encoding]] = {
    "float16": pb.ENCODING_FLOAT16,
    "float32": pb.ENCODING_FLOAT32,
}
_DTYPE: Final[dict[int, str]] = {
    pb.ENCODING_UNSPECIFIED: "<f4",
    pb.ENCODING_FLOAT32: "<f4",
    pb.ENCODING_FLOAT16: "<f2",
}
# The server bounds its answers at api_grpc_max_send_bytes (32 MiB); gRPC's default
# receive limit (4 MiB) would refuse a large batch.
CHANNEL_OPTIONS: Final = [("grpc.max_receive_message_length", 64 << 20)]


def decode_messages(messages: Sequence[pb.Embedding]) -> list[Embedding]:
    """Embedding messages as :class:`Embedding` objects, the vectors decoded at once."""
    with_vector = [m for m in messages if m.vector]
    encodings = {m.encoding for m in with_vector}
    unknown = encodings - _DTYPE.keys() or {m.status for m in messages} - _STATUS.keys()
    if unknown:
        raise ServerError(f"unknown encoding or status {sorted(unknown)} in the answer")
    if len(encodings) <= 1:
        dtype = _DTYPE[encodings.pop()] if encodings else "<f4"
        vectors = iter(stack_vectors([m.vector for m in with_vector], dtype))
    else:  # a server never mixes encodings in one answer; one by one if one did
        vectors = iter(stack_vectors([m.vector], _DTYPE[m.encoding])[0] for m in with_vector)
    return [
        Embedding(
            m.user_id,
            _STATUS[m.status],
            next(vectors) if m.vector else None,
            m.model_version or None,
            m.space_version or None,
            m.computed_at if m.HasField("computed_at") else None,
            m.feature_version if m.HasField("feature_version") else None,
            m.staleness_ms if m.HasField("staleness_ms") else None,
            m.model or DEFAULT_MODEL,
        )
        for m in messages
    ]


def decode_models(response: pb.ListModelsResponse) -> list[ModelInfo]:
    """A ListModels answer as :class:`ModelInfo` objects (empty strings and 0 as None)."""
    unknown = {m.cold_start for m in response.models} - _COLD_START.keys()
    if unknown:
        raise ServerError(f"unknown cold_start {sorted(unknown)} in the answer")
    return [
        ModelInfo(
            m.name,
            m.version or None,
            m.space_version or None,
            m.dim or None,
            m.dtype,
            m.input_schema_hash or None,
            _COLD_START[m.cold_start],
        )
        for m in response.models
    ]


def get_request(user_id: str, query: Query, encoding: pb.Encoding) -> pb.GetEmbeddingRequest:
    return pb.GetEmbeddingRequest(
        user_id=user_id,
        encoding=encoding,
        model_version=query.pin(query.names[0]) or "",
        model=query.models[0] if query.models else "",
    )


def batch_request(
    user_ids: Sequence[str], query: Query, encoding: pb.Encoding
) -> pb.BatchGetEmbeddingsRequest:
    """Named models with per-model pins, or the unnamed default model with its pin."""
    if query.models:
        return pb.BatchGetEmbeddingsRequest(
            user_ids=user_ids,
            encoding=encoding,
            models=query.models,
            model_versions=dict(query.pins),
        )
    return pb.BatchGetEmbeddingsRequest(
        user_ids=user_ids, encoding=encoding, model_version=query.pin() or ""
    )


def _error(exc: grpc.RpcError) -> UserembedError:
    code: Any = exc.code() if hasattr(exc, "code") else None
    details: Any = exc.details() if hasattr(exc, "details") else None
    request_id = server_code = None
    trailing: Any = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == "x-request-id":
            request_id = str(value)
        elif key == ERROR_CODE_METADATA:
            server_code = str(value)
    name = code.name if code is not None else "UNKNOWN"
    return error_from_grpc(name, details, code=server_code, request_id=request_id)


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class GrpcTransport:
    """Blocking gRPC transport over one channel (thread-safe)."""

    def __init__(
        self,
        address: str,
        *,
        secure: bool = False,
        api_key: str | None = None,
        precision: Precision = "float16",
    ) -> None:
        if secure:
            credentials = grpc.ssl_channel_credentials()
            self._channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub: Any = pb_grpc.EmbeddingsStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = _metadata(api_key)
        self._encoding = _ENCODING[precision]

    def get(self, user_id: str, query: Query, timeout_s: float) -> Embedding:
        request = get_request(user_id, query, self._encoding)
        try:
            message: pb.Embedding = self._stub.GetEmbedding(
                request, timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return decode_messages([message])[0]

    def batch_get(self, user_ids: Sequence[str], query: Query, timeout_s: float) -> list[Embedding]:
        request = batch_request(user_ids, query, self._encoding)
        try:
            response: pb.BatchGetEmbeddingsResponse = self._stub.BatchGetEmbeddings(
                request, timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return decode_messages(response.embeddings)

    def list_models(self, timeout_s: float) -> list[ModelInfo]:
        try:
            response: pb.ListModelsResponse = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return decode_models(response)

    def close(self) -> None:
        self._channel.close()


class AsyncGrpcTransport:
    """asyncio gRPC transport (grpc.aio) over one channel, opened in the running loop on
    first use."""

    def __init__(
        self,
        address: str,
        *,
        secure: bool = False,
        api_key: str | None = None,
        precision: Precision = "float16",
    ) -> None:
        self._address, self._secure = address, secure
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._metadata = _metadata(api_key)
        self._encoding = _ENCODING[precision]

    def _open(self) -> Any:
        if self._stub is None:
            if self._secure:
                credentials = grpc.ssl_channel_credentials()
                self._channel = grpc.aio.secure_channel(
                    self._address, credentials, options=CHANNEL_OPTIONS
                )
            else:
                self._channel = grpc.aio.insecure_channel(self._address, options=CHANNEL_OPTIONS)
            self._stub = pb_grpc.EmbeddingsStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    async def get(self, user_id: str, query: Query, timeout_s: float) -> Embedding:
        request = get_request(user_id, query, self._encoding)
        try:
            message: pb.Embedding = await self._open().GetEmbedding(
                request, timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return decode_messages([message])[0]

    async def batch_get(
        self, user_ids: Sequence[str], query: Query, timeout_s: float
    ) -> list[Embedding]:
        request = batch_request(user_ids, query, self._encoding)
        try:
            response: pb.BatchGetEmbeddingsResponse = await self._open().BatchGetEmbeddings(
                request, timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return decode_messages(response.embeddings)

    async def list_models(self, timeout_s: float) -> list[ModelInfo]:
        try:
            response: pb.ListModelsResponse = await self._open().ListModels(
                pb.ListModelsRequest(), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return decode_models(response)

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
