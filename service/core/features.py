"""Per-user feature state: a pure update function and a compact binary codec.

The state holds the user's last L events (hashed item and category, type,
timestamp; oldest first), time-decayed counters per event type and half-life, the
last event time, a feature version that increases with every change, and the
highest Kafka (partition, offset) applied so that a redelivered event is skipped.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from service.core.events import NUM_EVENT_TYPES, SourcedEvent

# Half-lives of the decayed counters: 1 hour, 1 day, 1 week. Changing them changes
# the meaning of stored counters, so it requires a new LAYOUT_VERSION.
HALF_LIVES_MS: Final = (3_600_000, 86_400_000, 7 * 86_400_000)
NUM_HALF_LIVES: Final = len(HALF_LIVES_MS)
NO_POSITION: Final = -1

LAYOUT_VERSION: Final = 1
_LE_INT64: Final = np.dtype("<i8")
_LE_FLOAT32: Final = np.dtype("<f4")
_UINT8: Final = np.dtype("u1")
_MAGIC: Final = b"UF"
# magic, layout, n_types, n_half_lives, reserved, n_events, version, last_event_ms,
# partition, offset
_HEADER: Final = struct.Struct("<2sBBBBHQqiq")
_VERSION_FIELD: Final = struct.Struct("<Q")
# Byte range of the feature version inside an encoded record: a store can compare
# versions (compare-and-set) without decoding the record.
VERSION_OFFSET: Final = struct.calcsize("<2sBBBBH")
VERSION_SIZE: Final = _VERSION_FIELD.size

Int64Array = npt.NDArray[np.int64]


class FeatureDecodeError(ValueError):
    """A stored feature record that this build cannot read."""


@functools.lru_cache(maxsize=1 << 17)
def hash_id(value: str | int | None) -> int:
    """Stable 63-bit hash of an item or category id; 0 is reserved for 'none'.

    Ints and their decimal strings hash alike, so producers may send either. Cached:
    popular items and categories recur in almost every batch.
    """
    if value is None:
        return 0
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63 - 1) + 1


@dataclass(frozen=True, slots=True)
class FeatureState:
    """One user's features. Arrays are oldest-first and share length n <= L."""

    item_hashes: Int64Array
    category_hashes: Int64Array
    types: npt.NDArray[np.uint8]
    timestamps: Int64Array
    counters: npt.NDArray[np.float32]  # [NUM_EVENT_TYPES, NUM_HALF_LIVES] at last_event_ms
    last_event_ms: int
    version: int
    partition: int
    offset: int

    @classmethod
    def empty(cls) -> FeatureState:
        none = np.zeros(0, dtype=np.int64)
        return cls(
            item_hashes=none,
            category_hashes=none,
            types=np.zeros(0, dtype=np.uint8),
            timestamps=none,
            counters=np.zeros((NUM_EVENT_TYPES, NUM_HALF_LIVES), dtype=np.float32),
            last_event_ms=0,
            version=0,
            partition=NO_POSITION,
            offset=NO_POSITION,
        )

    @property
    def num_events(self) -> int:
        return int(self.timestamps.shape[0])


def decay_factors(dt_ms: npt.NDArray[np.generic] | float) -> npt.NDArray[np.float64]:
    """Decay factors 2^(-dt/h) for every half-life; dt broadcasts against them."""
    half_lives = np.asarray(HALF_LIVES_MS, dtype=np.float64)
    dt = np.maximum(np.asarray(dt_ms, dtype=np.float64), 0.0)
    return np.exp2(-dt[..., None] / half_lives)


def counters_at(state: FeatureState, now_ms: int) -> npt.NDArray[np.float32]:
    """The decayed counters as seen at ``now_ms`` (never grown if now is in the past)."""
    factors = decay_factors(float(now_ms - state.last_event_ms))
    return (state.counters * factors).astype(np.float32)


def _unseen(state: FeatureState, events: Sequence[SourcedEvent]) -> list[SourcedEvent]:
    """Events not yet applied: a position at or below the last one of its partition is a
    redelivery. A new partition (repartitioned topic) restarts the high-water mark."""
    partition, offset = state.partition, state.offset
    fresh: list[SourcedEvent] = []
    for sourced in events:
        if sourced.partition == partition and sourced.offset <= offset:
            continue
        partition, offset = sourced.partition, sourced.offset
        fresh.append(sourced)
    return fresh


def apply_events(
    state: FeatureState, events: Sequence[SourcedEvent], history_length: int
) -> tuple[FeatureState, int]:
    """Apply one user's events in log order; return the new state and how many applied.

    Pure: ``state`` is not modified. Redelivered events (see :func:`_unseen`) are
    skipped, so applying the same batch twice changes nothing the second time.
    """
    fresh = _unseen(state, events)
    if not fresh:
        return state, 0
    new_ts = np.fromiter((s.event.ts for s in fresh), dtype=np.int64, count=len(fresh))
    new_types = np.fromiter((s.event.type.code for s in fresh), dtype=np.uint8, count=len(fresh))
    new_items = np.fromiter(
        (hash_id(s.event.item_id) for s in fresh), dtype=np.int64, count=len(fresh)
    )
    new_cats = np.fromiter(
        (hash_id(s.event.category) for s in fresh), dtype=np.int64, count=len(fresh)
    )

    # History: merge by timestamp (stable, so ties keep log order), keep the last L.
    timestamps = np.concatenate([state.timestamps, new_ts])
    order = np.argsort(timestamps, kind="stable")[-history_length:]

    # Counters are linear in the events, so decay everything to the new reference
    # time in one step: c' = c * 2^(-(ref'-ref)/h) + sum_e onehot(type_e) 2^(-(ref'-ts_e)/h).
    reference = max(state.last_event_ms, int(new_ts.max()))
    counters = state.counters.astype(np.float64) * decay_factors(
        float(reference - state.last_event_ms)
    )
    np.add.at(counters, new_types, decay_factors((reference - new_ts).astype(np.float64)))

    last = fresh[-1]
    updated = FeatureState(
        item_hashes=np.concatenate([state.item_hashes, new_items])[order],
        category_hashes=np.concatenate([state.category_hashes, new_cats])[order],
        types=np.concatenate([state.types, new_types])[order],
        timestamps=timestamps[order],
        counters=counters.astype(np.float32),
        last_event_ms=reference,
        version=state.version + 1,
        partition=last.partition,
        offset=last.offset,
    )
    return updated, len(fresh)


def encode_features(state: FeatureState) -> bytes:
    """Versioned little-endian binary record (about 40 + 25 n + 96 bytes)."""
    header = _HEADER.pack(
        _MAGIC,
        LAYOUT_VERSION,
        NUM_EVENT_TYPES,
        NUM_HALF_LIVES,
        0,
        state.num_events,
        state.version,
        state.last_event_ms,
        state.partition,
        state.offset,
    )
    return b"".join(
        (
            header,
            state.item_hashes.astype("<i8").tobytes(),
            state.category_hashes.astype("<i8").tobytes(),
            state.timestamps.astype("<i8").tobytes(),
            state.types.astype(np.uint8).tobytes(),
            state.counters.astype("<f4").tobytes(),
        )
    )


def encoded_version(version: int) -> bytes:
    """The version field as stored; b"" stands for 'no record' (version 0)."""
    return _VERSION_FIELD.pack(version) if version else b""


def decode_features(data: bytes) -> FeatureState:
    """Inverse of :func:`encode_features`; raise :class:`FeatureDecodeError` when unreadable."""
    if len(data) < _HEADER.size:
        raise FeatureDecodeError(f"feature record too short ({len(data)} bytes)")
    magic, layout, n_types, n_half, _, n, version, last_ms, partition, offset = _HEADER.unpack_from(
        data
    )
    if magic != _MAGIC:
        raise FeatureDecodeError(f"not a feature record (magic {magic!r})")
    if layout != LAYOUT_VERSION:
        raise FeatureDecodeError(
            f"unsupported feature layout v{layout} (this build reads v{LAYOUT_VERSION})"
        )
    if (n_types, n_half) != (NUM_EVENT_TYPES, NUM_HALF_LIVES):
        raise FeatureDecodeError(f"counter shape {n_types}x{n_half} does not match this build")
    expected = _HEADER.size + 25 * n + 4 * n_types * n_half
    if len(data) != expected:
        raise FeatureDecodeError(f"feature record is {len(data)} bytes, expected {expected}")
    pos = _HEADER.size

    def take(dtype: np.dtype[Any], count: int) -> npt.NDArray[Any]:
        """A read-only view of the next field (a copy only on big-endian hosts)."""
        nonlocal pos
        array = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
        pos += array.nbytes
        return array.astype(dtype.newbyteorder("="), copy=False)

    return FeatureState(
        item_hashes=take(_LE_INT64, n),
        category_hashes=take(_LE_INT64, n),
        timestamps=take(_LE_INT64, n),
        types=take(_UINT8, n),
        counters=take(_LE_FLOAT32, n_types * n_half).reshape(n_types, n_half),
        last_event_ms=last_ms,
        version=version,
        partition=partition,
        offset=offset,
    )
