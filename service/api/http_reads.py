"""The read routes over HTTP, as plain ASGI handlers (no framework on the hot path),
and their OpenAPI description.

``GET /v1/users/{user_id}/embedding?encoding=&model_version=`` and
``POST /v1/embeddings:batchGet`` parse the request, call :class:`EmbeddingReader`
and write the answer with orjson. The pydantic models below only describe the
contract for the OpenAPI document (checked against live answers by the schemathesis
test); requests are decoded with msgspec.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qsl

import msgspec
import orjson
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope

from service.api.reads import (
    ENCODINGS,
    Answer,
    EmbeddingReader,
    Encoding,
    ReadError,
    parse_encoding,
    parse_pin,
)
from service.core.events import USER_ID_PATTERN

GET_PREFIX: Final = "/v1/users/"
GET_SUFFIX: Final = "/embedding"
GET_ROUTE: Final = "/v1/users/{user_id}/embedding"
BATCH_ROUTE: Final = "/v1/embeddings:batchGet"

HTTP_STATUS: Final[dict[str, int]] = {
    "invalid_user_id": 400,
    "invalid_encoding": 400,
    "invalid_model_version": 400,
    "invalid_request": 400,
    "batch_too_large": 400,
    "unauthenticated": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "version_mismatch": 409,
    "request_too_large": 413,
    "store_unavailable": 503,
    "store_misconfigured": 503,
}
_JSON_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY
_USER_ID_REGEX: Final = f"^{USER_ID_PATTERN.pattern}$"
# models.registry's version names; empty = no pin (proto3's unset string)
_VERSION_REGEX: Final = r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$"


class _BatchGetBody(msgspec.Struct):
    user_ids: list[str]
    encoding: str = "json"
    model_version: str | None = None


_decode_batch = msgspec.json.Decoder(_BatchGetBody).decode


def read_route(path: str) -> str | None:
    """The route template of a read path, or None for any other path."""
    if path == BATCH_ROUTE:
        return BATCH_ROUTE
    if path.startswith(GET_PREFIX) and path.endswith(GET_SUFFIX):
        return GET_ROUTE
    return None


def answer_dict(answer: Answer, encoding: Encoding) -> dict[str, Any]:
    return {
        "user_id": answer.user_id,
        "embedding": answer.encoded(encoding),
        "dim": answer.dim,
        "model_version": answer.model_version,
        "space_version": answer.space_version,
        "computed_at": answer.computed_at,
        "feature_version": answer.feature_version,
        "staleness_ms": answer.staleness_ms,
        "status": answer.status,
    }


class ReadEndpoints:
    """The two read routes; each returns the JSON body of a 200 or raises ReadError."""

    def __init__(self, reader: EmbeddingReader) -> None:
        self._reader = reader
        # ids are at most 128 chars; allow JSON overhead and whitespace generously
        self._max_body_bytes = max(1 << 20, reader.max_batch * 512)

    def handle(self, route: str, scope: Scope, receive: Receive) -> Awaitable[bytes]:
        """The answer's body, to be awaited (a plain function: one coroutine frame less on
        the hot path); raises ReadError, here or when awaited."""
        method = scope["method"]
        if route == GET_ROUTE:
            if method != "GET":
                raise ReadError("method_not_allowed", f"{method} not allowed: use GET")
            return self._get(scope)
        if method != "POST":
            raise ReadError("method_not_allowed", f"{method} not allowed: use POST")
        return self._batch_get(receive)

    async def _get(self, scope: Scope) -> bytes:
        path: str = scope["path"]
        user_id = path[len(GET_PREFIX) : len(path) - len(GET_SUFFIX)]
        encoding: Encoding = "json"
        pin = None
        if scope["query_string"]:
            query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
            encoding = parse_encoding(query.get("encoding", "json"))
            pin = parse_pin(query.get("model_version"))
        answer = await self._reader.get(user_id, pin)
        return orjson.dumps(answer_dict(answer, encoding), option=_JSON_OPTIONS)

    async def _batch_get(self, receive: Receive) -> bytes:
        body = await self._body(receive)
        try:
            request = _decode_batch(body)
        except msgspec.DecodeError as exc:
            raise ReadError("invalid_request", f"invalid batchGet body: {exc}") from None
        encoding = parse_encoding(request.encoding)
        answers = await self._reader.batch_get(request.user_ids, parse_pin(request.model_version))
        embeddings = [answer_dict(a, encoding) for a in answers]
        return orjson.dumps({"embeddings": embeddings}, option=_JSON_OPTIONS)

    async def _body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ReadError("invalid_request", "client disconnected before sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body_bytes:
                raise ReadError(
                    "request_too_large", f"request body over {self._max_body_bytes} bytes"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


# --- the contract, for the OpenAPI document --------------------------------------

UserId = Annotated[str, Field(pattern=_USER_ID_REGEX)]
ModelVersion = Annotated[str, Field(pattern=_VERSION_REGEX)]


class EmbeddingAnswer(BaseModel):
    """One user's embedding; ``embedding`` is null for not_found and version_mismatch."""

    user_id: str
    embedding: list[float] | str | None = Field(
        description="float numbers (encoding=json) or base64 of little-endian float16/float32"
    )
    dim: int | None
    model_version: str | None = Field(description="the model that computed the embedding")
    space_version: str | None = Field(description="the space it is expressed in (pin this)")
    computed_at: int | None = Field(description="epoch ms; null for a cold start")
    feature_version: int | None = Field(description="the feature state it was computed from")
    staleness_ms: int | None
    status: Literal["fresh", "stale", "cold_start", "not_found", "version_mismatch"]


class BatchGetRequest(BaseModel):
    user_ids: list[UserId]
    encoding: Encoding = "json"
    model_version: ModelVersion | None = Field(
        None, description="only serve embeddings in this space"
    )


class BatchGetResponse(BaseModel):
    embeddings: list[EmbeddingAnswer] = Field(description="in request order")


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "invalid user id, encoding, model_version or body; batch too large",
        401: "missing or invalid API key (when keys are configured)",
        404: "no embedding (cold start disabled, or not in the pinned space)",
        409: "the stored embedding is in another space than the pinned model_version",
        413: "request body too large",
        503: "the store did not answer in time; see Retry-After",
    }
    return {
        str(s): {
            "description": reasons[s],
            "content": _json(ErrorResponse),
            **({"headers": {"Retry-After": {"schema": {"type": "string"}}}} if s == 503 else {}),
        }
        for s in statuses
    }


def openapi_read_paths(max_batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(paths, component schemas) describing the read routes."""
    schemas: dict[str, Any] = {}
    for model in (EmbeddingAnswer, BatchGetRequest, BatchGetResponse, ErrorResponse):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["BatchGetRequest"]["properties"]["user_ids"]["maxItems"] = max_batch
    query = [
        {
            "name": "encoding",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": list(ENCODINGS), "default": "json"},
        },
        {
            "name": "model_version",
            "in": "query",
            "required": False,
            "description": "only serve an embedding in this space (409/404 otherwise)",
            "schema": {"type": "string", "pattern": _VERSION_REGEX},
        },
    ]
    paths = {
        GET_ROUTE: {
            "get": {
                "summary": "One user's embedding, from the store at once",
                "operationId": "getEmbedding",
                "parameters": [
                    {
                        "name": "user_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": _USER_ID_REGEX},
                    },
                    *query,
                ],
                "responses": {
                    "200": {"description": "the embedding", "content": _json(EmbeddingAnswer)},
                    **_errors(400, 401, 404, 409, 503),
                },
            }
        },
        BATCH_ROUTE: {
            "post": {
                "summary": f"Up to {max_batch} users' embeddings in one store read",
                "operationId": "batchGetEmbeddings",
                "requestBody": {"required": True, "content": _json(BatchGetRequest)},
                "responses": {
                    "200": {"description": "answers", "content": _json(BatchGetResponse)},
                    **_errors(400, 401, 413, 503),
                },
            }
        },
    }
    return paths, schemas
