"""Typed exceptions, mapped from the server's error codes (HTTP) and status codes (gRPC).

Over HTTP every error is ``{"error": {"code", "message"}}``; over gRPC the server sends
the same code as ``userembed-error-code`` trailing metadata. The class follows the code
(``not_found`` -> :class:`NotFound`, ``unknown_model`` -> :class:`UnknownModel`), or the
HTTP or gRPC status for a code this client does not know (or a server or proxy that
sent none: ``FAILED_PRECONDITION`` -> :class:`VersionMismatch`). Pure: no transport is
imported here.
"""

from __future__ import annotations

from typing import Final


class UserembedError(Exception):
    """Base of every error the client raises.

    ``code`` is the server's error code (``invalid_user_id``, ``not_found``, ...), over
    gRPC too; the gRPC status name in lower case when a gRPC answer carried none; or the
    client's own code (``deadline_exceeded``, ``connection_failed``); ``http_status`` is
    None over gRPC;
    ``request_id`` is the server's ``x-request-id`` when it answered; ``attempts`` is how
    many requests the call made before giving up.
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.attempts = 1

    def __str__(self) -> str:
        where = f" [{self.code}]" if self.code else ""
        request = f" (request id {self.request_id})" if self.request_id else ""
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"{self.message}{where}{request}{tries}"


class InvalidRequest(UserembedError):
    """The server refused the request as malformed (400, 413; gRPC INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED): a bad user id, encoding, model_version or a batch too large.
    Retrying the same request cannot succeed."""


class Unauthenticated(UserembedError):
    """Missing or wrong API key (401; gRPC UNAUTHENTICATED): pass ``api_key=``."""


class NotFound(UserembedError):
    """No embedding to serve for a single get (404; gRPC NOT_FOUND): cold start disabled,
    or none in the pinned space. ``get_many`` reports it per user instead."""


class UnknownModel(UserembedError):
    """The read names a model the server does not serve (404 ``unknown_model``; gRPC
    NOT_FOUND): never published, or retired. The message lists the served models, as
    does ``list_models()``. Not a :class:`NotFound`: it concerns the request, not a user."""


class VersionMismatch(UserembedError):
    """The stored embedding is in another space than the pinned ``model_version`` (409;
    gRPC FAILED_PRECONDITION). ``get_many`` reports it per user instead."""


class Unavailable(UserembedError):
    """The server or its store did not answer (503 with Retry-After, 502, 504, gRPC
    UNAVAILABLE, a refused or broken connection). Retried within the call's deadline."""

    retryable = True


class DeadlineExceeded(UserembedError):
    """The call's deadline (``timeout``) passed before an answer."""


class ServerError(UserembedError):
    """Anything else the server answered: a 500 ``internal`` error or an unreadable answer."""


_BY_CODE: Final[dict[str, type[UserembedError]]] = {
    "invalid_user_id": InvalidRequest,
    "invalid_encoding": InvalidRequest,
    "invalid_model_version": InvalidRequest,
    "invalid_model": InvalidRequest,
    "invalid_request": InvalidRequest,
    "batch_too_large": InvalidRequest,
    "request_too_large": InvalidRequest,
    "headers_too_large": InvalidRequest,
    "method_not_allowed": InvalidRequest,
    "unauthenticated": Unauthenticated,
    "not_found": NotFound,
    "unknown_model": UnknownModel,
    "version_mismatch": VersionMismatch,
    "store_unavailable": Unavailable,
    "store_misconfigured": Unavailable,
    "request_timeout": DeadlineExceeded,
}
_BY_GRPC: Final[dict[str, type[UserembedError]]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "RESOURCE_EXHAUSTED": InvalidRequest,
    "OUT_OF_RANGE": InvalidRequest,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": Unauthenticated,
    "NOT_FOUND": NotFound,
    "FAILED_PRECONDITION": VersionMismatch,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}


def _class_of_http_status(status: int) -> type[UserembedError]:
    if status in (502, 503, 504):
        return Unavailable
    return {401: Unauthenticated, 404: NotFound, 409: VersionMismatch}.get(
        status, InvalidRequest if 400 <= status < 500 else ServerError
    )


def error_from_http(
    status: int,
    code: str | None,
    message: str | None,
    *,
    request_id: str | None = None,
    retry_after_s: float | None = None,
) -> UserembedError:
    """The exception for an HTTP error answer (``code``/``message`` from its envelope,
    None when the body was not one)."""
    cls = _BY_CODE.get(code or "") or _class_of_http_status(status)
    return cls(
        message or f"HTTP {status} without an error envelope",
        code=code,
        http_status=status,
        request_id=request_id,
        retry_after_s=retry_after_s,
    )


def error_from_grpc(
    status_name: str,
    details: str | None,
    *,
    code: str | None = None,
    request_id: str | None = None,
) -> UserembedError:
    """The exception for a failed gRPC call (``status_name`` as in ``grpc.StatusCode.X.name``;
    ``code`` the server's error code from the trailing metadata, when it sent one)."""
    cls = _BY_CODE.get(code or "") or _BY_GRPC.get(status_name, ServerError)
    return cls(details or status_name, code=code or status_name.lower(), request_id=request_id)
