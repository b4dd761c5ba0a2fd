"""The store on a real Redis Cluster: topology mistakes told in one sentence at start-up,
replicated writes, reads and claims that ride through slot migration."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.core.embeddings import StoredEmbedding
from service.core.features import FeatureState, apply_events
from service.store.protocol import StoreMisconfigured
from service.store.redis import RedisStore
from service.store.redis_server import LocalCluster
from tests.helpers import BASE_TS, event, log_of
from tests.integration.test_store_contract import record, state_for
from tests.processes import userembed

pytestmark = pytest.mark.redis


def slots_of(cluster: LocalCluster, port: int) -> int:
    """How many slots the node on ``port`` serves."""
    node = next(n for n in cluster.node_info(port) if n["port"] == str(port))
    ranges = [r.split("-") for r in node["slots"].split() if not r.startswith("[")]
    return sum(int(r[-1]) - int(r[0]) + 1 for r in ranges)


async def test_a_plain_url_at_a_cluster_node_is_refused_at_start_up(clean_cluster: str) -> None:
    cluster_port = clean_cluster.split("//")[1].split(",")[0]
    store = RedisStore(f"redis://{cluster_port}/0")
    with pytest.raises(
        StoreMisconfigured, match=r"is a node of a Redis Cluster.*redis\+cluster://"
    ):
        await store.open()
    await store.close()


async def test_a_cluster_url_at_a_plain_node_is_refused_at_start_up(clean_redis: str) -> None:
    host_port = clean_redis.split("//")[1].split("/")[0]
    store = RedisStore(f"redis+cluster://{host_port}")
    with pytest.raises(StoreMisconfigured, match=r"is not in cluster mode.*redis://"):
        await store.open()
    await store.close()


async def test_a_plain_client_at_a_cluster_node_says_so_instead_of_retry_shortly(
    clean_cluster: str,
) -> None:
    """Without the start-up check (a library user), MOVED/CROSSSLOT still get the sentence."""
    node = clean_cluster.split("//")[1].split(",")[0]
    store = RedisStore(f"redis://{node}/0", shards=16)
    users = [f"u{i}" for i in range(50)]  # some hash to other nodes
    with pytest.raises(StoreMisconfigured, match="is a node of a Redis Cluster"):
        await store.get_embeddings(users)
    with pytest.raises(StoreMisconfigured, match="is a node of a Redis Cluster"):
        for user in users:
            await store.get_embeddings([user])
    await store.close()


def test_the_roles_end_with_the_sentence_on_a_misconfigured_store(clean_cluster: str) -> None:
    node = clean_cluster.split("//")[1].split(",")[0]
    env = {"USEREMBED_REDIS_URL": f"redis://{node}/0", "USEREMBED_GRPC_PORT": "0"}
    for role in ("serve", "worker", "ingest"):
        with userembed(role, *(["--port", "0"] if role == "serve" else []), env=env) as process:
            assert process.wait(60) != 0
            output = process.output()
        assert "is a node of a Redis Cluster" in output and "Traceback" not in output, output


async def test_replicated_writes_wait_for_the_replicas_there_are(
    clean_cluster: str, clean_redis: str
) -> None:
    state = {"a": state_for("a"), "b": state_for("b")}
    durable = RedisStore(clean_cluster, shards=16, write_replicas=1)
    assert await durable.put_features(state, BASE_TS, expected_versions={"a": 0, "b": 0}) == []
    assert await durable.put_features(state, BASE_TS, expected_versions={"a": 0, "b": 0}) == [
        "a",
        "b",
    ]
    await durable.close()
    # a primary with no replica (a single node, or one just promoted): all of none acked
    lonely = RedisStore(clean_redis, timeout_ms=200, write_replicas=1)
    assert await lonely.put_features(state) == []
    assert (await lonely.get_features(["a"]))[0] is not None
    await lonely.close()


async def test_reads_writes_and_claims_ride_through_a_slot_migration(
    own_cluster: LocalCluster,
) -> None:
    """redis-cli --cluster reshard moves slots with their keys while we read and write:
    MOVED/ASK are followed by the client, so nothing fails and nothing is lost."""
    store = RedisStore(own_cluster.url, timeout_ms=2000, shards=64)
    await store.open()
    users = [f"u{i}" for i in range(2000)]
    states = {u: apply_events(FeatureState.empty(), log_of([event(u)]), 10)[0] for u in users}
    await store.put_features(states, dirty_at_ms=BASE_TS)
    await store.put_embeddings({u: record(i) for i, u in enumerate(users)})
    source, target = own_cluster.primaries()[:2]
    ids = {n["port"]: n["id"] for n in own_cluster.node_info(source)}
    before = slots_of(own_cluster, target)
    done = threading.Event()
    failure: list[BaseException] = []

    def reshard() -> None:
        try:
            own_cluster.cli(
                "--cluster", "reshard", f"127.0.0.1:{source}",
                "--cluster-from", ids[str(source)], "--cluster-to", ids[str(target)],
                "--cluster-slots", "3000", "--cluster-yes", "--cluster-pipeline", "10",
            )  # fmt: skip
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    mover = threading.Thread(target=reshard)
    mover.start()
    reads = claimed = 0
    seen: set[str] = set()
    while not done.is_set() or reads < 20:
        got = await store.get_embeddings(users[reads % 20 :: 20])
        assert all(r is not None for r in got)
        one = await store.get_embeddings([users[reads]])
        assert isinstance(one[0], StoredEmbedding)
        batch = await store.claim_dirty(50, token="w", now_ms=BASE_TS, lease_ms=10**9)
        seen.update(u for u, _ in batch)
        claimed += len(batch)
        reads += 1
        await asyncio.sleep(0)
    mover.join()
    assert not failure, failure
    rest = await store.claim_dirty(10_000, token="w", now_ms=BASE_TS, lease_ms=10**9)
    seen.update(u for u, _ in rest)
    assert seen == set(users) and claimed + len(rest) == len(users)  # each claimed once
    assert slots_of(own_cluster, target) == before + 3000  # the slots did move
    await store.close()
