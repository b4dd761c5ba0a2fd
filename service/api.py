"""The read API for rankers: one bulk Redis read per request, never any model work.

A missing or stale embedding still gets an immediate answer (the cold-start
embedding, or the stale one, flagged as such) and a background refresh request.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import numpy as np
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.clock import Clock, now_ms
from service.cold_start import ColdStart
from service.embeddings import EmbeddingRecord
from service.events import Event, EventRejected, convert_event, user_id_problem
from service.ingest import EventSink
from service.metrics import API_REQUEST_SECONDS, API_SERVED, API_STORE_ERRORS
from service.refresh import RefreshRequester
from service.settings import Settings
from service.store import Store, StoreUnavailable

ColdStartSource = Callable[[], ColdStart | None]


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers
        self.details = details


class BatchGetRequest(BaseModel):
    user_ids: list[str]


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return JSONResponse({"error": error}, status, headers=headers)


class MetricsMiddleware:
    """Latency per route template and status, as a pure ASGI middleware (no per-request
    task or body buffering, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            API_REQUEST_SECONDS.labels(template, str(status)).observe(time.perf_counter() - started)


class EmbeddingReader:
    """Turns stored records into answers and asks for refreshes of missing/stale ones."""

    def __init__(
        self,
        store: Store,
        cold_start: ColdStartSource,
        refresher: RefreshRequester,
        *,
        refresh_after_ms: int,
        cold_start_404: bool,
        clock: Clock = now_ms,
    ) -> None:
        self._store = store
        self._cold_start = cold_start
        self._refresher = refresher
        self._refresh_after_ms = refresh_after_ms
        self._cold_start_404 = cold_start_404
        self._clock = clock

    async def read(self, user_ids: Sequence[str]) -> list[dict[str, Any]]:
        try:
            records = await self._store.get_embeddings(user_ids)
        except StoreUnavailable as exc:
            API_STORE_ERRORS.inc()
            raise ApiError(
                503, "store_unavailable", f"{exc}; retry shortly", {"Retry-After": "1"}
            ) from exc
        now = self._clock()
        answers = [self._answer(u, r, now) for u, r in zip(user_ids, records, strict=True)]
        self._refresher.request(a["user_id"] for a in answers if a["status"] != "fresh")
        return answers

    def _answer(self, user_id: str, record: EmbeddingRecord | None, now: int) -> dict[str, Any]:
        if record is not None:
            staleness = record.staleness_ms(now)
            status = "fresh" if staleness <= self._refresh_after_ms else "stale"
            API_SERVED.labels(status).inc()
            return {
                "user_id": user_id,
                "embedding": record.vector.astype(np.float32),
                "dim": record.dim,
                "model_version": record.model_version,
                "space_version": record.space_version,
                "computed_at": record.computed_at_ms,
                "feature_version": record.feature_version,
                "staleness_ms": staleness,
                "status": status,
            }
        cold = None if self._cold_start_404 else self._cold_start()
        API_SERVED.labels("cold_start" if cold else "not_found").inc()
        return {
            "user_id": user_id,
            "embedding": None if cold is None else cold.vector,
            "dim": None if cold is None else int(cold.vector.shape[0]),
            "model_version": None if cold is None else cold.model_version,
            "space_version": None if cold is None else cold.model_version,
            "computed_at": None,
            "feature_version": None,
            "staleness_ms": None,
            "status": "not_found" if cold is None else "cold_start",
        }


def _check_user_id(user_id: str) -> None:
    problem = user_id_problem(user_id)
    if problem is not None:
        raise ApiError(400, "invalid_user_id", problem)


def bearer_auth(keys: Sequence[str]) -> Callable[[Request], Awaitable[None]]:
    """A dependency that requires ``Authorization: Bearer <key>`` for one of ``keys``."""
    encoded = [k.encode() for k in keys]

    async def check(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare against every key, so timing does not reveal which one matched
        matched = [hmac.compare_digest(token.encode(), k) for k in encoded]
        if scheme.lower() != "bearer" or not any(matched):
            raise ApiError(
                401,
                "unauthenticated",
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer"},
            )

    return check


def validate_events(body: bytes, now: int, max_events: int) -> list[Event]:
    """Parse a JSON array of events; all or nothing, with every rejection's reason."""
    try:
        items = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_request", f"body is not valid JSON: {exc}") from None
    if not isinstance(items, list) or not items:
        raise ApiError(400, "invalid_request", "body must be a non-empty JSON array of events")
    if len(items) > max_events:
        raise ApiError(
            400, "batch_too_large", f"{len(items)} events sent; at most {max_events} per call"
        )
    events: list[Event] = []
    rejected: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            events.append(convert_event(item, now))
        except EventRejected as exc:
            rejected.append({"index": index, "reason": exc.reason})
    if rejected:
        raise ApiError(
            400,
            "invalid_events",
            f"{len(rejected)} of {len(items)} events rejected; nothing was accepted",
            details=rejected,
        )
    return events


def create_app(
    store: Store,
    settings: Settings,
    cold_start: ColdStartSource,
    *,
    event_sink: EventSink | None = None,
    clock: Clock = now_ms,
) -> FastAPI:
    """The FastAPI app over ``store``; the caller owns the store's and the sink's lifetime.

    Without ``event_sink``, POST /v1/events answers 503 (intake not configured)."""
    refresher = RefreshRequester(store, int(settings.refresh_coalesce_s * 1000), clock=clock)
    reader = EmbeddingReader(
        store,
        cold_start,
        refresher,
        refresh_after_ms=int(settings.refresh_after_s * 1000),
        cold_start_404=settings.cold_start_404,
        clock=clock,
    )
    max_ids = settings.batch_get_max_ids

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        flusher = asyncio.create_task(refresher.run(stop), name="refresh-flusher")
        yield
        stop.set()
        await flusher

    app = FastAPI(
        title="userembed",
        summary="Fresh, stable user embeddings for rankers",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.add_middleware(MetricsMiddleware)
    keys = settings.resolved_api_keys()
    auth = [Depends(bearer_auth(keys))] if keys else []

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return _error_response(exc.status, exc.code, exc.message, exc.headers, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> Response:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error_response(400, "invalid_request", reasons)

    @app.get("/v1/users/{user_id}/embedding", dependencies=auth)
    async def get_embedding(user_id: str) -> Response:
        _check_user_id(user_id)
        (answer,) = await reader.read([user_id])
        if answer["status"] == "not_found":
            raise ApiError(
                404, "not_found", f"no embedding for {user_id!r} yet; a refresh was requested"
            )
        return JSONResponse(answer)

    @app.post("/v1/embeddings:batchGet", dependencies=auth)
    async def batch_get(body: BatchGetRequest) -> Response:
        if len(body.user_ids) > max_ids:
            raise ApiError(
                400,
                "batch_too_large",
                f"{len(body.user_ids)} user_ids requested; at most {max_ids} per call",
            )
        for user_id in body.user_ids:
            _check_user_id(user_id)
        return JSONResponse({"embeddings": await reader.read(body.user_ids)})

    @app.post("/v1/events", dependencies=auth, status_code=202)
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

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
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

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
