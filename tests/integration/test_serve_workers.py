"""`userembed serve --workers N` as real processes on a real Redis: N server processes
share the HTTP and gRPC ports (SO_REUSEPORT), the parent restarts a killed one, drains
them on SIGTERM (in-flight requests finish, stragglers are killed after the bound) and
serves one /metrics for all of them.

Which process answered is read from prometheus-client's multiprocess files (one per
worker pid, in the parent's PROMETHEUS_MULTIPROC_DIR under the TMPDIR given here):
the server adds nothing per request for the tests' sake.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from models.registry import ModelArtifact
from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.api.proto.userembed.v1 import embeddings_pb2_grpc as pb_grpc
from service.store.redis_server import free_port
from tests.processes import Role, userembed, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.redis]

GET_ROUTE = "/v1/users/{user_id}/embedding"
GRPC_ROUTE = "/userembed.v1.Embeddings/GetEmbedding"
REQUESTS = "userembed_api_request_seconds_count"


@dataclass
class Served:
    """A running `serve --workers N`: the parent process and where it answers."""

    process: Role
    http: str
    grpc: str
    metrics: str
    tmp: Path

    def children(self) -> set[int]:
        pid = self.process.pid
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}

    def metrics_dir(self) -> Path:
        (directory,) = self.tmp.glob("userembed-metrics-*")
        return directory

    def scrape(self, url: str | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        text = httpx.get(f"{url or self.metrics}/metrics", timeout=10).text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def live_pids(self) -> set[int]:
        """Pids in userembed_api_worker_up (a worker counts itself once it serves)."""
        return {
            int(dict(labels)["pid"])
            for (name, labels), value in self.scrape().items()
            if name == "userembed_api_worker_up" and value == 1
        }

    def serving(self, workers: int) -> bool:
        children = self.children()
        return len(children) == workers and self.live_pids() == children


def env_for(redis_url: str, registry: Path, tmp: Path, metrics_port: int) -> dict[str, str]:
    return {
        "USEREMBED_REDIS_URL": redis_url,
        "USEREMBED_REGISTRY_PATH": str(registry),
        "USEREMBED_API_EVENTS_ENABLED": "false",
        "USEREMBED_METRICS_PORT": str(metrics_port),
        "TMPDIR": str(tmp),  # the parent's multiprocess directory goes here
    }


@contextmanager
def serve(
    workers: str, redis_url: str, registry: Path, tmp: Path, **extra_env: str
) -> Iterator[Served]:
    """`userembed serve --workers WORKERS`, once every worker serves."""
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    env = {**env_for(redis_url, registry, tmp, metrics_port), **extra_env}
    args = ("serve", "--workers", workers, "--port", str(port), "--grpc-port", str(grpc_port))
    with userembed(*args, env=env) as process:
        served = Served(
            process,
            f"http://127.0.0.1:{port}",
            f"127.0.0.1:{grpc_port}",
            f"http://127.0.0.1:{metrics_port}",
            tmp,
        )
        expected = len(os.sched_getaffinity(0)) if workers == "0" else int(workers)
        wait_for(lambda: served.serving(expected), 120, f"{expected} workers serving")
        yield served


@contextmanager
def cpus(allowed: set[int]) -> Iterator[None]:
    """This thread (and what it starts) runs on ``allowed`` only, until the block ends."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, allowed)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.fixture(scope="module")
def two(
    redis_url: str, standin: ModelArtifact, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    with serve("2", redis_url, standin.directory.parent, tmp_path_factory.mktemp("two")) as s:
        yield s
        assert s.process.poll() is None, s.process.output()[-3000:]


def http_get(served: Served, user: str, timeout_s: float = 10) -> httpx.Response:
    """One GET on a connection of its own (the kernel picks the worker per connection)."""
    return httpx.get(f"{served.http}/v1/users/{user}/embedding", timeout=timeout_s)


def grpc_get(served: Served, user: str, timeout_s: float = 10) -> pb.Embedding:
    """One GetEmbedding on a connection of its own (no subchannel shared between channels)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(served.grpc, options=options) as channel:
        answer: pb.Embedding = pb_grpc.EmbeddingsStub(channel).GetEmbedding(
            pb.GetEmbeddingRequest(user_id=user), timeout=timeout_s
        )
        return answer


def requests_by_pid(served: Served) -> dict[int, dict[str, float]]:
    """Per worker pid, its requests by protocol, from its own multiprocess file."""
    counts: dict[int, dict[str, float]] = {}
    for path in served.metrics_dir().glob("histogram_*.db"):
        by_protocol = counts.setdefault(int(path.stem.removeprefix("histogram_")), {})
        for family in MultiProcessCollector.merge([str(path)]):
            for s in family.samples:
                if s.name == REQUESTS and s.labels["route"] in (GET_ROUTE, GRPC_ROUTE):
                    protocol = s.labels["protocol"]
                    by_protocol[protocol] = by_protocol.get(protocol, 0.0) + s.value
    return counts


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], route: str) -> float:
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == REQUESTS and dict(labels)["route"] == route
    )


def test_http_and_grpc_are_served_by_both_workers_on_one_port(two: Served) -> None:
    for i in range(40):
        assert http_get(two, f"u{i}").status_code == 200
    for i in range(30):
        assert grpc_get(two, f"u{i}").user_id == f"u{i}"
    by_pid = requests_by_pid(two)
    assert set(by_pid) <= two.children()
    assert len([pid for pid, c in by_pid.items() if c.get("http", 0) > 0]) == 2, by_pid
    assert len([pid for pid, c in by_pid.items() if c.get("grpc", 0) > 0]) == 2, by_pid


def test_one_metrics_counts_the_requests_of_both_workers(two: Served) -> None:
    before = two.scrape()
    by_pid_before = requests_by_pid(two)
    for i in range(40):
        assert http_get(two, f"m{i}").status_code == 200
    for i in range(20):
        grpc_get(two, f"m{i}")
    after = two.scrape()
    assert total(after, GET_ROUTE) - total(before, GET_ROUTE) == 40
    assert total(after, GRPC_ROUTE) - total(before, GRPC_ROUTE) == 20
    grown = {
        pid
        for pid, counts in requests_by_pid(two).items()
        if sum(counts.values()) > sum(by_pid_before.get(pid, {}).values())
    }
    assert len(grown) == 2  # the sum above holds requests of both workers
    # The API port's own /metrics (answered by either worker) is the same aggregate.
    on_api_port = two.scrape(two.http)
    assert total(on_api_port, GET_ROUTE) == total(after, GET_ROUTE)
    assert two.live_pids() == two.children()


def test_a_killed_worker_is_restarted_and_the_port_keeps_answering(two: Served) -> None:
    starts = two.scrape()[("userembed_api_worker_starts_total", frozenset())]
    victim = min(two.children())
    os.kill(victim, signal.SIGKILL)
    # Once the victim has exited (its sockets closed), the other worker answers alone.
    wait_for(lambda: victim not in two.children() or _zombie(victim), 10, "the victim to exit")
    for i in range(20):
        assert http_get(two, f"k{i}").status_code == 200
        assert grpc_get(two, f"k{i}").user_id == f"k{i}"
    wait_for(lambda: two.serving(2) and victim not in two.children(), 120, "a replacement")
    log = two.process.output()
    assert "event=worker_exited worker=" in log
    line = next(line for line in log.splitlines() if f"pid={victim} exit_code" in line)
    assert "exit_code=-9 signal=SIGKILL restart_in_s=0.50" in line, line
    assert two.scrape()[("userembed_api_worker_starts_total", frozenset())] == starts + 1
    for i in range(10):
        assert http_get(two, f"r{i}").status_code == 200


def _zombie(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def test_workers_0_starts_one_per_usable_core(
    redis_url: str, standin: ModelArtifact, tmp_path: Path
) -> None:
    allowed = set(sorted(os.sched_getaffinity(0))[:2])
    if len(allowed) < 2:
        pytest.skip("one usable core: --workers 0 would be the single process")
    with ExitStack() as stack:
        with cpus(allowed):  # the parent inherits this affinity: its usable cores
            served = stack.enter_context(serve("0", redis_url, standin.directory.parent, tmp_path))
        assert len(served.children()) == len(allowed)
        assert f"event=workers_supervising workers={len(allowed)}" in served.process.output()


@contextmanager
def paused_redis(redis_url: str, seconds: float) -> Iterator[None]:
    """Every Redis command waits ``seconds`` (CLIENT PAUSE): reads become slow requests.
    The block ends once Redis answers again (an UNPAUSE would wait like the rest)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=seconds + 10)
    client.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
    try:
        yield
    finally:
        client.ping()
        client.close()


def in_flight(served: Served) -> float:
    return served.scrape()[("userembed_api_in_flight_requests", frozenset())]


def start_slow(
    served: Served, results: list[object], grpc_too: bool = False
) -> list[threading.Thread]:
    """A GET (and a GetEmbedding) in flight, each on its own thread, its outcome in ``results``."""

    def call(request: Callable[[], object]) -> None:
        try:
            results.append(request())
        except (httpx.HTTPError, grpc.RpcError) as exc:
            results.append(exc)

    requests: list[Callable[[], object]] = [lambda: http_get(served, "slow", SLOW_CLIENT_S)]
    if grpc_too:
        requests.append(lambda: grpc_get(served, "slow", SLOW_CLIENT_S))
    threads = [threading.Thread(target=call, args=(request,)) for request in requests]
    for thread in threads:
        thread.start()
    wait_for(lambda: in_flight(served) == len(threads), 10, "the slow requests in flight")
    return threads


SLOW_ENV = {"USEREMBED_REDIS_TIMEOUT_MS": "20000", "USEREMBED_API_READ_TIMEOUT_MS": "20000"}
SLOW_CLIENT_S = 60.0  # a slow request's client timeout: only a guard against a hang


def test_sigterm_drains_in_flight_requests_and_exits_0(
    clean_redis: str, standin: ModelArtifact, tmp_path: Path
) -> None:
    env = {**SLOW_ENV, "USEREMBED_API_DRAIN_TIMEOUT_S": "20"}
    with serve("2", clean_redis, standin.directory.parent, tmp_path, **env) as served:
        results: list[object] = []
        with paused_redis(clean_redis, 5.0):
            slow = start_slow(served, results, grpc_too=True)
            served.process.send_signal(signal.SIGTERM)
            # The workers stop accepting at once, while the accepted requests go on.
            wait_for(lambda: _refused(served), 30, "both ports to stop accepting")
            assert results == [], results  # refused before the slow requests answered
            assert served.process.wait(timeout=60) == 0, served.process.output()[-3000:]
        for thread in slow:
            thread.join(timeout=SLOW_CLIENT_S)
        # Every request in flight at the signal was answered, in full.
        answers = sorted(results, key=lambda r: type(r).__name__)
        assert len(answers) == 2, answers
        assert isinstance(answers[0], pb.Embedding) and answers[0].user_id == "slow", answers
        assert isinstance(answers[1], httpx.Response) and answers[1].status_code == 200, answers
        log = served.process.output()
        # Both workers exited by themselves within the drain bound: none was killed.
        assert "event=workers_draining signal=SIGTERM workers=2" in log
        assert log.count("event=worker_stopped") == 2 and "event=worker_killed" not in log
        assert not list(tmp_path.glob("userembed-metrics-*"))  # the parent cleaned up


def _refused(served: Served) -> bool:
    """Neither port takes a new connection."""
    try:
        httpx.get(f"{served.http}/healthz", timeout=1)
        return False
    except httpx.ConnectError:
        pass
    try:
        grpc_get(served, "late")
        return False
    except grpc.RpcError as exc:
        return bool(exc.code() == grpc.StatusCode.UNAVAILABLE)


def test_sigterm_kills_workers_still_draining_after_the_bound(
    clean_redis: str, standin: ModelArtifact, tmp_path: Path
) -> None:
    env = {**SLOW_ENV, "USEREMBED_API_DRAIN_TIMEOUT_S": "1"}
    with serve("2", clean_redis, standin.directory.parent, tmp_path, **env) as served:
        results: list[object] = []
        with paused_redis(clean_redis, 4.0):
            (slow,) = start_slow(served, results)
            signalled = time.monotonic()
            served.process.send_signal(signal.SIGTERM)
            assert served.process.wait(timeout=60) == 0, served.process.output()[-3000:]
            drained_s = time.monotonic() - signalled
        slow.join(timeout=SLOW_CLIENT_S)
        # A lower bound the parent guarantees: it kills no worker before the drain bound
        # (1 s, counted on the same monotonic clock from its SIGTERM) has passed.
        assert drained_s >= 1.0
        log = served.process.output()
        assert "event=worker_killed" in log
        assert log.index("event=workers_draining") < log.index("event=worker_killed")
        assert isinstance(results[0], httpx.HTTPError), results  # killed with its request
