"""The read benchmark runs end to end against a real redis-server and the API subprocess
(HTTP and gRPC).

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
        BenchConfig(redis_url=None, concurrency=[1, 4], duration_s=0.3, users=200, batch_size=10)
    )

    targets = ["api-http", "api-grpc", "redis-get"]
    targets += ["api-http-b10", "api-http-b10-f16", "api-grpc-b10", "redis-mget10"]
    assert sorted((r.target, r.concurrency) for r in rows) == sorted(
        (t, c) for t in targets for c in (1, 4)
    )
    for row in rows:
        assert row.requests > 0, row
        assert row.errors == 0, row
        assert row.p50_ms <= row.p99_ms <= row.p999_ms, row
