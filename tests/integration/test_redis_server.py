"""The throwaway redis-servers of the tests: a port taken between being chosen and
being bound is given up for another, and any other failure to start says why."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from service.store import redis_server
from service.store.redis_server import free_port, stop_process


def test_a_port_taken_before_redis_binds_it_is_given_up_for_another(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1], free_port()])
        picked: list[int] = []

        def pick() -> int:
            picked.append(next(ports))
            return picked[-1]

        port, process = redis_server._start_on_a_free_port(tmp_path, pick)
        try:
            assert picked == [picked[0], port] and port != picked[0]
            assert process.poll() is None
        finally:
            stop_process(process)


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)exited with 1: .*no-such-option") as refused:
        redis_server._start_server(free_port(), tmp_path, ["--no-such-option", "x"])
    assert not isinstance(refused.value, redis_server.PortTaken)
