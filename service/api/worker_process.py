"""What a server process does differently when it is one of ``serve --workers N``.

Each such process binds its own listening sockets with SO_REUSEPORT (the kernel
spreads new connections over them), renders /metrics for all the processes from
prometheus-client's multiprocess files, drains on SIGTERM or SIGINT however many
times it gets them (from the parent, from the terminal's process group, or both),
and stops when its parent is gone. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable

from prometheus_client import REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector

from service.metrics import API_WORKER_STARTS, API_WORKER_UP

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 2048  # uvicorn's default


def reuseport_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT (listening unless told not)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def aggregate_default_registry(metrics_dir: str) -> None:
    """Make the default registry, which the API's /metrics renders, answer for every
    process: its collectors (this process's values only) give way to one collector of
    the multiprocess files. Called once every metric exists (they write the files
    whether registered or not)."""
    for collector in list(REGISTRY._collector_to_names):  # no public listing of them
        REGISTRY.unregister(collector)
    MultiProcessCollector(REGISTRY, path=metrics_dir)  # type: ignore[no-untyped-call]


def install_drain_handlers(stop: Callable[[], None]) -> None:
    """Call ``stop`` on every SIGINT/SIGTERM: a repeat does not kill the process (the
    parent's bound does, for a drain that takes too long)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


async def stop_when_orphaned(parent: int, stop: Callable[[], None], every_s: float = 1.0) -> None:
    """Call ``stop`` once the parent ``parent`` is gone (this process re-parented), so a
    killed supervisor leaves no worker holding the ports."""
    while os.getppid() == parent:
        await asyncio.sleep(every_s)
    log.warning("event=worker_orphaned parent=%d (draining)", parent)
    stop()


def mark_started(index: int) -> None:
    """Count this process in ``userembed_api_worker_up`` and ``_worker_starts_total``."""
    API_WORKER_STARTS.inc()
    API_WORKER_UP.set(1)
    log.info("event=worker_serving worker=%d pid=%d", index, os.getpid())
