"""One contract, every store: each test runs on MemoryStore, a real redis-server and a
real Redis Cluster (3 primaries, 3 replicas), with keys spread over several shards."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from service.core.embeddings import EmbeddingRecord
from service.core.features import FeatureState, apply_events
from service.core.model_names import DEFAULT_MODEL
from service.store.keys import KeyLayout
from service.store.protocol import Store, StoreUnavailable
from service.store.redis import RedisStore
from service.store.redis_server import free_port
from tests.helpers import BASE_TS, event, log_of


def state_for(user_id: str, n: int = 3) -> FeatureState:
    events = [event(user_id=user_id, ts=BASE_TS + i, item_id=i) for i in range(n)]
    return apply_events(FeatureState.empty(), log_of(events), 10)[0]


def record(seed: int, dtype: str = "float16") -> EmbeddingRecord:
    vector = np.random.default_rng(seed).standard_normal(8).astype(dtype)
    return EmbeddingRecord(vector, "m1", "m1", BASE_TS + seed, seed)


async def test_features_round_trip_in_bulk_and_missing_users_are_none(store: Store) -> None:
    states = {"a": state_for("a", 2), "b": state_for("b", 5)}
    await store.put_features(states)
    got = await store.get_features(["b", "nobody", "a"])
    assert got[1] is None
    assert got[0] is not None and got[2] is not None
    assert got[0].timestamps.tolist() == states["b"].timestamps.tolist()
    assert got[2].item_hashes.tolist() == states["a"].item_hashes.tolist()
    assert await store.get_features([]) == []


async def test_put_features_can_mark_users_dirty_in_the_same_write(store: Store) -> None:
    await store.put_features({"a": state_for("a"), "b": state_for("b")}, dirty_at_ms=BASE_TS)
    assert sorted(await store.pop_dirty(10)) == [("a", BASE_TS), ("b", BASE_TS)]
    await store.put_features({"c": state_for("c")})
    assert await store.pop_dirty(10) == []


@pytest.mark.parametrize("dtype", ["float16", "float32"])
async def test_embeddings_round_trip_in_bulk(store: Store, dtype: str) -> None:
    await store.put_embeddings({"x": record(1, dtype), "y": record(2, dtype)})
    x, missing, y = await store.get_embeddings(["x", "ghost", "y"])
    assert missing is None
    assert x is not None and y is not None
    np.testing.assert_array_equal(x.vector, record(1, dtype).vector)
    assert y.feature_version == 2 and y.vector.dtype == np.dtype(dtype)


async def test_dirty_queue_dedups_and_keeps_the_oldest_time(store: Store) -> None:
    await store.mark_dirty({"u1": 500, "u2": 300})
    await store.mark_dirty({"u1": 900})  # newer: ignored
    await store.mark_dirty({"u2": 100})  # older: kept
    stats = await store.dirty_stats()
    assert (stats.depth, stats.oldest_ms) == (2, 100)
    assert await store.pop_dirty(10) == [("u2", 100), ("u1", 500)]
    assert (await store.dirty_stats()).depth == 0
    assert (await store.dirty_stats()).oldest_ms is None


async def test_pop_is_oldest_first_bounded_and_ties_break_by_user_id(store: Store) -> None:
    await store.mark_dirty({"c": 2, "b": 2, "a": 3, "d": 1})
    assert await store.pop_dirty(3) == [("d", 1), ("b", 2), ("c", 2)]
    assert await store.pop_dirty(3) == [("a", 3)]
    assert await store.pop_dirty(3) == []


async def test_a_popped_user_can_be_queued_again(store: Store) -> None:
    await store.mark_dirty({"u": 10})
    assert await store.pop_dirty(1) == [("u", 10)]
    await store.mark_dirty({"u": 20})
    assert await store.pop_dirty(5) == [("u", 20)]


async def test_many_users_in_one_call(store: Store) -> None:
    await store.mark_dirty({f"u{i}": i for i in range(2000)})
    popped = await store.pop_dirty(2000)
    assert [at for _, at in popped] == list(range(2000))


async def test_an_unreadable_redis_record_reads_as_absent(clean_redis: str) -> None:
    client = redis.Redis.from_url(clean_redis)
    client.set(KeyLayout(64).feature_key("broken"), b"garbage")
    client.close()
    store = RedisStore(clean_redis)
    try:
        assert await store.get_features(["broken"]) == [None]
    finally:
        await store.close()


async def test_redis_down_is_reported_as_unavailable_within_the_timeout() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=200)
    try:
        with pytest.raises(StoreUnavailable, match="redis unavailable"):
            await store.get_embeddings(["u1"])
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.close()


async def test_compare_and_set_writes_only_users_at_the_expected_version(store: Store) -> None:
    first = {"a": state_for("a", 1), "b": state_for("b", 1)}
    assert await store.put_features(first, BASE_TS, expected_versions={"a": 0, "b": 0}) == []
    assert sorted(await store.pop_dirty(10)) == [("a", BASE_TS), ("b", BASE_TS)]
    newer = apply_events(first["a"], log_of([event("a", ts=BASE_TS + 9)], 50), 10)[0]
    # 'a' was read at version 1 (correct), 'b' is claimed absent (stale read): b conflicts
    conflicts = await store.put_features(
        {"a": newer, "b": state_for("b", 4)}, BASE_TS + 1, expected_versions={"a": 1, "b": 0}
    )
    assert conflicts == ["b"]
    a, b = await store.get_features(["a", "b"])
    assert a is not None and a.version == 2 and a.num_events == 2
    assert b is not None and b.num_events == 1  # untouched
    assert await store.pop_dirty(10) == [("a", BASE_TS + 1)]  # the conflict is not marked


async def test_claiming_no_record_when_one_exists_is_a_conflict(store: Store) -> None:
    await store.put_features({"a": state_for("a", 1)})
    assert await store.put_features({"a": state_for("a", 2)}, expected_versions={"a": 0}) == ["a"]


def shard_count(store: Store) -> int:
    """How many shards the store spreads users over (the memory store is one)."""
    layout = getattr(store, "layout", None)
    return 1 if layout is None else int(layout.shards)


async def test_claims_lease_the_oldest_users_and_release_ends_the_lease(store: Store) -> None:
    await store.mark_dirty({"a": 30, "b": 10, "c": 20})
    # one at a time, the oldest comes first whatever the shards
    assert await store.claim_dirty(1, token="w1", now_ms=1000, lease_ms=500) == [("b", 10)]
    assert await store.claim_dirty(1, token="w1", now_ms=1000, lease_ms=500) == [("c", 20)]
    stats = await store.dirty_stats()
    assert (stats.depth, stats.leased) == (1, 2)
    await store.release_claim("w1", ["b", "c"])
    assert (await store.dirty_stats()).leased == 0
    # released users stay done: a claim after any expiry time finds only 'a'
    assert await store.claim_dirty(5, token="w2", now_ms=10**9, lease_ms=500) == [("a", 30)]


async def test_a_claim_takes_at_most_its_limit_oldest_first_within_each_shard(
    store: Store,
) -> None:
    dirty = {f"u{i}": 1000 + i for i in range(200)}
    await store.mark_dirty(dirty)
    claimed = await store.claim_dirty(50, token="w", now_ms=5000, lease_ms=500)
    assert len(claimed) == 50 and len(dict(claimed)) == 50
    assert claimed[0] == ("u0", 1000)  # the oldest of all
    assert all(dirty[u] == at for u, at in claimed)
    layout = KeyLayout(shard_count(store))
    for shard, users in layout.by_shard(dirty).items():
        taken = sorted(dirty[u] for u, _ in claimed if layout.shard(u) == shard)
        assert taken == sorted(dirty[u] for u in users)[: len(taken)]  # a prefix: oldest
    rest = await store.claim_dirty(1000, token="w", now_ms=5000, lease_ms=500)
    assert sorted([*claimed, *rest]) == sorted(dirty.items())


async def test_an_expired_lease_returns_the_user_with_its_original_dirty_time(
    store: Store,
) -> None:
    await store.mark_dirty({"a": 10, "b": 20})
    assert len(await store.claim_dirty(2, token="dead", now_ms=1000, lease_ms=500)) == 2
    assert await store.claim_dirty(5, token="w2", now_ms=1499, lease_ms=500) == []
    assert await store.claim_dirty(5, token="w2", now_ms=1500, lease_ms=500) == [
        ("a", 10),
        ("b", 20),
    ]
    # the dead worker's late release does not end w2's leases
    await store.release_claim("dead", ["a", "b"])
    assert (await store.dirty_stats()).leased == 2


async def test_a_user_dirtied_again_while_leased_stays_queued(store: Store) -> None:
    await store.mark_dirty({"a": 10})
    await store.claim_dirty(1, token="w1", now_ms=1000, lease_ms=500)
    await store.mark_dirty({"a": 50})  # a new event while the worker computes
    await store.release_claim("w1", ["a"])
    assert await store.pop_dirty(5) == [("a", 50)]


async def test_release_can_requeue_a_failed_batch_in_the_same_step(store: Store) -> None:
    await store.mark_dirty({"a": 10, "b": 20})
    claimed = dict(await store.claim_dirty(2, token="w1", now_ms=1000, lease_ms=500))
    await store.release_claim("w1", list(claimed), requeue=claimed)
    stats = await store.dirty_stats()
    assert (stats.depth, stats.leased, stats.oldest_ms) == (2, 0, 10)


async def all_active(store: Store, page: int = 10) -> list[str]:
    """Every active user, paging with the store's cursor until it says the end."""
    found, cursor = [], 0
    while True:
        users, cursor = await store.active_users(cursor, page)
        found += users
        if cursor == 0:
            return found


async def test_activity_index_orders_users_by_last_event_and_is_bounded(store: Store) -> None:
    await store.put_features({"a": state_for("a"), "b": state_for("b")}, dirty_at_ms=100)
    await store.put_features({"c": state_for("c")}, dirty_at_ms=300)
    await store.put_features({"a": state_for("a", 4)}, dirty_at_ms=200)
    await store.put_features({"b": state_for("b", 5)})  # not an event batch: no activity
    users, _ = await store.active_users(0, max(10, shard_count(store)))
    assert users == ["c", "a", "b"]  # a page of one or more per shard: most recent first
    found = await all_active(store, page=1)
    assert sorted(found) == ["a", "b", "c"] and len(found) == 3


async def test_paging_the_activity_index_sees_every_user_once_most_recent_first_per_shard(
    store: Store,
) -> None:
    for i in range(120):
        await store.put_features({f"u{i}": state_for(f"u{i}", 1)}, dirty_at_ms=1000 + i)
    for page in (1, 7, 500):
        found = await all_active(store, page)
        assert sorted(found) == sorted(f"u{i}" for i in range(120)) and len(found) == 120
        layout = KeyLayout(shard_count(store))
        for shard in range(layout.shards):
            times = [int(u[1:]) for u in found if layout.shard(u) == shard]
            assert times == sorted(times, reverse=True)
    await store.trim_active(30)
    kept = await all_active(store)
    assert "u119" in kept and 30 <= len(kept) < 30 + shard_count(store)
    if shard_count(store) == 1:
        assert sorted(kept) == sorted(f"u{i}" for i in range(90, 120))


async def test_a_job_is_claimed_once_until_it_expires(store: Store) -> None:
    assert await store.claim_job("reembed:v2", ttl_ms=60_000)
    assert not await store.claim_job("reembed:v2", ttl_ms=60_000)
    assert await store.claim_job("reembed:v3", ttl_ms=60_000)


async def test_compare_and_set_writes_record_activity_too(store: Store) -> None:
    await store.put_features({"a": state_for("a", 1)}, 100, expected_versions={"a": 0})
    assert await all_active(store) == ["a"]


async def test_a_worker_batch_reads_both_records_and_writes_and_releases_in_one_step(
    store: Store,
) -> None:
    users = [f"u{i}" for i in range(30)]
    await store.put_features({u: state_for(u, 2) for u in users[:20]}, dirty_at_ms=BASE_TS)
    await store.put_embeddings({u: record(i) for i, u in enumerate(users[10:25])})
    states, (records,) = await store.get_features_and_embeddings(users)
    assert [s is not None for s in states] == [True] * 20 + [False] * 10
    assert [r is not None for r in records] == [False] * 10 + [True] * 15 + [False] * 5
    claimed = dict(await store.claim_dirty(100, token="w", now_ms=1, lease_ms=10**6))
    assert sorted(claimed) == sorted(users[:20])
    stolen, again = sorted(claimed)[:2]
    fresh = {u: record(100 + i) for i, u in enumerate(claimed)}
    # stolen: w's lease ended and another worker holds it now; again: dirtied once more
    # and claimed by w a second time (a newer claim of the same worker)
    await store.release_claim("w", [stolen, again], requeue={stolen: BASE_TS})
    await store.claim_dirty(1, token="other", now_ms=2, lease_ms=10**6)
    await store.mark_dirty({again: BASE_TS + 5})
    assert await store.claim_dirty(1, token="w", now_ms=3, lease_ms=10**6) == [(again, BASE_TS + 5)]
    await store.write_and_release("w", {DEFAULT_MODEL: fresh}, claimed)  # the first claims end
    stats = await store.dirty_stats()
    assert (stats.depth, stats.leased) == (0, 2)  # the other's lease and w's newer claim
    _, (written,) = await store.get_features_and_embeddings(list(claimed))
    # users whose first claim no longer holds keep what they had: w's result may be stale
    assert [r.computed_at_ms if r else None for r in written] == [
        None if u in (stolen, again) else fresh[u].computed_at_ms for u in claimed
    ]
    await store.write_and_release("w", {DEFAULT_MODEL: {again: record(7)}}, {again: BASE_TS + 5})
    assert (await store.dirty_stats()).leased == 1
    assert (await store.get_embeddings([again]))[0] is not None
    assert await store.get_features_and_embeddings([]) == ([], [[]])


def stamps(by_model: list[list[EmbeddingRecord | None]]) -> list[list[int | None]]:
    return [[r.computed_at_ms if r else None for r in records] for records in by_model]


async def test_each_model_has_its_own_record_of_a_user_read_in_one_call(store: Store) -> None:
    users = ["a", "b", "c"]
    await store.put_features({u: state_for(u, 2) for u in users}, dirty_at_ms=BASE_TS)
    await store.put_embeddings({"a": record(1), "b": record(2)})
    await store.put_embeddings({"b": record(3), "c": record(4)}, model="clicks")
    assert stamps(await store.get_model_embeddings(users, ["clicks", DEFAULT_MODEL, "none"])) == [
        [None, record(3).computed_at_ms, record(4).computed_at_ms],
        [record(1).computed_at_ms, record(2).computed_at_ms, None],
        [None, None, None],
    ]
    assert [r is not None for r in await store.get_embeddings(users, "clicks")] == [
        False,
        True,
        True,
    ]
    states, by_model = await store.get_features_and_embeddings(users, ["clicks", DEFAULT_MODEL])
    assert all(s is not None for s in states)
    assert stamps(by_model) == stamps(
        await store.get_model_embeddings(users, ["clicks", DEFAULT_MODEL])
    )
    claimed = dict(await store.claim_dirty(10, token="w", now_ms=1, lease_ms=10**6))
    await store.write_and_release(
        "w",
        {DEFAULT_MODEL: {"c": record(5)}, "clicks": {"a": record(6), "c": record(7)}},
        claimed,
    )
    assert (await store.dirty_stats()).leased == 0
    after = await store.get_model_embeddings(users, [DEFAULT_MODEL, "clicks"])
    assert stamps(after) == [
        [record(1).computed_at_ms, record(2).computed_at_ms, record(5).computed_at_ms],
        [record(6).computed_at_ms, record(3).computed_at_ms, record(7).computed_at_ms],
    ]
