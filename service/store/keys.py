"""Key naming of shared state.

``uf:<uid>`` feature state, ``ue:<uid>`` embedding record; the dirty queue, a
sorted set of user ids scored by the time they became dirty; its leases
(``userembed:leased``, scored by expiry, with ``userembed:lease`` holding
``token:dirty_at`` per user); and the activity index ``userembed:active`` (last
time each user had events), from which a new model re-embeds the most active first.
"""

from __future__ import annotations

from typing import Final

DIRTY_KEY: Final = "userembed:dirty"
LEASED_KEY: Final = "userembed:leased"
LEASE_INFO_KEY: Final = "userembed:lease"
ACTIVE_KEY: Final = "userembed:active"


def feature_key(user_id: str) -> str:
    return f"uf:{user_id}"


def embedding_key(user_id: str) -> str:
    return f"ue:{user_id}"
