"""The read API of another checkout (a base commit) against this tree's, in one run.

Both servers read the same private Redis; batchGet (base64 float16 and JSON) and GET of
each, next to a raw MGET / GET, are measured in turns, so the machine's drift weighs on
both alike (`userembed bench read` measures one tree).

    git worktree add /tmp/base <commit>
    .venv/bin/python scripts/bench_read_ab.py /tmp/base [clients] [seconds] [turns]
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis
import uvloop

from models.standin import publish_standin
from service.bench.api_process import api_process, populate, wait_ready
from service.bench.loadgen import Target, measure_in_turns, print_header, print_row, ratio
from service.bench.read import LAYOUT, KeepAliveHttp, batch_request, redis_get, redis_mget
from service.store.redis_server import free_port, private_redis, stop_process

BASE = sys.argv[1]
C = int(sys.argv[2]) if len(sys.argv) > 2 else 32
DUR = float(sys.argv[3]) if len(sys.argv) > 3 else 12.0
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 6


@contextlib.contextmanager
def old_api(url: str, registry: Path) -> Iterator[int]:
    """``serve`` from the base checkout (its code first on the path); yields its port."""
    http, grpc = free_port(), free_port()
    env = dict(
        os.environ,
        USEREMBED_REDIS_URL=url,
        USEREMBED_REGISTRY_PATH=str(registry),
        USEREMBED_REFRESH_AFTER_S="86400",
        USEREMBED_API_EVENTS_ENABLED="false",
        USEREMBED_METRICS_PORT="0",
        PYTHONPATH=BASE,
    )
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--port",
                str(http),
                "--grpc-port",
                str(grpc),
            ],
            cwd=BASE,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_ready(p, http, err, 30.0, 1, 0)
            yield http
        finally:
            stop_process(p)


async def run(url: str, old_port: int, new_port: int) -> None:
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 10000, (C, 256, 100)).tolist()
    groups = [[[f"u{i}" for i in g] for g in row] for row in ids]
    singles = [[g[0] for g in row] * 8 for row in groups]
    client = aioredis.Redis.from_url(url, max_connections=C)
    conns = {
        name: [KeepAliveHttp(port) for _ in range(C)]
        for name, port in (("base", old_port), ("new", new_port))
    }
    targets = []
    for enc, tag in (("base64_float16", "-f16"), ("json", "")):
        bodies = [[batch_request(g, enc) for g in row] for row in groups]
        for name in ("base", "new"):
            targets.append(Target(f"{name}-b100{tag}", [h.batch_get for h in conns[name]], bodies))
    keys = [[[LAYOUT.embedding_key(u) for u in g] for g in row] for row in groups]
    targets.append(Target("redis-mget100", [redis_mget(client)] * C, keys))
    for name in ("base", "new"):
        targets.append(Target(f"{name}-get", [h.get_embedding for h in conns[name]], singles))
    targets.append(
        Target(
            "redis-get",
            [redis_get(client)] * C,
            [[LAYOUT.embedding_key(u) for u in row] for row in singles],
        )
    )
    rows = await measure_in_turns(targets, DUR, ROUNDS)
    print_header()
    by = {r.target: r for r in rows}
    for r in rows:
        print_row(r)
    pairs = [
        (t, "redis-mget100") for t in ("base-b100-f16", "new-b100-f16", "base-b100", "new-b100")
    ]
    for t, raw in [*pairs, ("base-get", "redis-get"), ("new-get", "redis-get")]:
        a, b = by[t], by[raw]
        print(f"  {t} vs {raw}: req/s x{ratio(a.rps, b.rps)} p99 x{ratio(a.p99_ms, b.p99_ms)}")
    await client.aclose()


with contextlib.ExitStack() as stack:
    url = stack.enter_context(private_redis())
    reg = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    uvloop.run(populate(url, 10000))
    publish_standin(reg)
    new = stack.enter_context(api_process(url, reg))
    old = stack.enter_context(old_api(url, reg))
    base_commit = subprocess.check_output(["git", "-C", BASE, "rev-parse", "--short", "HEAD"])
    print(
        f"A/B: base={BASE} (commit {base_commit.decode().strip()}) vs this tree, c={C},"
        f" {DUR}s per target in {ROUNDS} turns"
    )
    uvloop.run(run(url, old, new.ports.http))
