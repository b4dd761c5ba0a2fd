"""What the HTTP and gRPC front ends share per request: API keys, request ids, the
error envelope and latency metrics."""

from __future__ import annotations

import hmac
import itertools
import re
import secrets
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any, Final

import orjson

from service.metrics import API_REQUEST_SECONDS

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
_REQUEST_ID_PATTERN: Final = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_ID_PREFIX: Final = secrets.token_hex(4)
_id_counter = itertools.count(1)


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> bytes:
    """The HTTP error envelope: ``{"error": {"code", "message", "details"?}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return orjson.dumps({"error": error})


class KeyChecker:
    """Bearer API keys, compared in constant time against every configured key."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: bytes | str | None) -> bool:
        """True for ``Bearer <one of the keys>``."""
        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", "replace")
        scheme, _, token = (authorization or b"").partition(b" ")
        # compare against every key, so timing does not reveal which one matched
        matched = [hmac.compare_digest(token.strip(), key) for key in self._keys]
        return scheme.lower() == b"bearer" and any(matched)


def new_request_id(offered: bytes | str | None) -> str:
    """The caller's request id when it is a sane token, else a new one: a random
    per-process prefix and a counter (unique, and no system call per request)."""
    if isinstance(offered, str):
        offered = offered.encode("latin-1", "replace")
    if offered and _REQUEST_ID_PATTERN.fullmatch(offered):
        return offered.decode()
    return f"{_ID_PREFIX}-{next(_id_counter):x}"


class RouteLatency:
    """``userembed_api_request_seconds`` children of one protocol, resolved once per
    (route, status) instead of on every request."""

    def __init__(self, protocol: str) -> None:
        self._protocol = protocol
        self._children: dict[tuple[str, str], Any] = {}

    def observe(self, route: str, status: str, seconds: float) -> None:
        child = self._children.get((route, status))
        if child is None:
            child = API_REQUEST_SECONDS.labels(self._protocol, route, status)
            self._children[(route, status)] = child
        child.observe(seconds)
