"""``userembed migrate-keys`` on a real redis-server: a v1 layout written by hand moves
to v2 and reads back through the v2 RedisStore; a rerun changes nothing; an
interrupted run resumes; a cluster URL is refused."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import redis

from service import cli
from service.core.embeddings import EmbeddingRecord, encode_embedding
from service.core.features import FeatureState, apply_events, encode_features
from service.store.keys import KeyLayout, job_key
from service.store.migrate import (
    MigrationProgress,
    MigrationRefused,
    MigrationReport,
    Phase,
    migrate_keys,
)
from service.store.redis import RedisStore
from tests.helpers import BASE_TS, event, log_of

SHARDS = 8
USERS = 300


def state_for(user_id: str, n: int) -> FeatureState:
    events = [event(user_id=user_id, ts=BASE_TS + i, item_id=i) for i in range(n)]
    return apply_events(FeatureState.empty(), log_of(events), 10)[0]


def record(seed: int) -> EmbeddingRecord:
    vector = np.random.default_rng(seed).standard_normal(8).astype("float16")
    return EmbeddingRecord(vector, "m1", "m1", BASE_TS + seed, seed)


@dataclass
class V1:
    """What was written in the v1 layout, to compare the v2 store against."""

    features: dict[str, bytes] = field(default_factory=dict)
    embeddings: dict[str, bytes] = field(default_factory=dict)
    dirty: dict[str, int] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)
    leases: dict[str, int] = field(default_factory=dict)  # user -> its dirty time

    def expected_dirty(self) -> list[tuple[str, int]]:
        queue = dict(self.dirty)
        for user, at in self.leases.items():
            queue[user] = min(at, queue.get(user, at))
        return sorted(queue.items(), key=lambda pair: (pair[1], pair[0]))


def write_v1(url: str, users: int = USERS) -> V1:
    """A v1 store: feature states, embeddings (4 in 5 users), a dirty queue, an
    activity index, two leases in flight (one of them queued again since) and a job."""
    v1 = V1()
    ids = [f"user-{i}" if i % 3 else f"a.b:c@d_{i}" for i in range(users)]
    for i, user in enumerate(ids):
        v1.features[user] = encode_features(state_for(user, 1 + i % 7))
        if i % 5:
            v1.embeddings[user] = encode_embedding(record(i))
        v1.active[user] = BASE_TS + 1000 * i
        if i % 2:
            v1.dirty[user] = BASE_TS + 7 * i
    leased = {ids[2]: BASE_TS - 50, ids[3]: BASE_TS - 40}  # ids[3] is also dirty, later
    v1.leases = dict(leased)
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for user, raw in v1.features.items():
        pipe.set(f"uf:{user}", raw)
    for user, raw in v1.embeddings.items():
        pipe.set(f"ue:{user}", raw)
    pipe.zadd("userembed:dirty", v1.dirty)
    pipe.zadd("userembed:active", v1.active)
    pipe.zadd("userembed:leased", {user: BASE_TS + 30_000 for user in leased})
    pipe.hset(
        "userembed:lease",
        mapping={user: f"tok{n}abc:{at}" for n, (user, at) in enumerate(leased.items())},
    )
    pipe.set(job_key("reembed-m1"), 1)
    pipe.execute()
    client.close()
    return v1


def scan_keys(url: str) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return sorted(client.scan_iter(count=1000))
    finally:
        client.close()


def snapshot(url: str) -> dict[str, object]:
    """Every key with its value, by type."""
    client = redis.Redis.from_url(url)
    out: dict[str, object] = {}
    try:
        for raw in client.scan_iter(count=1000):
            key = raw.decode()
            kind = client.type(raw).decode()
            if kind == "string":
                out[key] = client.get(raw)
            elif kind == "zset":
                out[key] = client.zrange(raw, 0, -1, withscores=True)
            elif kind == "hash":
                out[key] = client.hgetall(raw)
            else:
                out[key] = kind
    finally:
        client.close()
    return out


async def active_pages(store: RedisStore, count: int) -> list[str]:
    """Every page of the activity index, cursor after cursor (0 = the end)."""
    cursor, users = 0, []
    while True:
        page, cursor = await store.active_users(cursor, count)
        users += page
        if cursor == 0:
            return users


async def check_v2(url: str, v1: V1) -> None:
    """The v2 store holds everything v1 did, and no v1 key is left."""
    left = [k for k in scan_keys(url) if "{" not in k and k != job_key("reembed-m1")]
    assert left == []
    client = redis.Redis.from_url(url)
    assert client.get(job_key("reembed-m1")) == b"1"
    client.close()
    store = RedisStore(url, timeout_ms=2000, shards=SHARDS)
    try:
        await store.open()
        users = sorted(v1.features)
        states, (records,) = await store.get_features_and_embeddings(users)
        for user, state, found in zip(users, states, records, strict=True):
            assert state is not None and encode_features(state) == v1.features[user], user
            if user in v1.embeddings:
                assert found is not None and encode_embedding(found) == v1.embeddings[user]
            else:
                assert found is None
        pages = await active_pages(store, 37)
        assert len(pages) == len(set(pages)) and sorted(pages) == sorted(v1.active)
        expected = v1.expected_dirty()
        stats = await store.dirty_stats()
        assert (stats.depth, stats.oldest_ms, stats.leased) == (
            len(expected),
            expected[0][1],
            0,
        )
        assert await store.pop_dirty(len(expected) + 10) == expected
    finally:
        await store.close()


def counts(report: MigrationReport) -> tuple[int, ...]:
    return (
        report.features,
        report.embeddings,
        report.dirty,
        report.active,
        report.leases_requeued,
        report.skipped,
    )


async def test_a_v1_layout_moves_to_v2_and_a_second_run_changes_nothing(clean_redis: str) -> None:
    v1 = write_v1(clean_redis)
    seen: list[MigrationProgress] = []
    report = await migrate_keys(clean_redis, SHARDS, batch=100, progress=seen.append)
    assert counts(report) == (USERS, len(v1.embeddings), len(v1.dirty), USERS, 2, 0)
    assert report.ignored == 0 and report.elapsed_s > 0
    assert {p.phase for p in seen} == {"keys", "dirty", "active", "leases"}
    for phase in ("keys", "dirty", "active", "leases"):  # each counts up to its total
        mine = [p for p in seen if p.phase == phase]
        done = [p.done for p in mine]
        assert done == sorted(done) and {p.total for p in mine} == {done[-1]}, mine
    assert seen[[p.phase for p in seen].index("dirty") - 1] == MigrationProgress(
        "keys", seen[0].total, seen[0].total
    )
    # every v2 user key carries the shard of its user
    layout = KeyLayout(SHARDS)
    for key in scan_keys(clean_redis):
        if key.startswith(("uf:", "ue:")):
            user = key.split("}:", 1)[1]
            assert key in (layout.feature_key(user), layout.embedding_key(user))

    before = snapshot(clean_redis)
    again = await migrate_keys(clean_redis, SHARDS)
    assert counts(again) == (0, 0, 0, 0, 0, 0) and again.moved == 0
    assert snapshot(clean_redis) == before
    await check_v2(clean_redis, v1)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("phase", ["keys", "dirty", "active", "leases"])
async def test_an_interrupted_run_resumes_where_it_stopped(clean_redis: str, phase: Phase) -> None:
    v1 = write_v1(clean_redis)

    def stop_after_a_batch(progress: MigrationProgress) -> None:
        if progress.phase == phase:
            raise Interrupted

    with pytest.raises(Interrupted):
        await migrate_keys(clean_redis, SHARDS, batch=1, progress=stop_after_a_batch)
    left = [k for k in scan_keys(clean_redis) if "{" not in k]
    assert len(left) > 1  # stopped half way: v1 keys remain besides the job key
    report = await migrate_keys(clean_redis, SHARDS, batch=50)
    assert report.skipped == 0 and report.moved > 0
    await check_v2(clean_redis, v1)


async def test_a_v2_key_already_there_wins_and_the_v1_key_is_counted_as_skipped(
    clean_redis: str,
) -> None:
    write_v1(clean_redis, users=20)
    newer = encode_features(state_for("user-1", 9))
    client = redis.Redis.from_url(clean_redis)
    client.set(KeyLayout(SHARDS).feature_key("user-1"), newer)
    client.set("uf:not a user id", b"x")  # not a user's key: left alone
    client.close()
    report = await migrate_keys(clean_redis, SHARDS)
    assert (report.features, report.skipped, report.skipped_keys) == (19, 1, ["uf:user-1"])
    assert report.ignored == 1 and "1 skipped" in report.summary()
    store = RedisStore(clean_redis, timeout_ms=2000, shards=SHARDS)
    try:
        (state,) = await store.get_features(["user-1"])
        assert state is not None and encode_features(state) == newer
    finally:
        await store.close()
    assert "uf:user-1" not in scan_keys(clean_redis)


async def test_v2_keys_of_another_shard_count_are_refused(clean_redis: str) -> None:
    write_v1(clean_redis, users=50)
    await migrate_keys(clean_redis, SHARDS)
    write_v1(clean_redis, users=50)  # v1 keys again, then the wrong shard count
    with pytest.raises(MigrationRefused, match="another shard count"):
        await migrate_keys(clean_redis, SHARDS * 2)


@pytest.mark.parametrize(
    "url", ["redis+cluster://127.0.0.1:7000,127.0.0.1:7001", "rediss+cluster://h:1", "memory://"]
)
async def test_a_cluster_or_memory_url_is_refused_in_one_sentence(url: str) -> None:
    with pytest.raises(MigrationRefused, match="nothing to migrate"):
        await migrate_keys(url, SHARDS)


def test_the_cli_prints_progress_on_stderr_and_a_summary(
    clean_redis: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = write_v1(clean_redis, users=40)
    monkeypatch.setenv("USEREMBED_REDIS_URL", clean_redis)
    monkeypatch.setenv("USEREMBED_REDIS_SHARDS", str(SHARDS))
    cli.main(["migrate-keys", "--batch", "5"])
    out, err = capsys.readouterr()
    assert out.startswith("migrated to key layout v2") and "40 feature states" in out
    assert f"{len(v1.embeddings)} embeddings" in out and "2 leases requeued" in out
    lines = err.splitlines()
    assert "migrate-keys: keys" in err and "\r" not in err
    keys_lines = [line for line in lines if line.startswith("migrate-keys: keys")]
    assert 1 <= len(keys_lines) <= 11 and keys_lines[-1].endswith("(100%)")

    monkeypatch.setenv("USEREMBED_REDIS_URL", "redis+cluster://127.0.0.1:7000")
    with pytest.raises(SystemExit, match="nothing to migrate"):
        cli.main(["migrate-keys"])
