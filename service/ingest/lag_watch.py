"""Consumer lag per partition: from librdkafka's statistics while the source consumes, and
from the brokers' high watermarks while it does not (an outage, the DLQ blocked), so a
stuck partition's lag keeps growing on the dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

from confluent_kafka import Consumer, KafkaException, TopicPartition

from service.metrics import INGEST_LAG

# The source's logger: the watch's lines keep their logger name.
log = logging.getLogger("service.ingest.kafka")

_STATS_INTERVAL_S: Final = 5.0


def statistics_config(topic: str) -> dict[str, Any]:
    """Consumer settings that report the lag of ``topic``'s partitions from statistics."""

    def on_stats(stats_json: str) -> None:
        """librdkafka statistics -> consumer lag per partition."""
        stats = json.loads(stats_json)
        partitions = stats.get("topics", {}).get(topic, {}).get("partitions", {})
        for name, partition in partitions.items():
            lag = partition.get("consumer_lag", -1)
            if int(name) >= 0 and lag >= 0:
                INGEST_LAG.labels(name).set(lag)

    return {"statistics.interval.ms": int(_STATS_INTERVAL_S * 1000), "stats_cb": on_stats}


class LagWatch:
    """A thread that measures the lag of ``committed``'s partitions from the high
    watermarks whenever the consumer has not polled for two statistics intervals."""

    def __init__(self, consumer: Consumer, topic: str, committed: Mapping[int, int]) -> None:
        self._consumer = consumer
        self._topic = topic
        self._committed = committed  # next offset per owned partition, as committed
        self._polling = False
        self._last_poll = time.monotonic()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lag-watch", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def polling(self) -> Iterator[None]:
        """Around a consume: statistics are served, the watch stands aside."""
        self._polling = True
        try:
            yield
        finally:
            self._polling, self._last_poll = False, time.monotonic()

    def _watch(self) -> None:
        while not self._closing.wait(_STATS_INTERVAL_S):
            if self._polling or time.monotonic() - self._last_poll < 2 * _STATS_INTERVAL_S:
                continue
            for partition, committed in dict(self._committed).items():
                if self._closing.is_set():
                    break  # close() destroys the consumer once this thread is done
                tp = TopicPartition(self._topic, partition)
                try:
                    _, high = self._consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
                except (KafkaException, RuntimeError) as exc:
                    log.debug("event=lag_watch_failed partition=%d reason=%r", partition, exc)
                    continue
                if partition in self._committed and high >= 0 and not self._closing.is_set():
                    INGEST_LAG.labels(str(partition)).set(max(high - committed, 0))

    async def close(self) -> None:
        """Stop the watch and wait (up to 5 s) for its thread, which uses the consumer."""
        self._closing.set()
        await asyncio.to_thread(self._thread.join, 5.0)
