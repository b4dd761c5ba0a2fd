"""Names of the user models served side by side (SUM's "a few upstream models").

A name is part of Redis keys (``ue.<model>:{shard}:<user>``), registry paths
(``<root>/_models/<model>/``), query strings and metric labels, so it is short and
plain: letters, digits, ``_`` and ``-``, starting with a letter or digit; no ``.``,
``:`` or ``/``, which the key and path layouts use as separators. The model named
``default`` is the one a client that names no model reads, with today's keys and
registry layout.
"""

from __future__ import annotations

import re
from typing import Final

DEFAULT_MODEL: Final = "default"
MODEL_NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}"
_NAME: Final = re.compile(MODEL_NAME_PATTERN)


class InvalidModelName(ValueError):
    """A model name outside :data:`MODEL_NAME_PATTERN`."""


def check_model_name(name: str) -> str:
    """``name`` if it is a valid model name, else :class:`InvalidModelName`."""
    if _NAME.fullmatch(name) is None:
        raise InvalidModelName(
            f"invalid model name {name!r}: letters, digits, '_' and '-', up to 32 characters, "
            "starting with a letter or digit"
        )
    return name
