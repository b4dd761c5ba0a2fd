"""The read API over gRPC (grpc.aio): the same :class:`EmbeddingReader` as HTTP.

``userembed.v1.Embeddings`` (service/api/proto/userembed/v1/embeddings.proto) with the
standard health service and server reflection. Its methods are generic handlers on raw
bytes: :class:`WireReads` parses and encodes (the choice of ``userembed bench grpc``,
docs/grpc.md). Vectors travel as packed little-endian bytes. API keys are checked from
the ``authorization: Bearer <key>`` metadata (exactly one: two are INVALID_ARGUMENT); a
request id is taken from ``x-request-id`` (or made) and returned in the trailing
metadata, with a failure's error code (``userembed-error-code``: ``unknown_model``,
``not_found``, ...). Messages are bounded both ways (:func:`server_options`): a larger
one is RESOURCE_EXHAUSTED, for that call only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.frontend import REQUEST_ID, KeyChecker, RouteLatency, new_request_id
from service.api.grpc_reads import GRPC_CODE as GRPC_CODE  # clients map codes with it
from service.api.grpc_reads import WireReads
from service.api.reads import EmbeddingReader, ReadError, max_request_bytes
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

GRPC_LATENCY: Final = RouteLatency("grpc")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class EmbeddingsService:
    """The servicer on raw bytes (no (de)serializers registered: :class:`WireReads`
    parses and encodes); metadata, errors as gRPC status codes, metrics."""

    def __init__(self, reads: WireReads, keys: KeyChecker) -> None:
        self.reads = reads
        self.keys = keys

    async def GetEmbedding(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._call(_GET, context, self.reads.get, request)

    async def BatchGetEmbeddings(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._call(_BATCH, context, self.reads.batch_get, request)

    async def ListModels(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._call(_MODELS, context, self.reads.list_models, request)

    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        handler: Callable[[Req], Awaitable[Resp]],
        request: Req,
    ) -> Resp:
        started = time.perf_counter()
        request_id, refused = call_metadata(self.keys, context.invocation_metadata())
        context.set_trailing_metadata((("x-request-id", request_id),))
        API_IN_FLIGHT.inc()
        code = grpc.StatusCode.INTERNAL
        try:
            if refused is not None:
                raise refused
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


def call_metadata(
    keys: KeyChecker, metadata: Iterable[tuple[str, str | bytes]] | None
) -> tuple[str, ReadError | None]:
    """A call's request id (``x-request-id``, or a new one; set as the context's), and
    why its ``authorization`` is refused when API keys are configured (None: admitted)."""
    authorization = offered_id = None
    duplicate_auth = False
    for key, value in metadata or ():
        if key == "authorization":
            duplicate_auth = authorization is not None
            authorization = value
        elif key == "x-request-id":
            offered_id = value
    request_id = new_request_id(offered_id)
    REQUEST_ID.set(request_id)
    if not keys:
        return request_id, None
    if duplicate_auth:
        return request_id, ReadError(
            "invalid_request", "more than one authorization metadata entry: send one"
        )
    if not keys.allows(authorization):
        return request_id, ReadError(
            "unauthenticated",
            "missing or invalid API key: send metadata 'authorization: Bearer <key>'",
        )
    return request_id, None


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


def read_handlers(service: EmbeddingsService) -> grpc.GenericRpcHandler:
    """The servicer's methods on raw bytes: no (de)serializer, :class:`WireReads` does it."""
    methods = {
        "GetEmbedding": service.GetEmbedding,
        "BatchGetEmbeddings": service.BatchGetEmbeddings,
        "ListModels": service.ListModels,
    }
    handlers = {name: grpc.unary_unary_rpc_method_handler(m) for name, m in methods.items()}
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def read_service(reader: EmbeddingReader, settings: Settings) -> EmbeddingsService:
    """The servicer of ``reader`` with the API keys and ListModels facts of ``settings``."""
    reads = WireReads(reader, settings.embedding_dtype, settings.cold_start_404)
    return EmbeddingsService(reads, KeyChecker(settings.resolved_api_keys()))


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments of the server: requests bounded like HTTP bodies, answers by
    ``api_grpc_max_send_bytes`` (gRPC's defaults: 4 MiB in, unbounded out)."""
    return [
        ("grpc.max_receive_message_length", max_request_bytes(settings)),
        ("grpc.max_send_message_length", settings.api_grpc_max_send_bytes),
    ]


async def start_grpc_server(
    reader: EmbeddingReader,
    settings: Settings,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    handlers: grpc.GenericRpcHandler | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server (read service, health, reflection); return it and its port.
    ``reuse_port``: share the port with the other processes of ``serve --workers N``
    (SO_REUSEPORT; gRPC sets it by default on Linux, said here so it cannot change).
    ``handlers`` replace the read service's (the benchmark's other candidates)."""
    keys = KeyChecker(settings.resolved_api_keys())
    interceptors = [_OpsAuth(keys)] if keys and settings.api_auth_ops else []
    options = server_options(settings)
    if reuse_port:
        options.append(("grpc.so_reuseport", 1))
    server = grpc.aio.server(interceptors=interceptors, options=options)
    server.add_generic_rpc_handlers((handlers or read_handlers(read_service(reader, settings)),))
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
