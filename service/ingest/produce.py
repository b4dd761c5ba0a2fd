"""``userembed produce``: synthetic events to Kafka at a steady rate, optionally with a
fraction of malformed messages (for the dead-letter path), for load tests and the stack."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from service.core.clock import now_ms
from service.core.events import encode_event
from service.ingest.kafka import KafkaEventSink
from service.ingest.synthetic import MALFORMED_KINDS, SyntheticTraffic, malformed_payload
from service.settings import Settings


@dataclass(frozen=True, slots=True)
class ProduceConfig:
    rate: float = 1000.0
    users: int = 10_000
    malformed_fraction: float = 0.0
    count: int | None = None
    duration_s: float | None = None
    seed: int = 7


def run_producer(settings: Settings, config: ProduceConfig) -> tuple[int, int]:
    """Produce until count/duration is reached or Ctrl-C; return (sent, malformed)."""
    if not 0.0 <= config.malformed_fraction <= 1.0:
        raise ValueError("malformed fraction must be within [0, 1]")
    sink = KafkaEventSink(settings, delivery_timeout_s=30.0)
    traffic = SyntheticTraffic(config.users, config.seed)
    rng = np.random.default_rng(config.seed + 1)
    sent = malformed = 0
    started = last_report = last_tick = time.monotonic()
    owed = 0.0
    try:
        while (config.count is None or sent < config.count) and (
            config.duration_s is None or time.monotonic() - started < config.duration_s
        ):
            time.sleep(0.01)
            # owe what the elapsed time is worth, not what the sleep asked for: a slow
            # step (generation, a busy core) must not lower the rate
            now = time.monotonic()
            owed += config.rate * (now - last_tick)
            last_tick = now
            n = int(owed) if config.count is None else min(int(owed), config.count - sent)
            owed -= n
            for event in traffic.events(n, now_ms()):
                if rng.random() < config.malformed_fraction:
                    kind = MALFORMED_KINDS[int(rng.integers(len(MALFORMED_KINDS)))]
                    sink.produce_nowait(event.user_id, malformed_payload(event, kind))
                    malformed += 1
                else:
                    sink.produce_nowait(event.user_id, encode_event(event))
            sent += n
            if time.monotonic() - last_report >= 1.0:
                elapsed = time.monotonic() - started
                sys.stderr.write(f"\rsent={sent} malformed={malformed} rate={sent / elapsed:.0f}/s")
                last_report = time.monotonic()
    except KeyboardInterrupt:
        pass
    finally:
        unsent = sink.flush(30.0)
        sys.stderr.write(f"\nproduced {sent - unsent} events ({malformed} malformed)\n")
    return sent - unsent, malformed
