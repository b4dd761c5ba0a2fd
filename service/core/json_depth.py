"""How deep JSON nests, found without recursion, before any parser recurses into it.

msgspec and orjson recurse once per level: 100,000 ``[`` raise RecursionError deep
inside the decoder. The scan runs at C speed (bytes methods, numpy), so the event
decoder and the HTTP body parsers refuse a too-deep input with a reason instead.
"""

from __future__ import annotations

from typing import Final

import numpy as np

_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_STEP: Final = np.zeros(256, dtype=np.int32)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in ``body``, outside strings.

    Escaped backslashes, then escaped quotes, are dropped (left to right, as a parser
    pairs them); every remaining quote opens or closes a string, so the text outside
    strings is every other piece between quotes. All of it at C speed (no regex: a
    string pattern costs ~0.2 us a string). For any input, at least the depth that a
    recursive JSON parser reaches before it stops: up to the first error both read the
    same structure, and the scan also counts what follows."""
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(body.split(b'"')[::2])
    brackets = outside.translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    depths = np.cumsum(_STEP[np.frombuffer(brackets, dtype=np.uint8)])
    return max(int(depths.max()), 0)


def json_depth_problem(body: bytes, max_depth: int) -> str | None:
    """Why ``body`` nests too deep for the parsers, or None. Cheap on ordinary bodies:
    a body with at most ``max_depth`` brackets cannot nest deeper (two ``count`` calls)."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return None
    depth = json_depth(body)
    if depth <= max_depth:
        return None
    return f"JSON nested {depth} levels deep; at most {max_depth} levels are accepted"
