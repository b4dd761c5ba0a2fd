"""The HTTP API: the read routes for rankers, event intake, health and metrics.

:class:`ApiApp` is the ASGI entry point. It gives every request an id, checks API
keys, counts in-flight requests and observes latency; the two read routes are
answered directly by :mod:`service.api.http_reads` (no framework on the hot path),
everything else by a small FastAPI app, which also serves the OpenAPI document
of all routes. Errors are ``{"error": {"code", "message", "details"?}}``, whatever
fails: a body over its size limit is refused by its Content-Length before it is read
(413, connection closed), a duplicate Authorization header is a 400, an unexpected
exception a 500 in the envelope. Timeouts and the head's size are bounded below, in
:mod:`service.api.http_protocol` (its :class:`HttpLimits` ride on this app).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.types import Message, Receive, Scope, Send

from service.api.cold_start import ColdStartSource, ServedModels
from service.api.frontend import (
    REQUEST_ID,
    KeyChecker,
    RouteLatency,
    error_body,
    new_request_id,
)
from service.api.http_body import read_body, too_large
from service.api.http_docs import ASSETS_PREFIX, add_offline_docs
from service.api.http_events import ApiError, events_openapi, set_ts_maximum, validate_events
from service.api.http_protocol import HttpLimits
from service.api.http_reads import (
    BATCH_ROUTE,
    GET_ROUTE,
    HTTP_STATUS,
    MODELS_ROUTE,
    ModelsResponse,
    ReadEndpoints,
    body_rules,
    models_body,
    openapi_read_paths,
    read_route,
)
from service.api.reads import EmbeddingReader, ReadError, max_request_bytes
from service.core.clock import Clock, now_ms
from service.core.events import EventSink
from service.core.model_names import DEFAULT_MODEL
from service.metrics import API_IN_FLIGHT
from service.settings import Settings
from service.store.protocol import Store, StoreUnavailable

log = logging.getLogger(__name__)

EVENTS_ROUTE: Final = "/v1/events"
OPS_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
DOC_PATHS: Final = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_JSON_HEADER: Final = (b"content-type", b"application/json")


class JSONResponse(StarletteJSONResponse):
    """JSON via orjson (numpy arrays included)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> Response:
    return Response(error_body(code, message, details), status, headers, "application/json")


HTTP_LATENCY: Final = RouteLatency("http")


class ApiApp:
    """ASGI entry point: request id, auth, body size, metrics; read routes direct, the
    rest FastAPI. ``max_body_bytes`` maps a path to its body limit (``default_max_body``
    for any other); ``http_limits`` are for the server's protocol (``http_config``)."""

    def __init__(
        self,
        app: FastAPI,
        reads: ReadEndpoints,
        keys: KeyChecker,
        auth_ops: bool,
        *,
        max_body_bytes: dict[str, int] | None = None,
        default_max_body: int = 1 << 20,
        http_limits: HttpLimits | None = None,
    ) -> None:
        self.app = app
        self._reads = reads
        self._keys = keys
        self._open = (DOC_PATHS | OPS_PATHS) if not auth_ops else DOC_PATHS
        self._max_body = max_body_bytes or {}
        self._default_max_body = default_max_body
        self.http_limits = http_limits or HttpLimits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        authorization = offered_id = length = None
        duplicate_auth = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                duplicate_auth = authorization is not None
                authorization = value
            elif name == b"x-request-id":
                offered_id = value
            elif name == b"content-length":
                length = value
        request_id = new_request_id(offered_id)
        REQUEST_ID.set(request_id)  # each request runs in its own task and context
        path: str = scope["path"]
        route = read_route(path)
        API_IN_FLIGHT.inc()
        status = 500
        try:
            if (
                self._keys
                and path not in self._open
                and not path.startswith(ASSETS_PREFIX)  # the documentation's JS and CSS
                and (duplicate_auth or not self._keys.allows(authorization))
            ):
                status = await self._fail(send, request_id, _auth_error(duplicate_auth))
            elif length is not None and (error := self._length_error(path, length)):
                status = await self._fail(send, request_id, error)
            elif route is not None:
                status = await self._read(route, scope, receive, send, request_id)
            else:
                status = await self._delegate(scope, receive, send, request_id)
                found = scope.get("route")
                route = getattr(found, "path", "unmatched")
        finally:
            API_IN_FLIGHT.dec()
            elapsed = time.perf_counter() - started
            HTTP_LATENCY.observe(route or "unmatched", str(status), elapsed)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "event=request request_id=%s method=%s path=%s status=%d ms=%.3f",
                    request_id,
                    scope["method"],
                    path,
                    status,
                    elapsed * 1000,
                )

    def _length_error(self, path: str, length: bytes) -> ReadError | None:
        """413 for a declared body over the path's limit, before any of it is read."""
        limit = self._max_body.get(path, self._default_max_body)
        try:
            declared = int(length)
        except ValueError:  # the HTTP parser has checked it; never trust that alone
            return ReadError("invalid_request", "invalid Content-Length")
        return too_large(limit) if declared > limit else None

    async def _read(
        self, route: str, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> int:
        try:
            body = await self._reads.handle(route, scope, receive)
        except ReadError as exc:
            return await self._fail(send, request_id, exc, route)
        except Exception as exc:
            log.exception("event=read_failed request_id=%s reason=%r", request_id, str(exc))
            return await self._fail(
                send, request_id, ReadError("internal", "internal error; see the server log")
            )
        await _send(send, 200, body, request_id)
        return 200

    async def _fail(
        self, send: Send, request_id: str, error: ReadError, route: str | None = None
    ) -> int:
        status = HTTP_STATUS.get(error.code, 500)
        extra: list[tuple[bytes, bytes]] = []
        if error.retry_after_s is not None:
            extra.append((b"retry-after", str(error.retry_after_s).encode()))
        if status == 401:
            extra.append((b"www-authenticate", b"Bearer"))
        if status == 405:
            extra.append((b"allow", b"GET" if route == GET_ROUTE else b"POST"))
        if status == 413:  # the body is not read: the connection cannot be reused
            extra.append((b"connection", b"close"))
        level = logging.WARNING if status >= 500 else logging.DEBUG
        log.log(
            level,
            "event=request_failed request_id=%s status=%d code=%s reason=%r",
            request_id,
            status,
            error.code,
            error.message,
        )
        await _send(send, status, error_body(error.code, error.message), request_id, extra)
        return status

    async def _delegate(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> int:
        status = 500
        id_header = (b"x-request-id", request_id.encode())

        responded = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # answered in the envelope by the app's handler, if it can
            log.exception("event=request_error request_id=%s reason=%r", request_id, str(exc))
            if not responded:
                return await self._fail(
                    send, request_id, ReadError("internal", "internal error; see the server log")
                )
            return 500
        return status


def _auth_error(duplicate: bool) -> ReadError:
    if duplicate:
        return ReadError("invalid_request", "more than one Authorization header: send exactly one")
    return ReadError(
        "unauthenticated", "missing or invalid API key: send 'Authorization: Bearer <key>'"
    )


async def _send(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        _JSON_HEADER,
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Status(BaseModel):
    status: str


class Accepted(BaseModel):
    accepted: int


class _DocumentedApp(FastAPI):
    """FastAPI whose OpenAPI document also describes the directly served read routes."""

    read_paths: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    clock: Clock = staticmethod(now_ms)

    def openapi(self) -> dict[str, Any]:
        """The document, built once; the latest ``ts`` an event may carry is written as of
        each call (a bound that moves with the clock)."""
        if self.openapi_schema is None:
            schema = super().openapi()
            paths, schemas = self.read_paths
            schema["paths"] = {**paths, **schema.get("paths", {})}
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(schemas)
            components.setdefault("securitySchemes", {})["bearer"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "required when API keys are configured",
            }
            schema["security"] = [{}, {"bearer": []}]
            self.openapi_schema = schema
        set_ts_maximum(self.openapi_schema, self.clock())
        return self.openapi_schema


_ERROR_JSON: Final = {
    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
}
_ERROR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    400: {"description": "invalid request", "content": _ERROR_JSON},
    401: {"description": "missing or invalid API key", "content": _ERROR_JSON},
    503: {"description": "not available", "content": _ERROR_JSON},
}
_TOO_LARGE: Final[dict[int | str, dict[str, Any]]] = {
    413: {
        "description": "request body too large (by Content-Length, before it is read)",
        "content": _ERROR_JSON,
    }
}


def _protocol_rules(limits: HttpLimits) -> str:
    """What every request must satisfy, whatever its route (the document's description)."""
    return (
        "Fresh, stable user embeddings for rankers. Every error is "
        '`{"error": {"code", "message", "details"?}}`. On every request: the request line '
        f"and headers at most {limits.max_header_bytes} bytes (431, connection closed); "
        f"the head within {limits.head_timeout_s:g} s of its first byte or of the "
        f"connection, the body within {limits.body_timeout_s:g} s of the head (408, "
        "connection closed); a body over its route's limit is refused by its Content-"
        "Length before it is read, or as soon as it passes the limit when chunked (413, "
        "connection closed); with API keys configured, exactly one "
        "`Authorization: Bearer <key>` header (400 for two or more, 401 for a wrong one)."
    )


def create_app(
    store: Store,
    settings: Settings,
    cold_start: ColdStartSource | ServedModels,
    *,
    event_sink: EventSink | None = None,
    clock: Clock = now_ms,
    reader: EmbeddingReader | None = None,
) -> ApiApp:
    """The HTTP API over ``store``; the caller owns the store's and the sink's lifetime.

    Without ``reader`` one is built from ``settings`` and its background refresh
    flusher runs with the app's lifespan; a ``reader`` passed in (shared with the
    gRPC server) is run by the caller. Without ``event_sink``, POST /v1/events
    answers 503 (intake not configured). ``cold_start``: the served models and their
    cold starts (a plain callable: the default model's alone)."""
    owned = reader is None
    reads_core = reader or EmbeddingReader.from_settings(store, settings, cold_start, clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not owned:
            yield
            return
        stop = asyncio.Event()
        flusher = asyncio.create_task(reads_core.run(stop), name="refresh-flusher")
        yield
        stop.set()
        await flusher

    limits = HttpLimits(
        head_timeout_s=settings.api_head_timeout_s,
        body_timeout_s=settings.api_body_timeout_s,
        max_header_bytes=settings.api_max_header_bytes,
    )
    app = _DocumentedApp(
        title="userembed",
        summary="Fresh, stable user embeddings for rankers",
        description=_protocol_rules(limits),
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=JSONResponse,
        docs_url=None,  # served without a CDN by add_offline_docs below
        redoc_url=None,
    )
    add_offline_docs(app)
    app.clock = clock
    depth = settings.api_max_json_depth
    events_limit = settings.api_max_body_bytes
    batch_limit = max_request_bytes(settings)
    read_paths, read_schemas = openapi_read_paths(settings.batch_get_max_ids, batch_limit, depth)
    events_body, event_schemas = events_openapi(
        settings.api_events_max, events_limit, depth, body_rules(events_limit, depth)
    )
    app.read_paths = (read_paths, {**read_schemas, **event_schemas})

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return _error_response(exc.status, exc.code, exc.message, exc.headers, exc.details)

    @app.exception_handler(ReadError)
    async def _read_error(_: Request, exc: ReadError) -> Response:
        status = HTTP_STATUS.get(exc.code, 500)
        headers = {"Connection": "close"} if status == 413 else None  # the body is unread
        return _error_response(status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> Response:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error_response(400, "invalid_request", reasons)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        return _error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        # logged by ApiApp._delegate, where Starlette re-raises it after this answer
        return _error_response(500, "internal", "internal error; see the server log")

    @app.post(
        EVENTS_ROUTE,
        status_code=202,
        response_model=Accepted,
        responses={**_ERROR_RESPONSES, **_TOO_LARGE},
        openapi_extra={"requestBody": events_body},
    )
    async def post_events(request: Request) -> Response:
        """Validate a JSON array of events and hand them to Kafka (all or nothing)."""
        body = await read_body(request.receive, events_limit)
        events = validate_events(body, clock(), settings.api_events_max, depth)
        if event_sink is None:
            raise ApiError(503, "intake_disabled", "event intake is not configured on this API")
        try:
            await event_sink.send(events)
        except Exception as exc:
            raise ApiError(
                503, "intake_unavailable", f"events not accepted: {exc}", {"Retry-After": "1"}
            ) from exc
        return JSONResponse({"accepted": len(events)}, 202)

    @app.get("/healthz", response_model=Status)
    async def healthz() -> Response:
        """Liveness: the process answers."""
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", response_model=Status, responses={503: _ERROR_RESPONSES[503]})
    async def readyz() -> Response:
        """Readiness: the store answers and a model (cold-start embedding) is published."""
        problems = []
        try:
            await store.ping()
        except StoreUnavailable as exc:
            problems.append(str(exc))
        if reads_core.models.cold_start(DEFAULT_MODEL) is None and not settings.cold_start_404:
            problems.append("no model published: cold-start embedding unavailable")
        if problems:
            return _error_response(503, "not_ready", "; ".join(problems))
        return JSONResponse({"status": "ready"})

    @app.get(MODELS_ROUTE, response_model=ModelsResponse, responses={401: _ERROR_RESPONSES[401]})
    async def list_models() -> Response:
        """The served models (the registry's, followed at run time): version, space, dim,
        stored dtype, input schema hash and cold-start status."""
        body = models_body(reads_core.models, settings.embedding_dtype, settings.cold_start_404)
        return JSONResponse(body)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
    )
    async def metrics() -> Response:
        """Prometheus metrics of this process."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    keys = KeyChecker(settings.resolved_api_keys())
    return ApiApp(
        app,
        ReadEndpoints(reads_core, batch_limit, depth),
        keys,
        settings.api_auth_ops,
        max_body_bytes={BATCH_ROUTE: batch_limit, EVENTS_ROUTE: events_limit},
        default_max_body=settings.api_max_body_bytes,
        http_limits=limits,
    )
