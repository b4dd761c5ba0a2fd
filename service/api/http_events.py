"""Event intake over HTTP (POST /v1/events): all-or-nothing validation with every
rejection's reason, and the OpenAPI description of its body."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from service.core.events import (
    MAX_FUTURE_SKEW_MS,
    MIN_TS_MS,
    USER_ID_PATTERN,
    Event,
    EventRejected,
    convert_event,
)
from service.core.json_depth import json_depth_problem


class ApiError(Exception):
    """An HTTP-only error (event intake, readiness) answered in the error envelope."""

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


def validate_events(body: bytes, now: int, max_events: int, max_depth: int) -> list[Event]:
    """Parse a JSON array of events; all or nothing, with every rejection's reason.

    Raises only :class:`ApiError` (400 ``invalid_request``, ``batch_too_large`` or
    ``invalid_events``)."""
    problem = json_depth_problem(body, max_depth)
    if problem is not None:
        raise ApiError(400, "invalid_request", f"body refused: {problem}")
    try:
        items = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_request", f"body is not valid JSON: {exc}") from None
    except RecursionError:  # not reached under the depth bound; never a 500 if it is
        raise ApiError(400, "invalid_request", "body refused: JSON nested too deep") from None
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
            fixed = _integral_floats_as_ints(item)
            try:
                if fixed is None:
                    raise
                events.append(convert_event(fixed, now))
            except EventRejected:
                rejected.append({"index": index, "reason": exc.reason})
    if rejected:
        raise ApiError(
            400,
            "invalid_events",
            f"{len(rejected)} of {len(items)} events rejected; nothing was accepted",
            details=rejected,
        )
    return events


_INTEGER_FIELDS: Final = ("ts", "item_id", "category")


def _integral_floats_as_ints(item: object) -> dict[str, Any] | None:
    """``item`` with ``1.0e12`` written as ``1000000000000`` in its integer fields (JSON
    Schema's integers include integral floats; the typed decoder's do not), or None when
    there is nothing to rewrite. Tried only after a rejection: no cost on the usual path."""
    if not isinstance(item, dict):
        return None
    fixed: dict[str, Any] | None = None
    for name in _INTEGER_FIELDS:
        value = item.get(name)
        if isinstance(value, float) and value.is_integer():
            fixed = fixed if fixed is not None else dict(item)
            fixed[name] = int(value)
    return fixed


def events_openapi(
    max_events: int, max_body_bytes: int, max_depth: int, body_rules: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(OpenAPI requestBody, component schemas) of POST /v1/events: the Event type plus
    the rules of :func:`service.core.events.validate_event`. "``ts`` at most a day ahead
    of arrival" moves with the clock: :func:`set_ts_maximum` writes it as of a moment."""
    schemas: dict[str, Any] = msgspec.json.schema(Event)["$defs"]
    properties = schemas["Event"]["properties"]
    properties["event_id"]["minLength"] = 1
    properties["user_id"]["pattern"] = f"^{USER_ID_PATTERN.pattern}$"
    properties["ts"].update(
        minimum=MIN_TS_MS,
        description="epoch ms, from 2000-01-01 to a day ahead of arrival: `maximum` is that "
        "bound as of when this document was fetched (it moves with the server's clock)",
    )
    for branch in properties["item_id"]["anyOf"]:  # keep the type's own bounds (maxLength)
        if branch.get("type") == "string":
            branch["minLength"] = 1
    schemas = {
        name: _rebase_refs(schema, "#/$defs/", "#/components/schemas/")
        for name, schema in schemas.items()
    }
    body = {
        "required": True,
        "description": body_rules,
        "content": {
            "application/json": {
                "schema": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/Event"},
                    "minItems": 1,
                    "maxItems": max_events,
                }
            }
        },
        "x-max-bytes": max_body_bytes,
        "x-max-depth": max_depth,
    }
    return body, schemas


def set_ts_maximum(document: dict[str, Any], now: int) -> None:
    """Write the latest ``ts`` accepted at ``now`` into an OpenAPI document's Event."""
    ts = document["components"]["schemas"]["Event"]["properties"]["ts"]
    ts["maximum"] = now + MAX_FUTURE_SKEW_MS


def _rebase_refs(node: Any, old: str, new: str) -> Any:
    if isinstance(node, dict):
        return {
            k: (v.replace(old, new, 1) if k == "$ref" else _rebase_refs(v, old, new))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rebase_refs(v, old, new) for v in node]
    return node
