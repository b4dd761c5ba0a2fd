"""The read benchmark runs end to end against a real redis-server and the API subprocess
(HTTP and gRPC), here with ``serve --workers 1`` and ``--workers 2`` side by side, the
client library next to raw httpx and the hedging rows (one of two processes paused).

Only its shape is checked (rows, no errors, ordered percentiles): numbers are printed,
never asserted.
"""

from __future__ import annotations

import os
import shutil

import pytest

from service.bench.read import BenchConfig, run_read_bench

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def test_read_bench_measures_every_target_at_every_level() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI (apt-get install redis-server)")
        pytest.skip("redis-server is not installed")

    rows = run_read_bench(
        BenchConfig(
            redis_url=None,
            concurrency=[1, 4],
            duration_s=0.2,
            users=200,
            batch_size=10,
            workers=[1, 2],
            hedge_concurrency=4,
        )
    )

    api = ["api-http", "api-grpc", "api-http-b10", "api-http-b10-f16", "api-grpc-b10"]
    per_level = [f"{t}[w{w}]" for t in api for w in (1, 2)] + ["redis-get", "redis-mget10"]
    expected = [(t, c) for t in per_level for c in (1, 4)]
    # the client rows at the middle level (4), the hedging rows at hedge_concurrency
    expected += [(t, 4) for t in ("client-get", "httpx-get")]
    expected += [(t, 4) for t in ("client-get_many-b10", "httpx-batch-b10")]
    expected += [(f"hedge-{h}-{s}", 4) for h in ("off", "on") for s in ("healthy", "slow")]
    assert sorted((r.target, r.concurrency) for r in rows) == sorted(expected)
    for row in rows:
        assert row.requests > 0, row
        assert row.errors == 0, row
        assert row.p50_ms <= row.p99_ms <= row.p999_ms, row
