"""The HTTP transport (httpx): ``GET /v1/users/{id}/embedding``,
``POST /v1/embeddings:batchGet`` with ``encoding=base64_float16`` (or float32) and
``GET /v1/models``, one pooled keep-alive connection set per client.

Vectors travel as base64 of little-endian floats (4.7x smaller than JSON numbers for
128-d) and are decoded with numpy, a whole batch at once.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from typing import Any, Final

import httpx
import orjson

from userembed.errors import (
    DeadlineExceeded,
    ServerError,
    Unavailable,
    UserembedError,
    error_from_http,
)
from userembed.results import (
    COLD_START_STATUSES,
    DEFAULT_MODEL,
    STATUSES,
    Embedding,
    ModelInfo,
    Status,
    stack_vectors,
)
from userembed.retry import parse_retry_after
from userembed.transport import Precision, Query

BATCH_PATH: Final = "/v1/embeddings:batchGet"
MODELS_PATH: Final = "/v1/models"
_ENCODING: Final[dict[str, tuple[str, str]]] = {
    "float16": ("base64_float16", "<f2"),
    "float32": ("base64_float32", "<f4"),
}
_JSON: Final = {"content-type": "application/json"}


def get_path(user_id: str) -> str:
    """The single-get path; ``.`` and ``..`` (valid ids) escaped so that no client or
    proxy takes them for dot segments."""
    segment = user_id.replace(".", "%2E") if user_id in (".", "..") else user_id
    return f"/v1/users/{segment}/embedding"


def decode_answers(rows: Sequence[dict[str, Any]], dtype: str) -> list[Embedding]:
    """JSON answers (base64 vectors of ``dtype``) as :class:`Embedding` objects."""
    packed = [binascii.a2b_base64(r["embedding"]) for r in rows if r["embedding"] is not None]
    vectors = iter(stack_vectors(packed, dtype))
    out = []
    for row in rows:
        status: Status = row["status"]
        if status not in STATUSES:
            raise ServerError(f"unknown status {status!r} in the answer for {row['user_id']!r}")
        out.append(
            Embedding(
                row["user_id"],
                status,
                next(vectors) if row["embedding"] is not None else None,
                row["model_version"],
                row["space_version"],
                row["computed_at"],
                row["feature_version"],
                row["staleness_ms"],
                row.get("model") or DEFAULT_MODEL,
            )
        )
    return out


def decode_models(body: dict[str, Any]) -> list[ModelInfo]:
    """The ``GET /v1/models`` answer as :class:`ModelInfo` objects."""
    out = []
    for row in body["models"]:
        if row["cold_start"] not in COLD_START_STATUSES:
            raise ServerError(f"unknown cold_start {row['cold_start']!r} of {row['name']!r}")
        out.append(
            ModelInfo(
                row["name"],
                row["version"],
                row["space_version"],
                row["dim"],
                row["dtype"],
                row["input_schema_hash"],
                row["cold_start"],
            )
        )
    return out


def error_of(response: httpx.Response) -> UserembedError:
    """The typed exception for a non-200 answer, from its ``{"error": {...}}`` envelope."""
    code = message = None
    try:
        error = orjson.loads(response.content)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = f"HTTP {response.status_code}: {response.text[:200]!r}"
    return error_from_http(
        response.status_code,
        code,
        message,
        request_id=response.headers.get("x-request-id"),
        retry_after_s=parse_retry_after(response.headers.get("retry-after")),
    )


def _transport_error(what: str, exc: httpx.HTTPError) -> UserembedError:
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineExceeded(f"{what}: no answer before the deadline", code="deadline_exceeded")
    return Unavailable(f"{what}: {exc!r}", code="connection_failed")


_UNREADABLE: Final = (orjson.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error)


def _decode(response: httpx.Response, batch: bool, dtype: str) -> list[Embedding]:
    try:
        body = orjson.loads(response.content)
        return decode_answers(body["embeddings"] if batch else [body], dtype)
    except _UNREADABLE as exc:
        raise ServerError(f"unreadable answer: {exc!r}", code="bad_answer") from exc


def _models(response: httpx.Response) -> list[ModelInfo]:
    if response.status_code != 200:
        raise error_of(response)
    try:
        return decode_models(orjson.loads(response.content))
    except _UNREADABLE as exc:
        raise ServerError(f"unreadable answer: {exc!r}", code="bad_answer") from exc


class _Requests:
    """What both HTTP transports send: headers, query, body."""

    def __init__(self, api_key: str | None, precision: Precision) -> None:
        self.encoding, self.dtype = _ENCODING[precision]
        self.headers = {"accept": "application/json", "user-agent": "userembed-client"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"

    def query(self, query: Query) -> dict[str, str]:
        """The single get's query string: its model (when named) and pin."""
        params = {"encoding": self.encoding}
        if query.models:
            params["model"] = query.models[0]
        pin = query.pin(query.names[0])
        if pin:
            params["model_version"] = pin
        return params

    def batch_body(self, user_ids: Sequence[str], query: Query) -> bytes:
        """The batchGet body: named models with per-model pins, or the unnamed default
        model with its pin (the body of a client from before there were several models)."""
        body: dict[str, Any] = {"user_ids": list(user_ids), "encoding": self.encoding}
        if query.models:
            body["models"] = list(query.models)
            if query.pins:
                body["model_versions"] = dict(query.pins)
        elif pin := query.pin():
            body["model_version"] = pin
        return orjson.dumps(body)


def _limits(max_connections: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)


class HttpTransport:
    """Blocking HTTP transport over one pooled ``httpx.Client`` (thread-safe)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        precision: Precision = "float16",
        max_connections: int = 32,
    ) -> None:
        self._requests = _Requests(api_key, precision)
        self._client = httpx.Client(
            base_url=base_url, headers=self._requests.headers, limits=_limits(max_connections)
        )

    def get(self, user_id: str, query: Query, timeout_s: float) -> Embedding:
        path = get_path(user_id)
        params = self._requests.query(query)
        try:
            response = self._client.get(path, params=params, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise _transport_error(f"GET {path}", exc) from exc
        if response.status_code != 200:
            raise error_of(response)
        return _decode(response, False, self._requests.dtype)[0]

    def batch_get(self, user_ids: Sequence[str], query: Query, timeout_s: float) -> list[Embedding]:
        try:
            response = self._client.post(
                BATCH_PATH,
                content=self._requests.batch_body(user_ids, query),
                headers=_JSON,
                timeout=timeout_s,
            )
        except httpx.HTTPError as exc:
            raise _transport_error(f"POST {BATCH_PATH}", exc) from exc
        if response.status_code != 200:
            raise error_of(response)
        return _decode(response, True, self._requests.dtype)

    def list_models(self, timeout_s: float) -> list[ModelInfo]:
        try:
            response = self._client.get(MODELS_PATH, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise _transport_error(f"GET {MODELS_PATH}", exc) from exc
        return _models(response)

    def close(self) -> None:
        self._client.close()


class AsyncHttpTransport:
    """asyncio HTTP transport over one pooled ``httpx.AsyncClient``."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        precision: Precision = "float16",
        max_connections: int = 32,
    ) -> None:
        self._requests = _Requests(api_key, precision)
        self._client = httpx.AsyncClient(
            base_url=base_url, headers=self._requests.headers, limits=_limits(max_connections)
        )

    async def get(self, user_id: str, query: Query, timeout_s: float) -> Embedding:
        path = get_path(user_id)
        params = self._requests.query(query)
        try:
            response = await self._client.get(path, params=params, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise _transport_error(f"GET {path}", exc) from exc
        if response.status_code != 200:
            raise error_of(response)
        return _decode(response, False, self._requests.dtype)[0]

    async def batch_get(
        self, user_ids: Sequence[str], query: Query, timeout_s: float
    ) -> list[Embedding]:
        try:
            response = await self._client.post(
                BATCH_PATH,
                content=self._requests.batch_body(user_ids, query),
                headers=_JSON,
                timeout=timeout_s,
            )
        except httpx.HTTPError as exc:
            raise _transport_error(f"POST {BATCH_PATH}", exc) from exc
        if response.status_code != 200:
            raise error_of(response)
        return _decode(response, True, self._requests.dtype)

    async def list_models(self, timeout_s: float) -> list[ModelInfo]:
        try:
            response = await self._client.get(MODELS_PATH, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise _transport_error(f"GET {MODELS_PATH}", exc) from exc
        return _models(response)

    async def aclose(self) -> None:
        await self._client.aclose()
