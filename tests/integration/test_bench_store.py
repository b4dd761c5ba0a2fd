"""The store benchmark runs end to end at a tiny size on the redis-server and the local
Redis Cluster it starts itself.

Only structure and sanity are checked (every section on both topologies, positive
rates, counted requests and commands, bytes per user near the record sizes, the JSON
file): numbers are printed, never judged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from service.bench.store import StoreBenchConfig, run_store_bench

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def test_store_bench_measures_every_section_on_both_topologies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI (apt-get install redis-server)")
        pytest.skip("redis-server is not installed")
    out = tmp_path / "store.json"
    config = StoreBenchConfig(
        users=300,
        events=600,
        seconds=0.2,
        ingest_batch=200,
        read_batch=20,
        concurrency=4,
        claim_users=3000,
        claim_concurrency=2,
        json_path=str(out),
    )

    result = run_store_bench(config)

    both = ("single", "cluster")
    expected = {("ingest", "apply b200", t, 1) for t in both}
    expected |= {("worker", "claim+read+write b256", t, 1) for t in both}
    expected |= {
        ("read", f"get {n}", t, c) for n in (1, 20) for c in (1, 4) for t in (*both, "raw-single")
    }
    expected |= {("claim", f"claim 256 S={s}", t, 2) for s in (64, 1) for t in both}
    assert {(r.section, r.op, r.topology, r.concurrency) for r in result.ops} == expected
    for row in result.ops:
        assert row.ops > 0 and row.units >= row.ops, row
        assert row.units_per_s > 0 and row.us_per_unit > 0 and row.seconds > 0, row
        assert 0 < row.p50_us <= row.p99_us, row
        assert row.requests_per_op >= 1 and row.commands_per_op >= 1, row
        assert row.server_us_per_unit >= 0 and row.client_us_per_unit > 0, row
        if row.topology != "cluster":
            assert row.replica_us_per_unit == 0, row

    by = {(r.op, r.topology, r.concurrency): r for r in result.ops}
    # what the code paths promise: one MGET and one script per ingest batch on a node,
    # one request per read there, at most one per primary for a cluster batch read
    assert by["apply b200", "single", 1].requests_per_op == pytest.approx(2)
    assert by["apply b200", "cluster", 1].requests_per_op > 2
    assert by["get 1", "single", 1].requests_per_op == pytest.approx(1)
    assert by["get 1", "cluster", 1].requests_per_op == pytest.approx(1)
    assert 1 <= by["get 20", "cluster", 1].requests_per_op <= config.primaries
    assert by["get 20", "raw-single", 1].requests_per_op == pytest.approx(1)

    assert {(m.topology, m.history, m.dtype) for m in result.memory} == {
        (t, h, d) for t in both for h in (50, 200) for d in ("float16", "float32")
    }
    for m in result.memory:
        payload = m.feature_payload + m.embedding_payload
        # the records themselves, plus key, object and entry overheads of a few hundred bytes
        assert payload < m.bytes_per_user < 1.5 * payload + 1000, m
        # MEMORY USAGE: the payload rounded up to an allocator size class (up to 25%), key, entry
        assert m.feature_payload < m.feature_bytes < 1.25 * m.feature_payload + 300, m
        assert m.embedding_payload < m.embedding_bytes < 1.25 * m.embedding_payload + 300, m
        for entry in (m.dirty_entry_bytes, m.active_entry_bytes, m.lease_entry_bytes):
            assert 0 < entry < 300, m
        if m.topology == "cluster":  # one replica per primary holds a copy
            assert 0.5 * m.bytes_per_user < m.replica_bytes_per_user < 1.5 * m.bytes_per_user, m
        else:
            assert m.replica_bytes_per_user == 0, m
    memory = {(m.topology, m.history, m.dtype): m for m in result.memory}
    for t in both:
        assert memory[t, 200, "float16"].feature_payload > memory[t, 50, "float16"].feature_payload
        assert (
            memory[t, 50, "float32"].embedding_payload > memory[t, 50, "float16"].embedding_payload
        )
    assert any("strings with" in line for line in result.memkeys), result.memkeys
    assert len(result.projections) >= 6

    saved = json.loads(out.read_text())
    assert saved["provenance"]["commit"] and saved["provenance"]["machine"]["cpus"] >= 1
    assert len(saved["ops"]) == len(result.ops) and len(saved["memory"]) == len(result.memory)
    printed = capsys.readouterr().out
    assert "userembed bench store  commit=" in printed
    for title in (
        "1. ingest",
        "2. worker",
        "3. reads",
        "4. claims",
        "bytes per user",
        "projection",
    ):
        assert title in printed, title
