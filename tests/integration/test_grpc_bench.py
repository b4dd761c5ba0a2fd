"""``userembed bench grpc`` end to end with tiny durations: a real redis-server, the HTTP
API and every installed candidate as processes.

Only its shape is checked (rows, no errors, ordered percentiles, CPU measured): numbers
are printed, never asserted.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest

from service.bench.grpc_candidates import CANDIDATES, available
from service.bench.grpc_servers import GrpcBenchConfig, run_grpc_bench
from service.cli import build_parser

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def test_grpc_bench_measures_every_candidate_next_to_http(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI (apt-get install redis-server)")
        pytest.skip("redis-server is not installed")

    config = GrpcBenchConfig(concurrency=[2], duration_s=0.2, users=50, batch_size=5, rounds=2)
    rows = run_grpc_bench(config)

    servers = ["http", *available(CANDIDATES)]
    assert sorted((r.server, r.kind, r.turn) for r in rows) == sorted(
        (s, k, t) for s in servers for k in ("get", "batch") for t in (0, 1)
    )
    for r in rows:
        assert r.row.requests > 0, r
        assert r.row.errors == 0, r
        assert r.row.p50_ms <= r.row.p99_ms <= r.row.p999_ms, r
        assert r.server_cores >= 0 and not math.isnan(r.server_cores), r
        assert r.batch_size == (5 if r.kind == "batch" else 1), r
    summary = capsys.readouterr().out.split("median of 2 round(s)")[1]
    for name in servers[1:]:
        assert f"\n{name} " in summary


def test_grpc_bench_command_line() -> None:
    args = build_parser().parse_args(
        ["bench", "grpc", "--concurrency", "1,4", "--candidates", "aio-bytes", "--rounds", "2"]
    )
    assert (args.concurrency, args.candidates, args.rounds, args.channels) == (
        "1,4",
        "aio-bytes",
        2,
        4,
    )
    assert args.func.__name__ == "_cmd_bench_grpc"


def test_grpc_bench_refuses_unknown_candidates() -> None:
    with pytest.raises(ValueError, match="unknown candidates"):
        run_grpc_bench(GrpcBenchConfig(candidates=["aio-bytes", "tornado"]))
