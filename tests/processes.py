"""Run userembed roles as real processes, and wait for what they should bring about."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")


class Role(subprocess.Popen[str]):
    """A running ``userembed`` process whose combined output goes to a log file."""

    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text()


@contextmanager
def userembed(*args: str, env: dict[str, str]) -> Iterator[Role]:
    """Run ``userembed ARGS`` in its own process group, output to a file (a pipe nobody
    reads could fill and stall it); stop it by PID at exit."""
    log_path = Path(tempfile.mkstemp(prefix="userembed-", suffix=".log")[1])
    with log_path.open("w") as log:
        process = Role(
            [sys.executable, "-m", "service.cli", *args],
            env={**os.environ, "USEREMBED_METRICS_PORT": "0", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    process.log_path = log_path
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll ``probe`` until it returns something truthy, or fail saying what never happened."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result:
                return result
        except (httpx.HTTPError, OSError) as exc:
            last_error = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} ({last_error!r})")
