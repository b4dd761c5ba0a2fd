"""The parts of ``bench read`` its end-to-end run (test_bench.py) cannot show: a process
paused in a duty cycle runs again however the cycle ends, connections are counted per
process, and the CLI hands its options to the bench."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from service.bench.hedging import connections_by_process, paused_periodically


def _state(pid: int) -> str:
    """The process's state letter (``T``: stopped), from /proc/PID/stat."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def sleeper() -> Iterator[int]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def _states_for(pid: int, seconds: float) -> set[str]:
    seen = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(_state(pid))
        time.sleep(0.002)
    return seen


def test_the_paused_process_is_stopped_in_turns_and_running_after(sleeper: int) -> None:
    with paused_periodically(sleeper, 0.05, 0.1) as pauses:
        seen = _states_for(sleeper, 0.5)
    assert "T" in seen and "S" in seen, seen
    assert _state(sleeper) != "T"
    assert pauses.seconds and min(pauses.seconds) >= 0.05, pauses


def test_the_paused_process_runs_again_when_the_block_fails(sleeper: int) -> None:
    with pytest.raises(RuntimeError), paused_periodically(sleeper, 0.09, 0.1):
        time.sleep(0.2)  # stopped nine tenths of the time: likely stopped at the raise
        raise RuntimeError("the measurement failed")
    assert _state(sleeper) != "T"


def test_a_cycle_needs_a_pause_shorter_than_its_period(sleeper: int) -> None:
    with (
        pytest.raises(ValueError, match="stop_s < period_s"),
        paused_periodically(sleeper, 0.2, 0.1),
    ):
        pass


def test_connections_are_counted_on_the_process_that_accepted_them() -> None:
    with ExitStack() as stack:
        server = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        port = server.getsockname()[1]
        for _ in range(3):
            stack.enter_context(socket.create_connection(("127.0.0.1", port)))
            stack.enter_context(server.accept()[0])
        # the accepted ends are this process's, on the port; the client ends are not
        assert connections_by_process([os.getpid()], port) == [3]


def test_the_cli_hands_its_options_to_the_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    from service import cli
    from service.bench import read

    seen: list[read.BenchConfig] = []
    monkeypatch.setattr(read, "run_read_bench", seen.append)
    argv = ["bench", "read", "--concurrency", "8,32", "--workers", "1,2", "--no-hedge"]
    argv += ["--client-concurrency", "4,32", "--hedge-after-ms", "2.5", "--rounds", "2"]
    args = cli.build_parser().parse_args(argv)
    args.func(args)

    (config,) = seen
    assert (config.concurrency, config.workers, config.rounds) == ([8, 32], [1, 2], 2)
    assert (config.client, config.client_concurrency) == (True, [4, 32])
    assert (config.hedge, config.hedge_concurrency, config.hedge_after_ms) == (False, 4, 2.5)
    default = cli.build_parser().parse_args(["bench", "read"])
    default.func(default)
    assert seen[-1].workers == [1] and seen[-1].rounds == 3
    assert seen[-1].client and seen[-1].hedge
    assert seen[-1].client_concurrency is None and seen[-1].hedge_after_ms is None


@pytest.mark.parametrize(
    "wrong",
    [{"concurrency": [0]}, {"workers": [2, 2]}, {"workers": []}, {"rounds": 0},
     {"client_concurrency": [0]}, {"hedge_after_ms": -1.0}],
)  # fmt: skip
def test_a_config_that_cannot_run_is_refused_when_made(wrong: dict[str, object]) -> None:
    from service.bench.read import BenchConfig

    with pytest.raises(ValueError):
        BenchConfig(**wrong)  # type: ignore[arg-type]
