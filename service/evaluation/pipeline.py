"""The live part's pipeline: ``userembed ingest``, ``worker`` and ``serve`` as real
processes over one topic and one Redis, plus what the evaluator reads from outside:
their Prometheus counters, the topic's log-end offsets and the group's committed ones.

Each role runs in its own session with its output in a log file (a pipe nobody reads
could fill and stall it) and is stopped by PID: SIGTERM, then SIGKILL after a grace.
The roles get default settings: inherited ``USEREMBED_*`` variables are dropped, except
``USEREMBED_KAFKA_*`` (how to reach and authenticate to a given broker).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from service.store.redis_server import free_port

READY_TIMEOUT_S = 90.0  # a cold start of the worker (ONNX load + warm-up) on a busy machine
STOP_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class Wiring:
    """Where everything is: shared by the roles (as environment) and the evaluator."""

    redis_url: str
    bootstrap: str
    registry: Path
    topic: str = field(default_factory=lambda: f"userembed-eval-{uuid.uuid4().hex[:8]}")
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    ingest_ops_port: int = field(default_factory=free_port)
    worker_ops_port: int = field(default_factory=free_port)
    overrides: dict[str, str] = field(default_factory=dict)  # settings the roles get on top

    @property
    def group(self) -> str:
        return f"{self.topic}-ingest"

    def settings(self) -> Settings:
        """Settings for the evaluator's own clients (producer, admin, offsets)."""
        return Settings(
            redis_url=self.redis_url,
            kafka_bootstrap=self.bootstrap,
            kafka_topic=self.topic,
            kafka_group=self.group,
        )

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("USEREMBED_") or k.startswith("USEREMBED_KAFKA_")
        }
        env.update(
            USEREMBED_REDIS_URL=self.redis_url,
            USEREMBED_KAFKA_BOOTSTRAP=self.bootstrap,
            USEREMBED_KAFKA_TOPIC=self.topic,
            USEREMBED_KAFKA_GROUP=self.group,
            USEREMBED_REGISTRY_PATH=str(self.registry),
            USEREMBED_METRICS_PORT="0",
        )
        return {**env, **self.overrides}


def mock_broker_overrides() -> dict[str, str]:
    """librdkafka's mock cluster answers a fetch that found no data only after the
    consumer's whole ``fetch.wait.max.ms`` (500 ms by default), even if messages arrive
    meanwhile; a real broker answers as soon as there is data. With a 10 ms wait the mock
    hands ingest new events about as soon as a real broker would (measured: 364 ms -> 8 ms
    from produce to consume at a few events/s)."""
    extra = json.loads(os.environ.get("USEREMBED_KAFKA_EXTRA") or "{}")
    return {"USEREMBED_KAFKA_EXTRA": json.dumps({**extra, "fetch.wait.max.ms": "10"})}


class Role:
    """A running ``userembed`` subcommand whose combined output goes to ``log_path``."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise, with the end of its log, if the process has exited."""
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"userembed {self.name} exited with {code}:\n{self.tail()}")

    def stop(self, first: signal.Signals = signal.SIGTERM) -> None:
        """``first`` to its process group, then SIGKILL if it is still running after the grace."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, first)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextlib.contextmanager
def role(name: str, args: Sequence[str], env: dict[str, str], log_dir: Path) -> Iterator[Role]:
    started = Role(name, args, env, log_dir)
    try:
        yield started
    finally:
        started.stop()


@dataclass(slots=True)
class Pipeline:
    """The three long-running roles of one evaluation run."""

    wiring: Wiring
    ingest: Role
    worker: Role
    api: Role

    @property
    def roles(self) -> tuple[Role, ...]:
        return (self.ingest, self.worker, self.api)

    def check_alive(self) -> None:
        for r in self.roles:
            r.check_alive()

    def diagnosis(self) -> str:
        return "\n".join(f"--- userembed {r.name} (last lines)\n{r.tail()}" for r in self.roles)


@contextlib.contextmanager
def run_pipeline(wiring: Wiring, log_dir: Path) -> Iterator[Pipeline]:
    """Start ingest, worker and API and wait until each answers /readyz; stop them at exit."""
    env = wiring.environment()
    with contextlib.ExitStack() as stack:
        ingest = stack.enter_context(
            role("ingest", ["ingest", "--metrics-port", str(wiring.ingest_ops_port)], env, log_dir)
        )
        worker_env = {**env, "USEREMBED_METRICS_PORT": str(wiring.worker_ops_port)}
        worker = stack.enter_context(role("worker", ["worker"], worker_env, log_dir))
        api_args = ["serve", "--port", str(wiring.http_port), "--grpc-port", str(wiring.grpc_port)]
        api = stack.enter_context(role("api", api_args, env, log_dir))
        pipeline = Pipeline(wiring, ingest, worker, api)
        for r, port in (
            (ingest, wiring.ingest_ops_port),
            (worker, wiring.worker_ops_port),
            (api, wiring.http_port),
        ):
            _wait_ready(r, port)
        yield pipeline


def _wait_ready(r: Role, port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r.check_alive()
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_get(port, "/readyz")[0] == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(
        f"userembed {r.name} not ready on port {port} in {timeout_s:.0f} s:\n{r.tail()}"
    )


def http_get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(port: int) -> Samples:
    """A role's /metrics as sample name -> [(labels, value)]."""
    status, text = http_get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"GET :{port}/metrics answered {status}")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    return sum(
        value
        for have, value in samples.get(name, [])
        if all(have.get(k) == v for k, v in labels.items())
    )


def ensure_topic(settings: Settings, partitions: int, create: bool) -> int:
    """Make the topic exist before ingest subscribes; return its partition count.

    ``create``: ask for ``partitions`` with CreateTopics (a real cluster). librdkafka's
    mock cluster does not implement CreateTopics, so there the metadata request
    auto-creates it with the mock's default (4 partitions).
    """
    admin = _admin(settings)
    if create:
        futures = admin.create_topics(
            [NewTopic(settings.kafka_topic, num_partitions=partitions, replication_factor=-1)],
            request_timeout=15.0,
        )
        for future in futures.values():
            try:
                future.result(timeout=20.0)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        metadata = admin.list_topics(topic=settings.kafka_topic, timeout=5.0)
        topic = metadata.topics.get(settings.kafka_topic)
        if topic is not None and topic.error is None and topic.partitions:
            return len(topic.partitions)
        time.sleep(0.2)
    raise RuntimeError(f"topic {settings.kafka_topic} did not appear on {settings.kafka_bootstrap}")


def _admin(settings: Settings) -> AdminClient:
    config: dict[str, Any] = {**settings.kafka_client_config()}
    return AdminClient(config)


def delete_topic(settings: Settings) -> None:
    """Best effort: remove the run's topic from a real cluster."""
    admin = _admin(settings)
    for future in admin.delete_topics([settings.kafka_topic], request_timeout=10.0).values():
        with contextlib.suppress(KafkaException, TimeoutError):
            future.result(timeout=15.0)


class Offsets:
    """The topic's log-end offsets and the ingest group's committed ones, read from outside
    the group (no subscription: it never joins or disturbs the group)."""

    def __init__(self, settings: Settings, partitions: int) -> None:
        self._consumer = Consumer(
            {**settings.kafka_client_config(), "group.id": settings.kafka_group}
        )
        self._partitions = [TopicPartition(settings.kafka_topic, p) for p in range(partitions)]

    def log_end(self) -> int:
        """Messages ever appended to the topic (sum of high watermarks)."""
        return sum(
            self._consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)[1]
            for tp in self._partitions
        )

    def lag(self) -> int:
        """Messages appended but not yet committed by ingest."""
        committed = self._consumer.committed(self._partitions, timeout=5.0)
        done = sum(max(tp.offset, 0) for tp in committed)
        return max(0, self.log_end() - done)

    def close(self) -> None:
        self._consumer.close()
