"""loadtests/run.sh drives a real `userembed serve` (HTTP and gRPC, real Redis) with both
Locust user classes for a few seconds and leaves CSV stats and an HTML report."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from models.registry import ModelArtifact
from service.store.redis_server import free_port
from tests.processes import userembed, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.redis]
ROOT = Path(__file__).resolve().parents[2]


def test_headless_loadtest_writes_csv_and_html(
    clean_redis: str, standin: ModelArtifact, tmp_path: Path
) -> None:
    locust = Path(sys.executable).with_name("locust")
    if not locust.exists():
        pytest.skip("locust is not installed (pip install -e '.[load]')")
    http_port, grpc_port = free_port(), free_port()
    env = {
        "USEREMBED_REDIS_URL": clean_redis,
        "USEREMBED_REGISTRY_PATH": str(standin.directory.parent),
        "USEREMBED_API_EVENTS_ENABLED": "false",
    }
    args = ("serve", "--port", str(http_port), "--grpc-port", str(grpc_port))
    with userembed(*args, env=env) as api:
        base = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, 20, "the API ready")
        run = subprocess.run(
            ["bash", str(ROOT / "loadtests/run.sh"), base, "4s", "4", str(tmp_path)],
            env={
                **os.environ,
                "LOCUST": str(locust),
                "LOADTEST_GRPC_TARGET": f"127.0.0.1:{grpc_port}",
                "LOADTEST_USERS": "500",
                "LOADTEST_BATCH": "20",
            },
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + api.output()[-2000:]

    assert (tmp_path / "report.html").stat().st_size > 0
    with (tmp_path / "stats_stats.csv").open() as handle:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(handle)}
    names = {name for _, name in rows}
    assert {"GET /v1/users/{id}/embedding", "GetEmbedding"} <= names, names
    total = rows[("", "Aggregated")]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
