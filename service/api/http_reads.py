"""The read routes over HTTP, as plain ASGI handlers (no framework on the hot path),
and their OpenAPI description.

``GET /v1/users/{user_id}/embedding?encoding=&model_version=&model=`` and
``POST /v1/embeddings:batchGet`` parse the request, call :class:`EmbeddingReader`
and write the answer with orjson. The pydantic models below only describe the
contract for the OpenAPI document (checked against live answers by the schemathesis
test); requests are decoded with msgspec. An answer carries ``model`` when the
request named a model (``model``, ``models``): a client that never names one gets
exactly the answers it got before there were several models.
"""

from __future__ import annotations

from binascii import b2a_base64
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qsl

import msgspec
import numpy as np
import orjson
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope

from service.api.cold_start import ColdStartStatus, ServedModels
from service.api.http_body import read_body
from service.api.reads import (
    DEFAULT_ONLY,
    ENCODINGS,
    Answer,
    AnswerColumns,
    EmbeddingReader,
    Encoding,
    ReadError,
    parse_encoding,
    parse_model,
    parse_models,
    parse_pin,
    parse_pins,
)
from service.core.embeddings import LITTLE_ENDIAN, EmbeddingDtype, StoredColumns
from service.core.events import USER_ID_PATTERN
from service.core.json_depth import json_depth_problem
from service.core.model_names import MODEL_NAME_PATTERN

GET_PREFIX: Final = "/v1/users/"
GET_SUFFIX: Final = "/embedding"
GET_ROUTE: Final = "/v1/users/{user_id}/embedding"
BATCH_ROUTE: Final = "/v1/embeddings:batchGet"
MODELS_ROUTE: Final = "/v1/models"

HTTP_STATUS: Final[dict[str, int]] = {
    "invalid_user_id": 400,
    "invalid_encoding": 400,
    "invalid_model_version": 400,
    "invalid_model": 400,
    "invalid_request": 400,
    "batch_too_large": 400,
    "unauthenticated": 401,
    "not_found": 404,
    "unknown_model": 404,
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
_MODEL_REGEX: Final = f"^{MODEL_NAME_PATTERN}$"


class _BatchGetBody(msgspec.Struct):
    user_ids: list[str]
    encoding: str = "json"
    model_version: str | None = None
    models: list[str] | None = None
    model_versions: dict[str, str] | None = None


_decode_batch = msgspec.json.Decoder(_BatchGetBody).decode


def read_route(path: str) -> str | None:
    """The route template of a read path, or None for any other path."""
    if path == BATCH_ROUTE:
        return BATCH_ROUTE
    if path.startswith(GET_PREFIX) and path.endswith(GET_SUFFIX):
        return GET_ROUTE
    return None


def answer_dicts(
    answers: Sequence[Answer], encoding: Encoding, named: bool = False
) -> list[dict[str, Any]]:
    """The JSON answers; with ``model`` when the request ``named`` a model. One pass with
    the fields inline: this is the per-user cost of a batch read."""
    bodies = [
        {
            "user_id": a.user_id,
            "embedding": a.encoded(encoding),
            "dim": a.dim,
            "model_version": a.model_version,
            "space_version": a.space_version,
            "computed_at": a.computed_at,
            "feature_version": a.feature_version,
            "staleness_ms": a.staleness_ms,
            "status": a.status,
        }
        for a in answers
    ]
    if named:
        for body, answer in zip(bodies, answers, strict=True):
            body["model"] = answer.model
    return bodies


def columns_body(answers: AnswerColumns, encoding: Encoding, named: bool = False) -> bytes:
    """The batchGet body of answers read as columns, the same bytes as orjson writes of
    :func:`answer_dicts`, without a dict per user: each answer is its user, vector and
    numbers put into one of two byte templates (fresh, stale)."""
    records = answers.records
    head = b"".join(
        (
            b'{"user_id":%b,"embedding":',
            b"%b" if encoding == "json" else b'"%b"',
            b',"dim":%d,"model_version":%b,"space_version":%b,'
            % (records.dim, _constant(records.model_version), _constant(records.space_version)),
            b'"computed_at":%d,"feature_version":%d,"staleness_ms":%d,"status":',
        )
    )
    tail = b',"model":%b}' % _constant(answers.model) if named else b"}"
    templates = (head + b'"fresh"' + tail, head + b'"stale"' + tail)
    dumps = orjson.dumps
    return b'{"embeddings":[%b]}' % b",".join(
        [
            templates[stale] % (dumps(user_id), vector, computed_at, feature_version, staleness)
            for user_id, stale, vector, computed_at, feature_version, staleness in answers.rows(
                _vectors(records, encoding)
            )
        ]
    )


def _constant(value: str) -> bytes:
    """``value`` as JSON, for a template: its ``%`` escaped (a record's versions are
    whatever its writer wrote)."""
    return orjson.dumps(value).replace(b"%", b"%%")


def _vectors(records: StoredColumns, encoding: Encoding) -> list[bytes]:
    """Each record's vector as ``encoding`` writes it in JSON (quotes aside)."""
    if encoding == "json":  # one orjson call for the matrix, cut into its rows
        stored = records.vectors.view(LITTLE_ENDIAN[records.dtype])
        as_json = orjson.dumps(stored.astype(np.float32), option=_JSON_OPTIONS)
        return [b"[%b]" % row for row in as_json[2:-2].split(b"],[")] if len(stored) else []
    want: EmbeddingDtype = "float16" if encoding == "base64_float16" else "float32"
    return [b2a_base64(data, newline=False) for data in records.packed(want)]


class ReadEndpoints:
    """The two read routes; each returns the JSON body of a 200 or raises ReadError."""

    def __init__(self, reader: EmbeddingReader, max_body_bytes: int, max_depth: int) -> None:
        self._reader = reader
        self.max_body_bytes = max_body_bytes
        self._max_depth = max_depth

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
        pin = name = None
        if scope["query_string"]:
            # blank values are dropped: ?encoding= is the default, ?model_version= any
            # space, ?model= the default model
            query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
            encoding = parse_encoding(query.get("encoding", "json"))
            pin = parse_pin(query.get("model_version"))
            name = query.get("model")
        answer = await self._reader.get(user_id, pin, parse_model(name))
        (body,) = answer_dicts((answer,), encoding, bool(name))
        return orjson.dumps(body, option=_JSON_OPTIONS)

    async def _batch_get(self, receive: Receive) -> bytes:
        request = parse_batch_get(await read_body(receive, self.max_body_bytes), self._max_depth)
        answers = await self._reader.batch_get(
            request.user_ids, request.pin, models=request.models, pins=request.pins
        )
        if isinstance(answers, AnswerColumns):
            return columns_body(answers, request.encoding, request.named)
        embeddings = answer_dicts(answers, request.encoding, request.named)
        return orjson.dumps({"embeddings": embeddings}, option=_JSON_OPTIONS)


@dataclass(slots=True)
class BatchGet:
    """A parsed batchGet body (its ids, and whether its models are served, are checked
    by the reader). ``named``: the body named its models (``models``)."""

    user_ids: list[str]
    encoding: Encoding
    pin: str | None
    models: Sequence[str] = DEFAULT_ONLY
    pins: dict[str, str] | None = None
    named: bool = False


def parse_batch_get(body: bytes, max_depth: int) -> BatchGet:
    """The batchGet body; ReadError ``invalid_request`` (not JSON, not the shape, nested
    deeper than ``max_depth``, empty or repeated models), ``invalid_encoding``,
    ``invalid_model`` or ``invalid_model_version``."""
    problem = json_depth_problem(body, max_depth)
    if problem is not None:
        raise ReadError("invalid_request", f"invalid batchGet body: {problem}")
    try:
        request = _decode_batch(body)
    except msgspec.DecodeError as exc:
        raise ReadError("invalid_request", f"invalid batchGet body: {exc}") from None
    except RecursionError:  # not reached under the depth bound; never a 500 if it is
        raise ReadError("invalid_request", "invalid batchGet body: nested too deep") from None
    named = request.models is not None
    return BatchGet(
        request.user_ids,
        parse_encoding(request.encoding),
        parse_pin(request.model_version),
        parse_models(request.models) if request.models is not None else DEFAULT_ONLY,
        parse_pins(request.model_versions) if request.model_versions else None,
        named,
    )


# --- the contract, for the OpenAPI document --------------------------------------

UserId = Annotated[str, Field(pattern=_USER_ID_REGEX)]
ModelVersion = Annotated[str, Field(pattern=_VERSION_REGEX)]
ModelName = Annotated[str, Field(pattern=_MODEL_REGEX)]


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
    model: str = Field(
        "default", description="the model of this answer; present when the request named models"
    )


class BatchGetRequest(BaseModel):
    user_ids: list[UserId]
    encoding: Encoding = "json"
    model_version: ModelVersion | None = Field(
        None, description="only serve embeddings in this space (a request of one model)"
    )
    models: list[ModelName] | None = Field(
        None,
        description="the models to answer, each user's answer of each model in turn "
        "(user-major); omitted = the default model alone, answers without `model`",
    )
    model_versions: dict[ModelName, ModelVersion] | None = Field(
        None,
        description="per-model pins (model -> space) of models named in `models`; "
        "not with model_version; an empty space is no pin",
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
        400: "invalid user id, encoding, model, model_version or body; batch too large",
        401: "missing or invalid API key (when keys are configured)",
        404: "unknown_model: the model is not served (the message lists the served "
        "models); not_found: no embedding (cold start disabled, or not in the pinned space)",
        409: "the stored embedding is in another space than the pinned model_version",
        413: "request body too large (by Content-Length, before it is read)",
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


def body_rules(max_body_bytes: int, max_depth: int) -> str:
    """What the server enforces on every JSON body, for the OpenAPI document."""
    return (
        f"JSON (UTF-8), at most {max_body_bytes} bytes (413 above: by Content-Length "
        f"before reading, while reading when it is chunked) and at most {max_depth} levels "
        "of nested arrays/objects (400 deeper). Send it within the server's body timeout "
        "(408 and the connection closed otherwise)."
    )


def openapi_read_paths(
    max_batch: int, max_body_bytes: int, max_depth: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(paths, component schemas) describing the read routes."""
    schemas: dict[str, Any] = {}
    for model in (EmbeddingAnswer, BatchGetRequest, BatchGetResponse, ErrorResponse):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    request = schemas["BatchGetRequest"]["properties"]
    request["user_ids"]["maxItems"] = max_batch
    request["models"]["anyOf"][0].update(minItems=1, uniqueItems=True)
    request["model_versions"]["anyOf"][0] = {  # pydantic writes patternProperties: any key
        "type": "object",
        "propertyNames": {"pattern": _MODEL_REGEX},
        "additionalProperties": {"type": "string", "pattern": _VERSION_REGEX},
    }
    query = [
        {
            "name": "encoding",
            "in": "query",
            "required": False,
            "description": "how the vector is written; empty (`?encoding=`) = omitted = json",
            "allowEmptyValue": True,
            "schema": {"type": "string", "enum": list(ENCODINGS), "default": "json"},
        },
        {
            "name": "model_version",
            "in": "query",
            "required": False,
            "description": "only serve an embedding in this space (409/404 otherwise); "
            "empty = omitted = any space",
            "allowEmptyValue": True,
            "schema": {"type": "string", "pattern": _VERSION_REGEX},
        },
        {
            "name": "model",
            "in": "query",
            "required": False,
            "description": "the model whose embedding to serve (404 unknown_model when it "
            "is not served); empty = omitted = the default model, answered without `model`",
            "allowEmptyValue": True,
            "schema": {"type": "string", "pattern": f"^({MODEL_NAME_PATTERN})?$"},
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
                "summary": f"Up to {max_batch} embeddings (users x models) in one store read",
                "operationId": "batchGetEmbeddings",
                "requestBody": {
                    "required": True,
                    "description": body_rules(max_body_bytes, max_depth),
                    "content": _json(BatchGetRequest),
                    "x-max-bytes": max_body_bytes,
                    "x-max-depth": max_depth,
                },
                "responses": {
                    "200": {"description": "answers", "content": _json(BatchGetResponse)},
                    **_errors(400, 401, 404, 413, 503),
                },
            }
        },
    }
    return paths, schemas


class ModelInfo(BaseModel):
    """One served model, as the API sees the registry."""

    name: str = Field(description="what `model` / `models` name ('default' when omitted)")
    version: str | None = Field(description="the version whose cold start is loaded")
    space_version: str | None = Field(description="the space it serves (what pins name)")
    dim: int | None
    dtype: Literal["float16", "float32"] = Field(description="how records are stored")
    input_schema_hash: str | None
    cold_start: ColdStartStatus = Field(
        description="available; unavailable (its artifact could not be loaded: users "
        "without a record are not_found); disabled (cold_start_404)"
    )


class ModelsResponse(BaseModel):
    models: list[ModelInfo] = Field(description="the default model first, then by name")


def models_body(models: ServedModels, dtype: str, cold_start_disabled: bool) -> dict[str, Any]:
    """The ``GET /v1/models`` answer."""
    return {
        "models": [
            {
                "name": state.name,
                "version": state.version,
                "space_version": state.space_version,
                "dim": state.dim,
                "dtype": dtype,
                "input_schema_hash": state.input_schema_hash,
                "cold_start": state.cold_start_status(cold_start_disabled),
            }
            for state in models.states()
        ]
    }
