"""The supervisor of `serve --workers N`: its backoff schedule, how many workers 0
means, and (with tiny stand-in workers) restart and drain."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from service.api.supervisor import Backoff, Supervisor, resolve_workers
from service.settings import Settings


def test_delays_double_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0)
    delays = [backoff.delay(failures) for failures in range(1, 10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.delay(10_000) == 30.0  # no overflow however long it crash-loops


def test_a_quick_death_counts_and_a_stable_run_starts_over() -> None:
    backoff = Backoff(stable_s=60.0)
    failures = 0
    for _ in range(4):
        failures = backoff.failures_after(failures, uptime_s=1.0)
    assert failures == 4 and backoff.delay(failures) == 4.0
    assert backoff.failures_after(failures, uptime_s=60.0) == 1
    assert backoff.delay(backoff.failures_after(failures, uptime_s=3600.0)) == backoff.base_s


def test_workers_0_means_one_per_usable_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert resolve_workers(0) == 3
    assert resolve_workers(1) == 1
    assert resolve_workers(7) == 7


def test_the_setting_defaults_to_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().api_workers == 1
    monkeypatch.setenv("USEREMBED_API_WORKERS", "0")
    assert Settings().api_workers == 0


def _run(supervisor: Supervisor, stop_after_s: float, signals: int = 1) -> tuple[int, float]:
    """Run ``supervisor`` in this (the main) thread; SIGTERM it ``signals`` times."""

    def stop() -> None:
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)

    timer = threading.Timer(stop_after_s, stop)
    timer.start()
    started = time.monotonic()
    try:
        return supervisor.run(), time.monotonic() - started
    finally:
        timer.cancel()


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_dying_worker_is_restarted_with_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.api.supervisor")
    handler = signal.getsignal(signal.SIGTERM)
    supervisor = Supervisor(
        lambda index: _python("import sys; sys.exit(3)"),
        workers=1,
        env=os.environ,
        metrics_dir=str(tmp_path),
        drain_timeout_s=5.0,
        backoff=Backoff(base_s=0.2, cap_s=0.4, stable_s=60.0),
        poll_s=0.02,
    )
    status, _ = _run(supervisor, stop_after_s=4.0)
    assert status == 0
    exits = [r.getMessage() for r in caplog.records if "event=worker_exited" in r.getMessage()]
    assert len(exits) >= 3, exits
    assert all("worker=0" in e and "exit_code=3 restart_in_s=" in e for e in exits)
    assert [e.rsplit("restart_in_s=", 1)[1] for e in exits[:3]] == ["0.20", "0.40", "0.40"]
    assert signal.getsignal(signal.SIGTERM) == handler  # given back


def test_drain_waits_for_workers_then_kills_the_stragglers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.api.supervisor")
    polite = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))"
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    codes = [f"{polite}; time.sleep(60)", f"{deaf}; time.sleep(60)"]
    supervisor = Supervisor(
        lambda index: _python(codes[index]),
        workers=2,
        env=os.environ,
        metrics_dir=str(tmp_path),
        drain_timeout_s=1.0,
        poll_s=0.02,
    )
    status, elapsed = _run(supervisor, stop_after_s=1.5)
    assert status == 0
    assert elapsed >= 1.5 + 1.0  # the straggler had its whole drain_timeout_s
    messages = [r.getMessage() for r in caplog.records]
    assert any("event=worker_stopped worker=0" in m and "exit_code=0" in m for m in messages)
    assert sum("event=worker_killed" in m for m in messages) == 1
    assert any("worker=1" in m and "signal=SIGKILL" in m for m in messages)


def test_a_second_signal_ends_the_drain_at_once(tmp_path: Path) -> None:
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    supervisor = Supervisor(
        lambda index: _python(deaf),
        workers=1,
        env=os.environ,
        metrics_dir=str(tmp_path),
        drain_timeout_s=300.0,
        poll_s=0.02,
    )
    status, elapsed = _run(supervisor, stop_after_s=1.5, signals=2)
    # the worker ignores SIGTERM and sleeps past the drain timeout: only the second
    # signal can have ended the run before that timeout
    assert status == 0 and elapsed < 300.0
