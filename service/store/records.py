"""Stored bytes to records, leniently: an unreadable record is logged (with its key)
and read as absent."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from service.core.embeddings import (
    EmbeddingDecodeError,
    EmbeddingRecord,
    StoredEmbedding,
    read_columns,
    read_embedding,
)
from service.core.features import FeatureDecodeError, FeatureState, decode_features

log = logging.getLogger(__name__)

# Reading as columns costs ~13 us a call and ~0.3 us a record, one by one ~1.1 us a
# record: even at 16, and a batch answered as columns saves ~3 us a user more.
COLUMNS_FROM: Final = 16


def features_or_none(raw: bytes | None, key: str) -> FeatureState | None:
    """Decode a stored state; an unreadable one is logged and treated as absent,
    so the next update rewrites it instead of wedging the user forever."""
    if raw is None:
        return None
    try:
        return decode_features(raw)
    except FeatureDecodeError as exc:
        log.warning("event=unreadable_features key=%s reason=%r", key, str(exc))
        return None


def embedding_or_none(raw: bytes | None, key: str | bytes) -> EmbeddingRecord | None:
    """Decode a stored embedding for computing on (the worker); unreadable = absent."""
    stored = stored_or_none(raw, key)
    return None if stored is None else stored.record()


def stored_or_none(raw: bytes | None, key: str | bytes) -> StoredEmbedding | None:
    """Decode a stored embedding for serving (its vector left packed); unreadable = absent."""
    if raw is None:
        return None
    try:
        return read_embedding(raw)
    except EmbeddingDecodeError as exc:
        shown = key.decode(errors="replace") if isinstance(key, bytes) else key
        log.warning("event=unreadable_embedding key=%s reason=%r", shown, str(exc))
        return None


def stored_records(
    raws: Sequence[bytes | None], keys: Sequence[str | bytes], *, columns: bool = False
) -> Sequence[StoredEmbedding | None]:
    """Decode a bulk read for serving: with ``columns`` (the caller serves them as one
    batch), as columns when it holds at least ``COLUMNS_FROM`` records, every one is
    there and they share one layout (:func:`read_columns`); else one by one."""
    read = read_columns(raws) if columns and len(raws) >= COLUMNS_FROM else None
    if read is not None:
        return read
    return [stored_or_none(raw, key) for raw, key in zip(raws, keys, strict=True)]
