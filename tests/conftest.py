"""Shared fixtures: a real redis-server (started here, or USEREMBED_TEST_REDIS_URL),
stores of both kinds, and a published stand-in model."""

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
from service.store.redis_server import private_redis


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


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Every contract test runs against both implementations."""
    if request.param == "memory":
        yield MemoryStore()
        return
    url = request.getfixturevalue("clean_redis")
    redis_store = RedisStore(url, timeout_ms=2000)
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
