"""Running uvicorn inside an event loop we own, with our own signal handling."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import uvicorn

from service.api.http_protocol import HttpLimits, JoinedWritesHttpToolsProtocol


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the caller (see :func:`run_until_signal`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ApiConfig(uvicorn.Config):
    """uvicorn's settings plus the protocol's :class:`HttpLimits` (``http_limits``)."""

    http_limits: HttpLimits


def http_config(app: Any, host: str, port: int, limits: HttpLimits | None = None) -> uvicorn.Config:
    """uvicorn settings for the read path: httptools with joined writes and bounds on
    slow or oversized request heads and bodies (``limits``, else the app's
    ``http_limits``, else the defaults), no access log, quiet."""
    config = ApiConfig(
        app,
        host=host,
        port=port,
        http=JoinedWritesHttpToolsProtocol,
        ws="none",  # no WebSocket routes: an upgrade request is served as plain HTTP
        access_log=False,
        log_level="warning",
        lifespan="on",
    )
    config.http_limits = limits or getattr(app, "http_limits", None) or HttpLimits()
    return config


def install_stop_handlers(on_stop: Callable[[], None]) -> None:
    """Call ``on_stop`` on SIGINT/SIGTERM (a second Ctrl-C falls back to the default)."""
    loop = asyncio.get_running_loop()

    def handler(sig: signal.Signals) -> None:
        on_stop()
        loop.remove_signal_handler(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler, sig)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        asyncio.run(main)
    else:
        uvloop.run(main)
