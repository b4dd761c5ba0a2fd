"""The registry on an object store, against a real S3-protocol server on loopback (moto's
server mode): publish (files, read-back checks, CURRENT last), the mirror into a local
cache, a worker and the CLI on top of it."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models.registry import (
    CURRENT_FILE,
    MODEL_FILE,
    current_version,
    load_artifact,
    model_root,
    served_models,
)
from models.registry_remote import ObjectRegistry
from models.registry_sync import RegistryMirror
from models.standin import publish_standin
from service.api.cold_start import RegistryColdStart
from service.cli import main
from service.core.features import FeatureState
from service.core.model_names import DEFAULT_MODEL
from service.settings import Settings
from service.store.memory import MemoryStore
from service.worker.role import WorkerRole
from service.worker.serving_model import load_serving_model

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

HISTORY = 8
_buckets = itertools.count()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A local S3 endpoint (moto in server mode: real HTTP, the S3 REST protocol)."""
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in credentials}
    os.environ.update(credentials)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint}


@pytest.fixture
def url(options: dict[str, Any]) -> str:
    """A fresh bucket per test; the registry under a prefix of it."""
    bucket = f"models-{next(_buckets)}"
    ObjectRegistry(f"s3://{bucket}", options).fs.mkdir(bucket)
    return f"s3://{bucket}/registry"


@pytest.fixture
def remote(url: str, options: dict[str, Any]) -> ObjectRegistry:
    return ObjectRegistry(url, options)


def _build(tmp_path: Path, version: str, *, model: str = DEFAULT_MODEL, seed: int = 0) -> Any:
    """A stand-in version in a local build registry."""
    root = model_root(tmp_path / "build", model)
    return publish_standin(root, version=version, history_length=HISTORY, seed=seed, output_dim=8)


def _mirror(remote: ObjectRegistry, tmp_path: Path) -> RegistryMirror:
    return RegistryMirror(remote, tmp_path / "cache")


def test_a_pushed_version_is_mirrored_and_loads_in_a_worker(
    remote: ObjectRegistry, tmp_path: Path
) -> None:
    artifact = _build(tmp_path, "v1")
    where = remote.push(artifact)
    assert where == f"{remote.url}/v1"
    assert remote.served() == {DEFAULT_MODEL: "v1"}
    report = _mirror(remote, tmp_path).sync()
    cache = tmp_path / "cache"
    assert report.current == {DEFAULT_MODEL: "v1"} and report.installed == ["default/v1"]
    assert report.downloaded_bytes == (artifact.directory / MODEL_FILE).stat().st_size
    for name in ("model.onnx", "manifest.json"):  # byte for byte
        assert (cache / "v1" / name).read_bytes() == (artifact.directory / name).read_bytes()
    assert current_version(cache) == "v1"
    assert not [p for p in cache.iterdir() if p.name.startswith(".mirror-")]
    model = load_serving_model(cache)  # the worker's load: sha256, schema, graph, warm-up
    assert model.version == "v1"
    assert RegistryColdStart(cache).served() == (DEFAULT_MODEL,)


def test_a_new_remote_version_is_picked_up_and_the_cache_reused(
    remote: ObjectRegistry, tmp_path: Path
) -> None:
    remote.push(_build(tmp_path, "v1"))
    mirror = _mirror(remote, tmp_path)
    mirror.sync()
    remote.push(_build(tmp_path, "v2", seed=1))
    report = mirror.sync()
    assert report.current == {DEFAULT_MODEL: "v2"} and report.installed == ["default/v2"]
    assert current_version(tmp_path / "cache") == "v2"
    # nothing new: no download; a restarted process on the same cache: no download either
    assert mirror.sync().downloaded_bytes == 0
    again = _mirror(remote, tmp_path).sync()
    assert again.installed == [] and again.downloaded_bytes == 0
    # a rollback to a version already mirrored swaps CURRENT without a download
    remote.set_current(DEFAULT_MODEL, "v1")
    rollback = mirror.sync()
    assert rollback.current == {DEFAULT_MODEL: "v1"} and rollback.downloaded_bytes == 0
    assert current_version(tmp_path / "cache") == "v1"


def test_a_corrupted_remote_version_is_refused_and_the_old_one_keeps_serving(
    remote: ObjectRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote.push(_build(tmp_path, "v1"))
    mirror = _mirror(remote, tmp_path)
    mirror.sync()
    good = _build(tmp_path, "v2", seed=1)
    remote.push(good)
    data = bytearray((good.directory / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed
    remote.fs.pipe_file(f"{remote.url}/v2/{MODEL_FILE}", bytes(data))
    with caplog.at_level(logging.ERROR, logger="models.registry_sync"):
        report = mirror.sync()
    assert report.current == {} and "sha256" in report.refused[DEFAULT_MODEL]
    (line,) = [r.getMessage() for r in caplog.records if "registry_mirror_refused" in r.message]
    assert "version=v2" in line and "serving=v1" in line and "corrupted" in line
    cache = tmp_path / "cache"
    assert current_version(cache) == "v1" and not (cache / "v2").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".mirror-")]
    assert load_serving_model(cache).version == "v1"
    # refused once: not downloaded (nor logged) again while its objects stay the same
    caplog.clear()
    again = mirror.sync()
    assert again.downloaded_bytes == 0 and DEFAULT_MODEL in again.refused
    assert not [r for r in caplog.records if "registry_mirror_refused" in r.message]
    # repaired in place: taken
    remote.fs.put_file(str(good.directory / MODEL_FILE), f"{remote.url}/v2/{MODEL_FILE}")
    assert mirror.sync().current == {DEFAULT_MODEL: "v2"}
    assert current_version(cache) == "v2"


def test_current_is_written_last_and_a_version_without_it_is_not_served(
    remote: ObjectRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote.push(_build(tmp_path, "v1"))
    mirror = _mirror(remote, tmp_path)
    writes: list[str] = []
    put_file, put_bytes = remote._put_file, remote._put_bytes

    def record_file(local: Path, path: str) -> None:
        writes.append(path.rsplit("/", 1)[1])
        put_file(local, path)

    def record_bytes(path: str, data: bytes) -> None:
        writes.append(path.rsplit("/", 1)[1])
        put_bytes(path, data)

    monkeypatch.setattr(remote, "_put_file", record_file)
    monkeypatch.setattr(remote, "_put_bytes", record_bytes)
    remote.push(_build(tmp_path, "v2", seed=1))
    assert writes == [MODEL_FILE, "manifest.json", CURRENT_FILE]
    # a push that fails its read-back check never writes CURRENT
    remote.set_current(DEFAULT_MODEL, "v1")

    def bad_read_back(*args: object) -> None:
        raise RuntimeError("read-back mismatch")

    monkeypatch.setattr(remote, "_verify", bad_read_back)
    with pytest.raises(RuntimeError, match="read-back"):
        remote.push(_build(tmp_path, "v3", seed=2))
    assert remote.current_version() == "v1"
    # a half-written version (its objects but no CURRENT naming it) is never served
    remote.fs.pipe_file(f"{remote.url}/v4/{MODEL_FILE}", b"half")
    report = mirror.sync()
    assert report.current == {DEFAULT_MODEL: "v1"}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == ["v1"]


def test_a_version_pushed_again_must_be_the_same(remote: ObjectRegistry, tmp_path: Path) -> None:
    artifact = _build(tmp_path, "v1")
    remote.push(artifact)
    remote.push(artifact)  # a retried push: allowed
    other = publish_standin(tmp_path / "other", version="v1", history_length=HISTORY, seed=3)
    with pytest.raises(Exception, match="versions are immutable"):
        remote.push(other)


def test_named_models_are_mirrored_and_a_retired_one_is_retired_locally(
    remote: ObjectRegistry, tmp_path: Path
) -> None:
    remote.push(_build(tmp_path, "v1"))
    remote.push(_build(tmp_path, "likes-1", model="likes", seed=4), "likes")
    mirror = _mirror(remote, tmp_path)
    cache = tmp_path / "cache"
    report = mirror.sync()
    assert report.current == {DEFAULT_MODEL: "v1", "likes": "likes-1"}
    assert served_models(cache) == [DEFAULT_MODEL, "likes"]
    assert load_artifact(model_root(cache, "likes")).version == "likes-1"
    assert remote.retire("likes") == "likes-1"
    report = mirror.sync()
    assert report.retired == ["likes"] and served_models(cache) == [DEFAULT_MODEL]
    # an empty remote (every model retired, or a wrong prefix) retires nothing locally
    remote.retire(DEFAULT_MODEL)
    assert mirror.sync().retired == [] and served_models(cache) == [DEFAULT_MODEL]
    # published again: served again
    remote.set_current("likes", "likes-1")
    assert "likes" in mirror.sync().current and "likes" in served_models(cache)


def test_registry_push_brings_the_parent_an_aligned_version_maps_onto(
    remote: ObjectRegistry,
    options: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mirror fetches the alignment chain too: the served space is the one a
    directory registry gives."""
    monkeypatch.setenv("USEREMBED_REGISTRY_STORAGE_OPTIONS", json.dumps(options))
    build = tmp_path / "build"
    publish_standin(build, version="v1", history_length=HISTORY, output_dim=8)
    v2 = publish_standin(
        build,
        version="v2",
        history_length=HISTORY,
        output_dim=8,
        seed=1,
        parent_version="v1",
        alignment_states=[FeatureState.empty()] * 4,
    )
    assert v2.manifest.alignment is not None
    assert main_rc(["registry", "push", str(build / "v2"), remote.url]) == 0
    out = capsys.readouterr().out
    assert "pushed parent v1" in out and "pushed v2 of model default" in out
    assert remote.served() == {DEFAULT_MODEL: "v2"}
    cache = tmp_path / "cache"
    report = _mirror(remote, tmp_path).sync()
    assert report.current == {DEFAULT_MODEL: "v2"}
    assert sorted(report.installed) == ["default/v1", "default/v2"]
    assert load_serving_model(cache).space_version == "v1"


def main_rc(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


async def test_the_worker_follows_a_bucket(
    url: str, options: dict[str, Any], remote: ObjectRegistry, tmp_path: Path
) -> None:
    remote.push(_build(tmp_path, "v1"))
    settings = Settings(
        registry_url=url,
        registry_storage_options=options,
        registry_path=tmp_path / "cache",
        worker_model_poll_s=0.05,
        history_length=HISTORY,
    )
    role = WorkerRole(settings, MemoryStore())
    stop = asyncio.Event()
    task = asyncio.create_task(role.run(stop))
    try:
        for _ in range(400):
            if role.ready.is_set():
                break
            await asyncio.sleep(0.05)
        assert role.worker is not None and role.worker.models[DEFAULT_MODEL].version == "v1"
        await asyncio.to_thread(remote.push, _build(tmp_path, "v2", seed=1))
        for _ in range(400):
            if role.worker.models[DEFAULT_MODEL].version == "v2":
                break
            await asyncio.sleep(0.05)
        assert role.worker.models[DEFAULT_MODEL].version == "v2"
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def test_the_cli_publishes_retires_and_syncs_a_bucket(
    url: str, options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USEREMBED_REGISTRY_STORAGE_OPTIONS", json.dumps(options))
    monkeypatch.setenv("USEREMBED_HISTORY_LENGTH", str(HISTORY))
    monkeypatch.setenv("USEREMBED_REGISTRY_PATH", str(tmp_path / "cache"))
    remote = ObjectRegistry(url, options)
    assert main_rc(["init-registry", "--registry", url]) == 0
    seeded = remote.current_version()
    assert seeded is not None
    assert main_rc(["init-registry", "--registry", url]) == 0  # a no-op now
    args = ["publish-standin", "--registry", url, "--version", "s1", "--dim", "8"]
    assert main_rc([*args, "--model", "likes"]) == 0
    assert remote.served() == {DEFAULT_MODEL: seeded, "likes": "s1"}
    monkeypatch.setenv("USEREMBED_REGISTRY_URL", url)  # the default of --registry from now on
    assert main_rc(["registry", "sync"]) == 0
    assert served_models(tmp_path / "cache") == [DEFAULT_MODEL, "likes"]
    assert main_rc(["retire-model", "likes"]) == 0
    assert main_rc(["registry", "sync"]) == 0
    assert served_models(tmp_path / "cache") == [DEFAULT_MODEL]
    # a version directory of a named model is pushed as that model
    _build(tmp_path, "views-1", model="views")
    version_dir = tmp_path / "build" / "_models" / "views" / "views-1"
    assert main_rc(["registry", "push", str(version_dir)]) == 0
    assert remote.served() == {DEFAULT_MODEL: seeded, "views": "views-1"}


def test_train_publishes_to_a_bucket_aligned_onto_its_current(
    url: str, options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train --registry s3://...``: the parent comes from the bucket (the alignment is
    fitted onto it), the new version goes to the bucket."""
    pytest.importorskip("torch")
    from tests.unit.models.test_cli import TINY

    monkeypatch.setenv("USEREMBED_REGISTRY_STORAGE_OPTIONS", json.dumps(options))
    for version in ("sum-a", "sum-b"):
        assert main_rc(["train", *TINY, "--registry", url, "--version", version]) == 0
    remote = ObjectRegistry(url, options)
    assert remote.served() == {DEFAULT_MODEL: "sum-b"}
    report = _mirror(remote, tmp_path).sync()
    assert sorted(report.installed) == ["default/sum-a", "default/sum-b"]
    child = load_artifact(tmp_path / "cache")
    assert child.manifest.alignment is not None
    assert child.manifest.alignment.parent_version == "sum-a"


def test_the_api_follows_a_bucket(
    url: str, options: dict[str, Any], remote: ObjectRegistry, tmp_path: Path
) -> None:
    """``serve`` with a registry URL: mirrored before the first request, then followed."""
    import httpx

    from tests.processes import userembed, wait_for

    remote.push(_build(tmp_path, "v1"))
    port = _free_port()
    environment = {
        "USEREMBED_REDIS_URL": "memory://",
        "USEREMBED_REGISTRY_URL": url,
        "USEREMBED_REGISTRY_STORAGE_OPTIONS": json.dumps(options),
        "USEREMBED_REGISTRY_PATH": str(tmp_path / "cache"),
        "USEREMBED_WORKER_MODEL_POLL_S": "0.2",
        "USEREMBED_API_EVENTS_ENABLED": "false",
    }
    http = f"http://127.0.0.1:{port}"

    def listing() -> list[tuple[str, str]]:
        models = httpx.get(f"{http}/v1/models", timeout=10).json()["models"]
        return [(m["name"], m["version"]) for m in models]

    with userembed("serve", "--port", str(port), "--grpc-port", "0", env=environment) as api:
        wait_for(lambda: httpx.get(f"{http}/readyz").status_code == 200, 60, "serve ready")
        assert listing() == [(DEFAULT_MODEL, "v1")]
        remote.push(_build(tmp_path, "v2", seed=1))
        remote.push(_build(tmp_path, "likes-1", model="likes", seed=2), "likes")
        expected = [(DEFAULT_MODEL, "v2"), ("likes", "likes-1")]
        wait_for(lambda: listing() == expected, 30, f"{expected} served: {api.output()[-2000:]}")
        remote.retire("likes")
        wait_for(lambda: listing() == [(DEFAULT_MODEL, "v2")], 30, "likes retired")
    assert "event=registry_mirror_current" in api.output()
