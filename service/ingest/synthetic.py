"""A simple synthetic event generator for the demo and load tests.

Users ``u0..u{N-1}`` are drawn with Zipf-like popularity; each user has a few
favourite categories, and items are drawn mostly from those. Replaced by the
ground-truth world of models/ once it exists; the event contract is the same.
"""

from __future__ import annotations

import uuid
from typing import Final, Protocol

import msgspec
import numpy as np

from service.core.events import Event, EventType

_TYPES: Final = list(EventType)
# view-heavy mix, roughly like a feed
_TYPE_WEIGHTS: Final = np.array([0.70, 0.17, 0.05, 0.02, 0.01, 0.03, 0.015, 0.005])
NUM_CATEGORIES: Final = 200
ITEMS_PER_CATEGORY: Final = 250


class EventGenerator(Protocol):
    """Live synthetic traffic: this simple generator, or the ground-truth world of models/."""

    def events(self, count: int, now_ms: int) -> list[Event]: ...


class SyntheticTraffic:
    """Deterministic for a given seed (except event ids and timestamps, which are live)."""

    def __init__(self, users: int, seed: int = 7, zipf_a: float = 1.1) -> None:
        self.users = users
        self._rng = np.random.default_rng(seed)
        ranks = np.arange(1, users + 1, dtype=np.float64)
        popularity = ranks**-zipf_a
        self._user_cdf = np.cumsum(popularity / popularity.sum())
        self._favourites = self._rng.integers(0, NUM_CATEGORIES, size=(users, 3))
        self._type_p = _TYPE_WEIGHTS / _TYPE_WEIGHTS.sum()

    def events(self, count: int, now_ms: int) -> list[Event]:
        rng = self._rng
        users = np.searchsorted(self._user_cdf, rng.random(count))
        users = np.minimum(users, self.users - 1)
        explore = rng.random(count) < 0.2
        favourite = self._favourites[users, rng.integers(0, 3, size=count)]
        categories = np.where(explore, rng.integers(0, NUM_CATEGORIES, size=count), favourite)
        items = categories * ITEMS_PER_CATEGORY + rng.integers(0, ITEMS_PER_CATEGORY, size=count)
        types = rng.choice(len(_TYPES), size=count, p=self._type_p)
        return [
            Event(
                event_id=uuid.uuid4().hex,
                user_id=f"u{u}",
                ts=now_ms,
                type=_TYPES[t],
                item_id=f"i{item}",
                category=f"c{cat}",
            )
            for u, item, cat, t in zip(
                users.tolist(), items.tolist(), categories.tolist(), types.tolist(), strict=True
            )
        ]


MALFORMED_KINDS: Final = ("not_json", "missing_user_id", "bad_user_id", "ts_in_seconds", "bad_type")


def malformed_payload(event: Event, kind: str) -> bytes:
    """A broken variant of ``event`` of the given kind: what the dead-letter topic is for."""
    fields = msgspec.to_builtins(event)
    if kind == "not_json":
        return b'{"event_id": "' + event.event_id.encode() + b'", "user_id": '
    if kind == "missing_user_id":
        del fields["user_id"]
    elif kind == "bad_user_id":
        fields["user_id"] = "not a valid id!"
    elif kind == "ts_in_seconds":
        fields["ts"] = event.ts // 1000
    elif kind == "bad_type":
        fields["type"] = "teleport"
    else:
        raise ValueError(f"unknown malformed kind {kind!r}: one of {MALFORMED_KINDS}")
    return msgspec.json.encode(fields)
