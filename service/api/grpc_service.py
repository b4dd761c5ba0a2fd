"""The read API over gRPC (grpc.aio): the same :class:`EmbeddingReader` as HTTP.

``userembed.v1.Embeddings`` (service/api/proto/userembed/v1/embeddings.proto) with the
standard health service and server reflection. Vectors travel as packed
little-endian bytes. API keys are checked from the ``authorization: Bearer <key>``
metadata (exactly one: two are INVALID_ARGUMENT); a request id is taken from
``x-request-id`` (or made) and returned in the trailing metadata, with a failure's error
code (``userembed-error-code``: ``unknown_model``, ``not_found``, ...). Messages are bounded
both ways (:func:`server_options`): a larger one is RESOURCE_EXHAUSTED, for that call only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.frontend import REQUEST_ID, KeyChecker, RouteLatency, new_request_id
from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.api.reads import (
    DEFAULT_ONLY,
    Answer,
    EmbeddingReader,
    ReadError,
    max_request_bytes,
    parse_model,
    parse_models,
    parse_pin,
    parse_pins,
)
from service.core.embeddings import EmbeddingDtype
from service.metrics import API_IN_FLIGHT
from service.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME: Final = "userembed.v1.Embeddings"
_GET: Final = f"/{SERVICE_NAME}/GetEmbedding"
_BATCH: Final = f"/{SERVICE_NAME}/BatchGetEmbeddings"
_MODELS: Final = f"/{SERVICE_NAME}/ListModels"
_HEALTH_CHECK: Final = "/grpc.health.v1.Health/"
_REFLECTION: Final = "/grpc.reflection."
ERROR_CODE_METADATA: Final = "userembed-error-code"  # trailing: ReadError.code of a failure

GRPC_CODE: Final[dict[str, grpc.StatusCode]] = {
    "invalid_user_id": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_encoding": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_model_version": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_model": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_request": grpc.StatusCode.INVALID_ARGUMENT,
    "batch_too_large": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "unknown_model": grpc.StatusCode.NOT_FOUND,
    "version_mismatch": grpc.StatusCode.FAILED_PRECONDITION,
    "store_unavailable": grpc.StatusCode.UNAVAILABLE,
    "store_misconfigured": grpc.StatusCode.UNAVAILABLE,
}
_STATUS: Final = {
    "fresh": pb.STATUS_FRESH,
    "stale": pb.STATUS_STALE,
    "cold_start": pb.STATUS_COLD_START,
    "not_found": pb.STATUS_NOT_FOUND,
    "version_mismatch": pb.STATUS_VERSION_MISMATCH,
}
_DTYPE: Final[dict[int, EmbeddingDtype]] = {
    pb.ENCODING_UNSPECIFIED: "float32",
    pb.ENCODING_FLOAT32: "float32",
    pb.ENCODING_FLOAT16: "float16",
}
_COLD_START: Final = {
    "available": pb.COLD_START_AVAILABLE,
    "unavailable": pb.COLD_START_UNAVAILABLE,
    "disabled": pb.COLD_START_DISABLED,
}
GRPC_LATENCY: Final = RouteLatency("grpc")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _dtype(encoding: pb.Encoding) -> EmbeddingDtype:
    dtype = _DTYPE.get(encoding)
    if dtype is None:
        raise ReadError("invalid_encoding", f"unknown encoding {encoding}: use FLOAT32 or FLOAT16")
    return dtype


def to_message(
    answer: Answer, encoding: pb.Encoding, dtype: EmbeddingDtype, named: bool = False
) -> pb.Embedding:
    """The answer as a message; with ``model`` when the request ``named`` a model."""
    message = pb.Embedding(
        user_id=answer.user_id,
        status=_STATUS[answer.status],
        vector=answer.packed(dtype),
        encoding=encoding or pb.ENCODING_FLOAT32,
        dim=answer.dim or 0,
        model_version=answer.model_version or "",
        space_version=answer.space_version or "",
    )
    if answer.computed_at is not None:
        message.computed_at = answer.computed_at
    if answer.feature_version is not None:
        message.feature_version = answer.feature_version
    if answer.staleness_ms is not None:
        message.staleness_ms = answer.staleness_ms
    if named:
        message.model = answer.model
    return message


class EmbeddingsService:
    """The servicer: parse, read, encode; errors become gRPC status codes. ``dtype`` and
    ``cold_start_disabled`` are what ListModels says of every model."""

    def __init__(
        self,
        reader: EmbeddingReader,
        keys: KeyChecker,
        dtype: EmbeddingDtype = "float16",
        cold_start_disabled: bool = False,
    ) -> None:
        self._reader = reader
        self._keys = keys
        self._dtype = dtype
        self._cold_start_disabled = cold_start_disabled

    async def GetEmbedding(
        self, request: pb.GetEmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> pb.Embedding:
        return await self._call(_GET, context, self._get, request)

    async def BatchGetEmbeddings(
        self, request: pb.BatchGetEmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchGetEmbeddingsResponse:
        return await self._call(_BATCH, context, self._batch_get, request)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return await self._call(_MODELS, context, self._list_models, request)

    async def _get(self, request: pb.GetEmbeddingRequest) -> pb.Embedding:
        dtype = _dtype(request.encoding)
        model = parse_model(request.model)
        answer = await self._reader.get(request.user_id, parse_pin(request.model_version), model)
        return to_message(answer, request.encoding, dtype, bool(request.model))

    async def _batch_get(
        self, request: pb.BatchGetEmbeddingsRequest
    ) -> pb.BatchGetEmbeddingsResponse:
        dtype = _dtype(request.encoding)
        named = len(request.models) > 0
        answers = await self._reader.batch_get(
            list(request.user_ids),
            parse_pin(request.model_version),
            models=parse_models(request.models) if named else DEFAULT_ONLY,
            pins=parse_pins(request.model_versions),
        )
        return pb.BatchGetEmbeddingsResponse(
            embeddings=[to_message(a, request.encoding, dtype, named) for a in answers]
        )

    async def _list_models(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=state.name,
                    version=state.version or "",
                    space_version=state.space_version or "",
                    dim=state.dim or 0,
                    dtype=self._dtype,
                    input_schema_hash=state.input_schema_hash or "",
                    cold_start=_COLD_START[state.cold_start_status(self._cold_start_disabled)],
                )
                for state in self._reader.models.states()
            ]
        )

    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        handler: Callable[[Req], Awaitable[Resp]],
        request: Req,
    ) -> Resp:
        started = time.perf_counter()
        authorization = offered_id = None
        duplicate_auth = False
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                duplicate_auth = authorization is not None
                authorization = value
            elif key == "x-request-id":
                offered_id = value
        request_id = new_request_id(offered_id)
        REQUEST_ID.set(request_id)
        context.set_trailing_metadata((("x-request-id", request_id),))
        API_IN_FLIGHT.inc()
        code = grpc.StatusCode.INTERNAL
        try:
            if self._keys and duplicate_auth:
                raise ReadError(
                    "invalid_request", "more than one authorization metadata entry: send one"
                )
            if self._keys and not self._keys.allows(authorization):
                raise ReadError(
                    "unauthenticated",
                    "missing or invalid API key: send metadata 'authorization: Bearer <key>'",
                )
            response = await handler(request)
            code = grpc.StatusCode.OK
            return response
        except ReadError as exc:
            code = GRPC_CODE.get(exc.code, grpc.StatusCode.INTERNAL)
            level = logging.WARNING if code == grpc.StatusCode.UNAVAILABLE else logging.DEBUG
            log.log(
                level,
                "event=request_failed request_id=%s method=%s code=%s reason=%r",
                request_id,
                method,
                code.name,
                exc.message,
            )
            # the error code rides in trailing metadata: NOT_FOUND is not_found or
            # unknown_model, INVALID_ARGUMENT any of the 400s
            trailer = (("x-request-id", request_id), (ERROR_CODE_METADATA, exc.code))
            await context.abort(code, exc.message, trailer)
            raise  # abort raises; this line is never reached
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("event=read_failed request_id=%s reason=%r", request_id, str(exc))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
            raise
        finally:
            API_IN_FLIGHT.dec()
            GRPC_LATENCY.observe(method, code.name, time.perf_counter() - started)


class _OpsAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Requires API keys on the health and reflection services (``api_auth_ops``)."""

    def __init__(self, keys: KeyChecker) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith((_HEALTH_CHECK, _REFLECTION)):
            return handler
        keys = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        if len(keys) == 1 and self._keys.allows(keys[0]):
            return handler
        return _denied(handler)


def _denied(handler: Any) -> Any:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for kind, make in kinds.items():
        if getattr(handler, kind) is not None:
            return make(
                deny,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _service_handler(service: EmbeddingsService) -> grpc.GenericRpcHandler:
    """The servicer's methods registered with their (de)serializers."""
    handlers = {
        "GetEmbedding": grpc.unary_unary_rpc_method_handler(
            service.GetEmbedding,
            request_deserializer=pb.GetEmbeddingRequest.FromString,
            response_serializer=pb.Embedding.SerializeToString,
        ),
        "BatchGetEmbeddings": grpc.unary_unary_rpc_method_handler(
            service.BatchGetEmbeddings,
            request_deserializer=pb.BatchGetEmbeddingsRequest.FromString,
            response_serializer=pb.BatchGetEmbeddingsResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            service.ListModels,
            request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments of the server: requests bounded like HTTP bodies, answers by
    ``api_grpc_max_send_bytes`` (gRPC's defaults: 4 MiB in, unbounded out)."""
    return [
        ("grpc.max_receive_message_length", max_request_bytes(settings)),
        ("grpc.max_send_message_length", settings.api_grpc_max_send_bytes),
    ]


async def start_grpc_server(
    reader: EmbeddingReader, settings: Settings, host: str, port: int, *, reuse_port: bool = False
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server (read service, health, reflection); return it and its port.
    ``reuse_port``: share the port with the other processes of ``serve --workers N``
    (SO_REUSEPORT; gRPC sets it by default on Linux, said here so it cannot change)."""
    keys = KeyChecker(settings.resolved_api_keys())
    interceptors = [_OpsAuth(keys)] if keys and settings.api_auth_ops else []
    options = server_options(settings)
    if reuse_port:
        options.append(("grpc.so_reuseport", 1))
    server = grpc.aio.server(interceptors=interceptors, options=options)
    service = EmbeddingsService(
        reader, keys, settings.embedding_dtype, cold_start_disabled=settings.cold_start_404
    )
    server.add_generic_rpc_handlers((_service_handler(service),))
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind gRPC on {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("event=grpc_serving addr=%s:%d", host, bound)
    return server, bound
