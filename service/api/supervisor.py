"""The parent of ``serve --workers N``: starts N server processes, restarts one that
dies (with exponential backoff), drains them all on SIGTERM/SIGINT within a bound,
and serves /metrics for all of them on the ops port. See docs/serving.md.

The parent holds no store connection and serves no API request: the children
bind the HTTP and gRPC ports themselves, with SO_REUSEPORT.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from types import FrameType

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.api.ops_server import serve_ops

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def resolve_workers(configured: int) -> int:
    """The number of server processes: ``configured``, or one per usable core for 0."""
    return configured if configured > 0 else len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Backoff:
    """Restart delays of one worker slot: ``base_s`` after a first quick death, doubled
    after each further one, at most ``cap_s``; a worker that ran ``stable_s`` or longer
    before dying starts the schedule again."""

    base_s: float = 0.5
    cap_s: float = 30.0
    stable_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds before the restart that follows the ``failures``-th quick death in a row."""
        return min(self.cap_s, self.base_s * 2.0 ** min(max(failures - 1, 0), 64))

    def failures_after(self, failures: int, uptime_s: float) -> int:
        """The slot's count of quick deaths in a row once a worker died after ``uptime_s``."""
        return 1 if uptime_s >= self.stable_s else failures + 1


@dataclass
class _Slot:
    """One worker position: its current process, or when to start the next one."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None


def _exit_text(code: int) -> str:
    if code < 0:
        return f"exit_code={code} signal={signal.Signals(-code).name}"
    return f"exit_code={code}"


class Supervisor:
    """Runs ``command(index)`` for each of ``workers`` slots with ``env`` and keeps them
    running until a stop signal; :meth:`run` returns the exit status (0 after a drain)."""

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        workers: int,
        env: Mapping[str, str],
        metrics_dir: str,
        drain_timeout_s: float,
        backoff: Backoff | None = None,
        poll_s: float = 0.1,
    ) -> None:
        self._command = command
        self._env = dict(env)
        self._metrics_dir = metrics_dir
        self._drain_timeout_s = drain_timeout_s
        self._backoff = backoff or Backoff()
        self._poll_s = poll_s
        self._slots = [_Slot(index) for index in range(workers)]
        self._signals: list[int] = []
        self._wake = threading.Event()

    def all_running(self) -> bool:
        """Every slot has a live process (the parent's /readyz)."""
        return all(s.process is not None and s.process.poll() is None for s in self._slots)

    def run(self) -> int:
        """Start the workers, supervise them until SIGTERM/SIGINT, then drain them."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            for slot in self._slots:
                self._start(slot)
            while not self._signals:
                self._reap(restart=True)
                self._restart_due()
                self._wake.wait(self._poll_s)
            self._drain(signal.Signals(self._signals[0]))
        finally:
            for process in self._live():  # only after an error: a drain leaves none
                process.kill()
                process.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)
        self._wake.set()

    def _start(self, slot: _Slot) -> None:
        slot.process = subprocess.Popen(self._command(slot.index), env=self._env)
        slot.started_at = time.monotonic()
        slot.restart_at = None
        log.info("event=worker_started worker=%d pid=%d", slot.index, slot.process.pid)

    def _reap(self, restart: bool) -> None:
        """Notice exited workers: forget their live gauges and, when ``restart``,
        schedule their replacement."""
        now = time.monotonic()
        for slot in self._slots:
            process = slot.process
            if process is None or (code := process.poll()) is None:
                continue
            slot.process = None
            mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            if not restart:
                log.info(
                    "event=worker_stopped worker=%d pid=%d %s",
                    slot.index,
                    process.pid,
                    _exit_text(code),
                )
                continue
            slot.failures = self._backoff.failures_after(slot.failures, now - slot.started_at)
            delay = self._backoff.delay(slot.failures)
            slot.restart_at = now + delay
            log.warning(
                "event=worker_exited worker=%d pid=%d %s restart_in_s=%.2f",
                slot.index,
                process.pid,
                _exit_text(code),
                delay,
            )

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)

    def _live(self) -> list[subprocess.Popen[bytes]]:
        return [s.process for s in self._slots if s.process is not None]

    def _drain(self, sig: signal.Signals) -> None:
        """Forward ``sig``, wait up to the bound (or a second signal) for the workers to
        finish their in-flight requests and exit, then kill what is left."""
        live = self._live()
        log.info(
            "event=workers_draining signal=%s workers=%d timeout_s=%.1f",
            sig.name,
            len(live),
            self._drain_timeout_s,
        )
        for process in live:
            process.send_signal(sig)
        deadline = time.monotonic() + self._drain_timeout_s
        while self._live() and len(self._signals) == 1 and time.monotonic() < deadline:
            self._wake.clear()
            self._wake.wait(self._poll_s)
            self._reap(restart=False)
        for process in self._live():
            log.warning("event=worker_killed pid=%d (still draining)", process.pid)
            process.kill()
            process.wait()
        self._reap(restart=False)


def _serve_metrics(
    host: str, port: int, metrics_dir: str, ready: Callable[[], bool]
) -> ThreadingHTTPServer | None:
    """The workers' aggregated /metrics (and /healthz, /readyz) on ``host:port``, unless
    the port is 0 or taken: the API port's /metrics serves the same."""
    if not port:
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    try:
        return serve_ops(host, port, ready, registry)
    except OSError as exc:
        log.warning("event=ops_port_unavailable addr=%s:%d reason=%r", host, port, str(exc))
        return None


def supervise(
    command: Callable[[int], Sequence[str]],
    workers: int,
    *,
    host: str,
    metrics_port: int,
    drain_timeout_s: float,
) -> int:
    """Run ``workers`` processes of ``command(index)`` under a :class:`Supervisor`, in
    prometheus-client's multiprocess mode (a fresh PROMETHEUS_MULTIPROC_DIR, removed at
    the end), with their aggregated /metrics on ``host:metrics_port`` (0 = none);
    return the exit status."""
    metrics_dir = tempfile.mkdtemp(prefix="userembed-metrics-")
    try:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        supervisor = Supervisor(command, workers, env, metrics_dir, drain_timeout_s)
        ops = _serve_metrics(host, metrics_port, metrics_dir, supervisor.all_running)
        log.info(
            "event=workers_supervising workers=%d metrics_port=%d metrics_dir=%s",
            workers,
            metrics_port,
            metrics_dir,
        )
        try:
            return supervisor.run()
        finally:
            if ops is not None:
                ops.shutdown()
                ops.server_close()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
