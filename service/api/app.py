"""The HTTP API: the read routes for rankers, event intake, health and metrics.

:class:`ApiApp` is the ASGI entry point. It gives every request an id, checks API
keys, counts in-flight requests and observes latency; the two read routes are
answered directly by :mod:`service.api.http_reads` (no framework on the hot path),
everything else by a small FastAPI app, which also serves the OpenAPI document
of all routes. Errors are ``{"error": {"code", "message", "details"?}}``.
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

from service.api.frontend import REQUEST_ID, KeyChecker, RouteLatency, new_request_id
from service.api.http_events import ApiError, events_openapi, validate_events
from service.api.http_reads import (
    GET_ROUTE,
    HTTP_STATUS,
    ReadEndpoints,
    openapi_read_paths,
    read_route,
)
from service.api.reads import ColdStartSource, EmbeddingReader, ReadError
from service.core.clock import Clock, now_ms
from service.core.events import EventSink
from service.metrics import API_IN_FLIGHT
from service.settings import Settings
from service.store.protocol import Store, StoreUnavailable

log = logging.getLogger(__name__)

OPS_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
DOC_PATHS: Final = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_JSON_HEADER: Final = (b"content-type", b"application/json")


class JSONResponse(StarletteJSONResponse):
    """JSON via orjson (numpy arrays included)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return orjson.dumps({"error": error})


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
    """ASGI entry point: request id, auth, metrics; read routes direct, the rest FastAPI."""

    def __init__(
        self, app: FastAPI, reads: ReadEndpoints, keys: KeyChecker, auth_ops: bool
    ) -> None:
        self.app = app
        self._reads = reads
        self._keys = keys
        self._open = (DOC_PATHS | OPS_PATHS) if not auth_ops else DOC_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        authorization = offered_id = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-request-id":
                offered_id = value
        request_id = new_request_id(offered_id)
        REQUEST_ID.set(request_id)  # each request runs in its own task and context
        path: str = scope["path"]
        route = read_route(path)
        API_IN_FLIGHT.inc()
        status = 500
        try:
            if self._keys and path not in self._open and not self._keys.allows(authorization):
                status = await self._fail(
                    send,
                    request_id,
                    ReadError(
                        "unauthenticated",
                        "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    ),
                )
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

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        await self.app(scope, receive, send_with_id)
        return status


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

    def openapi(self) -> dict[str, Any]:
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
        return self.openapi_schema


_ERROR_JSON: Final = {
    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
}
_ERROR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    400: {"description": "invalid request", "content": _ERROR_JSON},
    401: {"description": "missing or invalid API key", "content": _ERROR_JSON},
    503: {"description": "not available", "content": _ERROR_JSON},
}


def create_app(
    store: Store,
    settings: Settings,
    cold_start: ColdStartSource,
    *,
    event_sink: EventSink | None = None,
    clock: Clock = now_ms,
    reader: EmbeddingReader | None = None,
) -> ApiApp:
    """The HTTP API over ``store``; the caller owns the store's and the sink's lifetime.

    Without ``reader`` one is built from ``settings`` and its background refresh
    flusher runs with the app's lifespan; a ``reader`` passed in (shared with the
    gRPC server) is run by the caller. Without ``event_sink``, POST /v1/events
    answers 503 (intake not configured)."""
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

    app = _DocumentedApp(
        title="userembed",
        summary="Fresh, stable user embeddings for rankers",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    read_paths, read_schemas = openapi_read_paths(settings.batch_get_max_ids)
    events_body, event_schemas = events_openapi(settings.api_events_max)
    app.read_paths = (read_paths, {**read_schemas, **event_schemas})

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return _error_response(exc.status, exc.code, exc.message, exc.headers, exc.details)

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

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=Accepted,
        responses=_ERROR_RESPONSES,
        openapi_extra={"requestBody": events_body},
    )
    async def post_events(request: Request) -> Response:
        """Validate a JSON array of events and hand them to Kafka (all or nothing)."""
        events = validate_events(await request.body(), clock(), settings.api_events_max)
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
        if cold_start() is None and not settings.cold_start_404:
            problems.append("no model published: cold-start embedding unavailable")
        if problems:
            return _error_response(503, "not_ready", "; ".join(problems))
        return JSONResponse({"status": "ready"})

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
    )
    async def metrics() -> Response:
        """Prometheus metrics of this process."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    keys = KeyChecker(settings.resolved_api_keys())
    return ApiApp(app, ReadEndpoints(reads_core), keys, settings.api_auth_ops)
