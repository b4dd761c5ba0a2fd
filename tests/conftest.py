"""Shared fixtures: a real redis-server (started here, or USEREMBED_TEST_REDIS_URL), a
real Redis Cluster (3 primaries + 3 replicas started here), stores of every kind, and a
published stand-in model."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import settings as hypothesis_settings

from models.registry import ModelArtifact
from models.standin import publish_standin
from service.store.memory import MemoryStore
from service.store.protocol import Store
from service.store.redis import RedisStore
from service.store.redis_server import LocalCluster, private_redis, private_redis_cluster


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: USEREMBED_TEST_REDIS_URL if set, else a private redis-server.

    Without redis-server the Redis tests are skipped locally but fail in CI, where
    .ci/run installs it: a green CI run always includes them.
    """
    configured = os.environ.get("USEREMBED_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI (.ci/run installs it)")
        pytest.skip("redis-server not installed")
    with private_redis() as url:
        yield url


@pytest.fixture
def clean_redis(redis_url: str) -> str:
    """The Redis URL with its database emptied before the test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return redis_url


def _require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI (.ci/run installs it)")
        pytest.skip("redis-server not installed")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A real Redis Cluster on loopback: 3 primaries, 3 replicas (redis-cli --cluster
    create), shared by the session; tests that break it use :func:`own_cluster`."""
    _require_redis_server()
    with private_redis_cluster() as cluster:
        yield cluster


@pytest.fixture
def own_cluster() -> Iterator[LocalCluster]:
    """A Redis Cluster of the test's own, for tests that kill nodes or move slots."""
    _require_redis_server()
    with private_redis_cluster() as cluster:
        yield cluster


def flush_cluster(cluster: LocalCluster) -> None:
    for port in cluster.primaries():
        client = redis.Redis(port=port)
        client.flushall()
        client.close()


@pytest.fixture
def clean_cluster(redis_cluster: LocalCluster) -> str:
    """The cluster's URL with every primary emptied before the test."""
    redis_cluster.wait_healthy()
    flush_cluster(redis_cluster)
    return redis_cluster.url


# Few shards on the single node and more than primaries on the cluster, so that
# every test crosses shards (and, on the cluster, nodes).
STORE_SHARDS = {"redis": 4, "cluster": 16}


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Every contract test runs against every implementation and topology."""
    if request.param == "memory":
        yield MemoryStore()
        return
    fixture = "clean_redis" if request.param == "redis" else "clean_cluster"
    url = request.getfixturevalue(fixture)
    redis_store = RedisStore(url, timeout_ms=2000, shards=STORE_SHARDS[request.param])
    await redis_store.open()
    yield redis_store
    await redis_store.close()


@pytest.fixture(scope="session")
def standin_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def standin(standin_registry: Path) -> ModelArtifact:
    return publish_standin(standin_registry, history_length=20)


# Shared CI machines are noisy: judge properties, not per-example speed.
hypothesis_settings.register_profile("userembed", deadline=None)
hypothesis_settings.load_profile("userembed")
