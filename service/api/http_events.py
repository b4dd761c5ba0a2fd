"""Event intake over HTTP (POST /v1/events): all-or-nothing validation with every
rejection's reason, and the OpenAPI description of its body."""

from __future__ import annotations

from typing import Any

import msgspec

from service.core.events import MIN_TS_MS, USER_ID_PATTERN, Event, EventRejected, convert_event


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


def events_openapi(max_events: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(OpenAPI requestBody, component schemas) of POST /v1/events: the Event type plus
    the rules of :func:`service.core.events.validate_event` that JSON Schema can state (not
    "``ts`` at most a day ahead of arrival", which moves with the clock)."""
    schemas: dict[str, Any] = msgspec.json.schema(Event)["$defs"]
    properties = schemas["Event"]["properties"]
    integer = {"type": "integer"}
    properties["event_id"]["minLength"] = 1
    properties["user_id"]["pattern"] = f"^{USER_ID_PATTERN.pattern}$"
    properties["ts"].update(
        minimum=MIN_TS_MS, description="epoch ms, from 2000-01-01 to a day ahead of arrival"
    )
    properties["item_id"]["anyOf"] = [{"type": "string", "minLength": 1}, integer]
    schemas = {
        name: _rebase_refs(schema, "#/$defs/", "#/components/schemas/")
        for name, schema in schemas.items()
    }
    body = {
        "required": True,
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
    }
    return body, schemas


def _rebase_refs(node: Any, old: str, new: str) -> Any:
    if isinstance(node, dict):
        return {
            k: (v.replace(old, new, 1) if k == "$ref" else _rebase_refs(v, old, new))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rebase_refs(v, old, new) for v in node]
    return node
