"""Stored bytes to records, leniently: an unreadable record is logged (with its key)
and read as absent."""

from __future__ import annotations

import logging

from service.core.embeddings import (
    EmbeddingDecodeError,
    EmbeddingRecord,
    StoredEmbedding,
    read_embedding,
)
from service.core.features import FeatureDecodeError, FeatureState, decode_features

log = logging.getLogger(__name__)


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
