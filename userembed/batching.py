"""User ids before they leave: checked against the server's rule, and split into
requests of at most the server's batch limit."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from userembed.errors import InvalidRequest

# The server's rule (service/core/events.py); checked here so that one bad id fails its
# own call, not a coalesced batch it shares with other callers.
USER_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
DEFAULT_MAX_BATCH: Final = 1000  # the server's batch_get_max_ids default


def check_user_id(user_id: str) -> str:
    """``user_id`` when the server would accept it, else :class:`InvalidRequest`."""
    if not isinstance(user_id, str) or USER_ID_PATTERN.fullmatch(user_id) is None:
        shown = repr(user_id) if len(str(user_id)) <= 40 else repr(str(user_id)[:40] + "...")
        raise InvalidRequest(
            f"invalid user_id {shown}: only [A-Za-z0-9_.:@-], 1..128 chars",
            code="invalid_user_id",
        )
    return user_id


def split(user_ids: Sequence[str], max_batch: int) -> list[Sequence[str]]:
    """``user_ids`` in order, as consecutive requests of at most ``max_batch`` ids."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch}: at least 1")
    return [user_ids[i : i + max_batch] for i in range(0, len(user_ids), max_batch)]


def users_per_request(max_batch: int, models: int) -> int:
    """Users per request when each answers ``models`` models: the server bounds the
    answers (users x models) by its ``batch_get_max_ids``; at least one user."""
    return max(1, max_batch // models)
