"""Wall-clock milliseconds, injectable so that tests can drive time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

Clock = Callable[[], int]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``, waking early when ``stop`` is set; return whether it is."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
