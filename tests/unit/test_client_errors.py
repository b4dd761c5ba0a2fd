"""The client's typed exceptions, from every error code the server documents (HTTP) and
every gRPC status code it uses."""

from __future__ import annotations

import httpx
import pytest

from service.api.grpc_service import ERROR_CODE_METADATA, GRPC_CODE
from service.api.http_reads import HTTP_STATUS
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
    error_from_grpc,
    error_from_http,
)
from userembed.grpc_transport import ERROR_CODE_METADATA as CLIENT_ERROR_CODE_METADATA
from userembed.http_transport import error_of

EXPECTED = {
    "invalid_user_id": InvalidRequest,
    "invalid_encoding": InvalidRequest,
    "invalid_model_version": InvalidRequest,
    "invalid_model": InvalidRequest,
    "invalid_request": InvalidRequest,
    "batch_too_large": InvalidRequest,
    "unauthenticated": Unauthenticated,
    "not_found": NotFound,
    "unknown_model": UnknownModel,
    "method_not_allowed": InvalidRequest,
    "version_mismatch": VersionMismatch,
    "request_too_large": InvalidRequest,
    "store_unavailable": Unavailable,
    "store_misconfigured": Unavailable,
}


def test_every_server_error_code_has_its_class() -> None:
    assert set(HTTP_STATUS) == set(EXPECTED)  # a new server code needs a decision here
    for code, status in HTTP_STATUS.items():
        error = error_from_http(status, code, "why")
        assert type(error) is EXPECTED[code], code
        assert (error.code, error.http_status, error.message) == (code, status, "why")


def test_every_grpc_code_the_server_uses_maps_like_its_http_twin() -> None:
    assert CLIENT_ERROR_CODE_METADATA == ERROR_CODE_METADATA
    for code, grpc_code in GRPC_CODE.items():
        # with the server's code (trailing metadata): the same class and code as HTTP
        error = error_from_grpc(grpc_code.name, "why", code=code, request_id="r1")
        assert type(error) is EXPECTED[code], code
        assert (error.code, error.message, error.request_id) == (code, "why", "r1")
        # without it (an older server, a proxy): the status decides
        bare = error_from_grpc(grpc_code.name, "why")
        assert bare.code == grpc_code.name.lower()
        assert type(bare) is (NotFound if code == "unknown_model" else EXPECTED[code]), code
    assert type(error_from_grpc("NOT_FOUND", "x", code="something_new")) is NotFound
    assert isinstance(error_from_grpc("DEADLINE_EXCEEDED", None), DeadlineExceeded)
    assert type(error_from_grpc("INTERNAL", "boom")) is ServerError


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, InvalidRequest),
        (401, Unauthenticated),
        (404, NotFound),
        (409, VersionMismatch),
        (418, InvalidRequest),
        (500, ServerError),
        (502, Unavailable),
        (503, Unavailable),
        (504, Unavailable),
    ],
)
def test_unknown_codes_fall_back_to_the_http_status(status: int, cls: type[UserembedError]) -> None:
    assert type(error_from_http(status, "something_new", "x")) is cls
    assert type(error_from_http(status, None, None)) is cls


def test_only_unavailable_is_retryable() -> None:
    classes = set(EXPECTED.values()) | {DeadlineExceeded, ServerError}
    assert UnknownModel in classes and not issubclass(UnknownModel, NotFound)
    retryable = {cls for cls in classes if cls.retryable}
    assert retryable == {Unavailable}


def test_an_http_answer_becomes_its_error_with_request_id_and_retry_after() -> None:
    response = httpx.Response(
        503,
        json={"error": {"code": "store_unavailable", "message": "store down; retry shortly"}},
        headers={"retry-after": "2", "x-request-id": "abc-1"},
    )
    error = error_of(response)
    assert isinstance(error, Unavailable)
    assert (error.retry_after_s, error.request_id) == (2.0, "abc-1")
    assert str(error) == "store down; retry shortly [store_unavailable] (request id abc-1)"


def test_an_answer_outside_the_envelope_is_still_typed() -> None:
    error = error_of(httpx.Response(502, text="<html>bad gateway</html>"))
    assert isinstance(error, Unavailable) and "bad gateway" in error.message
