"""Small builders shared by tests."""

from __future__ import annotations

import itertools

import msgspec
from prometheus_client import REGISTRY

from service.core.events import Event, EventType, SourcedEvent

BASE_TS = 1_760_000_000_000  # 2025-10-09, a fixed 'now' for pure tests
_ids = itertools.count()


def event(
    user_id: str = "u1",
    ts: int = BASE_TS,
    type: EventType = EventType.CLICK,
    item_id: str | int = "i1",
    category: str | int | None = "c1",
) -> Event:
    return Event(
        event_id=f"e{next(_ids)}",
        user_id=user_id,
        ts=ts,
        type=type,
        item_id=item_id,
        category=category,
    )


def sourced(event: Event, offset: int, partition: int = 0) -> SourcedEvent:
    return SourcedEvent(event, partition=partition, offset=offset)


def log_of(events: list[Event], first_offset: int = 0) -> list[SourcedEvent]:
    """Events as consecutive records of partition 0."""
    return [sourced(e, first_offset + i) for i, e in enumerate(events)]


def raw_event(**fields: object) -> bytes:
    """A valid event's JSON with ``fields`` overridden (``...`` drops a field)."""
    base: dict[str, object] = {
        "event_id": "e1",
        "user_id": "u1",
        "ts": BASE_TS,
        "type": "click",
        "item_id": "i9",
    }
    base.update(fields)
    return msgspec.json.encode({k: v for k, v in base.items() if v is not ...})


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """A Prometheus sample's current value in the process registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


class Delta:
    """How much a process-global Prometheus sample moved since this was made: other
    tests bump the same counters, so a test asserts the change its action caused."""

    def __init__(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.name, self.labels = name, labels or {}
        self.before = sample(name, self.labels)

    def __call__(self) -> float:
        return sample(self.name, self.labels) - self.before


# an answer's fields, in order, before there were several models: what a client that
# never names a model still gets
ANSWER_FIELDS_BEFORE_MODELS = [
    "user_id",
    "embedding",
    "dim",
    "model_version",
    "space_version",
    "computed_at",
    "feature_version",
    "staleness_ms",
    "status",
]
