"""librdkafka's built-in mock cluster: a real Kafka-protocol broker in-process.

Any client (ours included, in other processes) reaches it at ``bootstrap``; it
supports consumer groups and auto-creates topics (4 partitions by default). Used by
the tests and the ingest benchmark when no KAFKA_BOOTSTRAP is given.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

from confluent_kafka import Producer

_BOOTSTRAP = re.compile(r"Mock cluster enabled.*replaced with ([0-9.:,]+)")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bootstrap: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        match = _BOOTSTRAP.search(record.getMessage())
        if match:
            self.bootstrap = match.group(1)


@contextmanager
def mock_kafka_cluster(brokers: int = 1, timeout_s: float = 10.0) -> Iterator[str]:
    """Start a mock cluster and yield its bootstrap address; it lives until the block ends."""
    capture = _Capture()
    logger = logging.getLogger(f"userembed.kafka_mock.{id(capture)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(capture)
    # The cluster belongs to this client: keep it referenced for the block's lifetime.
    owner = Producer(
        {"test.mock.num.brokers": brokers, "bootstrap.servers": "mock:9092"}, logger=logger
    )
    deadline = time.monotonic() + timeout_s
    while capture.bootstrap is None and time.monotonic() < deadline:
        owner.poll(0.05)
    if capture.bootstrap is None:
        raise RuntimeError("librdkafka mock cluster did not report its address")
    try:
        yield capture.bootstrap
    finally:
        owner.flush(1.0)
        logger.removeHandler(capture)
