"""docker-compose.yml: valid against the Compose Specification, and the local stack
comes up in order (health checks, depends_on conditions), with pinned images; the
cluster profile's Redis Cluster forms (its init script run against real redis-servers)."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.settings import Settings
from service.store.address import RedisAddress

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# Vendored from https://github.com/compose-spec/compose-spec/blob/main/schema/compose-spec.json
# (commit 00655e2222608fa6eaecdf12ac5195889ca2244a), the schema `docker compose` itself
# validates against. Refresh it from there when Compose adds fields we want to use.
SCHEMA_FILE = Path(__file__).parent / "schemas" / "compose-spec.json"
ONE_SHOT = {"kafka-init", "model-init", "redis-cluster-init"}
LOAD_TOOLS = {"producer", "locust"}
CLUSTER_NODES = [f"redis-node-{n}" for n in range(1, 7)]
CLUSTER_SERVICES = {*CLUSTER_NODES, "redis-cluster-init"}
PROFILES = ("cluster", "gpu", "load")
ROLES = ("api", "ingest", "worker", "worker-gpu")
# The one command that runs the stack on the cluster (compose header, deploy/README.md).
CLUSTER_COMMAND = re.compile(
    r"USEREMBED_REDIS_URL=(?P<url>\S+) USEREMBED_REDIS_WRITE_REPLICAS=1 "
    r"docker compose --profile cluster up(?: -d)?"
)
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def interpolate(value: Any) -> Any:
    """Compose's variable substitution with every variable unset (defaults apply)."""
    if isinstance(value, str):
        replaced = _VAR.sub(lambda m: m["default"] or "", value.replace("$$", "\0"))
        return replaced.replace("\0", "$")
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    for label, document in (("as written", compose), ("interpolated", interpolate(compose))):
        errors = sorted(validator.iter_errors(document), key=str)
        assert not errors, f"{label}: {errors[0].message} at {list(errors[0].absolute_path)}"


@pytest.mark.parametrize(
    "profiles", [(), ("cluster",), PROFILES], ids=["default", "cluster", "all"]
)
def test_docker_compose_config_accepts_it(profiles: tuple[str, ...]) -> None:
    """Where the Compose CLI plugin is installed (it needs no engine for `config`): with
    no profile the roles' optional dependency on redis-cluster-init must be ignored."""
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("docker compose is not installed here; the JSON-schema check stands")
    result = subprocess.run(
        [
            docker,
            "compose",
            "-f",
            str(COMPOSE_FILE),
            *(arg for profile in profiles for arg in ("--profile", profile)),
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_the_stack_has_every_part(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "kafka",
        "kafka-init",
        "redis",
        *CLUSTER_SERVICES,
        "model-init",
        "api",
        "ingest",
        "worker",
        "worker-gpu",
        "producer",
        "locust",
        "prometheus",
        "grafana",
    }
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert services["producer"]["profiles"] == ["load"]
    assert services["locust"]["profiles"] == ["load"]
    for name in CLUSTER_SERVICES:
        assert services[name]["profiles"] == ["cluster"], f"{name} belongs to the cluster profile"
    for name in ("api", "ingest", "worker", "kafka", "redis", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start by default"


def _enabled(services: dict[str, Any], profiles: tuple[str, ...]) -> set[str]:
    """Compose's rule: a service without profiles always runs, others with one of theirs."""
    return {
        name
        for name, service in services.items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


@pytest.mark.parametrize(
    "profiles",
    [combo for n in range(len(PROFILES) + 1) for combo in itertools.combinations(PROFILES, n)],
    ids=lambda combo: "+".join(combo) or "default",
)
def test_every_profile_set_is_a_consistent_project(
    compose: dict[str, Any], profiles: tuple[str, ...]
) -> None:
    """What `docker compose config` checks per profile set, offline: a dependency on a
    service the active profiles leave out must be `required: false` (Compose refuses the
    project otherwise), and volumes used are declared."""
    services = compose["services"]
    enabled = _enabled(services, profiles)
    assert ("cluster" in profiles) == bool(enabled & CLUSTER_SERVICES)
    for name in enabled:
        for dependency, spec in services[name].get("depends_on", {}).items():
            if dependency not in enabled:
                assert spec.get("required") is False, (
                    f"{name} -> {dependency}: disabled without {services[dependency]['profiles']}"
                    " yet required"
                )
        for volume in services[name].get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith(("./", "/")):
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in interpolate(compose)["services"].items():
        image = service["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"{name}: pin {image}"


def test_roles_run_the_one_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    commands = {
        "api": ["serve"],
        "ingest": ["ingest"],
        "worker": ["worker"],
        "worker-gpu": ["worker"],
        "model-init": ["init-registry", "--from", "/opt/userembed/models"],
    }
    for name, command in commands.items():
        service = services[name]
        assert service["command"] == command, name
        assert service["build"]["target"] == ("gpu" if name == "worker-gpu" else "cpu")
        assert service["build"]["dockerfile"] == "Dockerfile"
    assert services["producer"]["command"][0] == "produce"


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        check = service.get("healthcheck", {})
        if name in ONE_SHOT:
            assert service["restart"] == "no", f"{name} is a one-shot job"
            continue
        if name in LOAD_TOOLS:
            continue
        assert check.get("test") and not check.get("disable"), f"{name} needs a health check"
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert services[dependency].get("healthcheck", {}).get("test"), dependency
            elif condition == "service_completed_successfully":
                assert dependency in ONE_SHOT, f"{dependency} is not a one-shot job"
            else:
                pytest.fail(f"{name} -> {dependency}: use a health or completion condition")
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for role in ("api", "ingest"):
        assert services[role]["depends_on"]["kafka-init"]["condition"].startswith("service_comp")
    for role in ROLES:
        assert services[role]["depends_on"]["redis"]["condition"] == "service_healthy"
        # The cluster profile's store is formed before any role starts; without the
        # profile the dependency is ignored (required: false).
        cluster = services[role]["depends_on"]["redis-cluster-init"]
        assert cluster == {"condition": "service_completed_successfully", "required": False}
    for node in CLUSTER_NODES:
        init = services["redis-cluster-init"]["depends_on"][node]
        assert init["condition"] == "service_healthy", node
    for role in ("api", "worker", "worker-gpu"):
        assert services[role]["depends_on"]["model-init"]["condition"].startswith("service_comp")
    assert services["locust"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_kafka_is_apache_kraft_with_explicit_topics(compose: dict[str, Any]) -> None:
    services = interpolate(compose)["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in key for key in env)
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    script = services["kafka-init"]["command"][0]
    assert '--topic "$TOPIC"' in script and '--topic "$TOPIC.dlq"' in script
    assert '--partitions "$PARTITIONS"' in script
    # USEREMBED_PARTITIONS by default: the 48 shards of USEREMBED_REDIS_SHARDS are 8 per partition
    assert services["kafka-init"]["environment"]["PARTITIONS"] == "6"
    assert services["kafka-init"]["environment"]["TOPIC"] == Settings().kafka_topic


def _redis_options(service: dict[str, Any]) -> dict[str, str]:
    args = service["command"]
    assert args[0] == "redis-server"
    return dict(zip(args[1::2], args[2::2], strict=True))


@pytest.mark.parametrize("name", ["redis", *CLUSTER_NODES])
def test_redis_persists_and_never_evicts(compose: dict[str, Any], name: str) -> None:
    redis = interpolate(compose)["services"][name]
    options = _redis_options(redis)
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--maxmemory"]
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_gpu_worker_reserves_an_nvidia_device(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker-gpu"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == 1
    assert worker["image"].startswith("userembed-gpu:")


def test_environment_names_are_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in compose["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("USEREMBED_"):
                field = key.removeprefix("USEREMBED_").lower()
                assert field in Settings.model_fields, f"{name}: {key} is not a setting"
    for key, value in interpolate(compose)["services"]["api"]["environment"].items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # parsed as the container will parse it
    assert settings.api_host == "0.0.0.0" and settings.redis_url.startswith("redis://redis:")
    partitions = int(interpolate(compose)["services"]["kafka-init"]["environment"]["PARTITIONS"])
    assert settings.redis_shards % partitions == 0, "shards must be a multiple of the partitions"


# --- cluster profile ----------------------------------------------------------------------


def test_cluster_nodes_run_in_cluster_mode(compose: dict[str, Any]) -> None:
    services = interpolate(compose)["services"]
    volumes = set()
    for name in CLUSTER_NODES:
        node = services[name]
        options = _redis_options(node)
        assert node["image"] == services["redis"]["image"], name
        assert options["--cluster-enabled"] == "yes"
        assert options["--cluster-config-file"] == "nodes.conf"
        assert options["--cluster-node-timeout"] == "5000"
        # Redirects name the service, which every container of the network resolves.
        assert options["--cluster-announce-hostname"] == name
        assert options["--cluster-preferred-endpoint-type"] == "hostname"
        assert "ports" not in node, f"{name}: the host cannot follow redirects to it"
        (volume,) = node["volumes"]
        assert volume.endswith(":/data"), name  # nodes.conf and the AOF persist together
        volumes.add(volume.split(":", 1)[0])
    assert len(volumes) == len(CLUSTER_NODES), "one volume per node"


def test_cluster_init_joins_all_six_nodes_once(compose: dict[str, Any]) -> None:
    init = interpolate(compose)["services"]["redis-cluster-init"]
    assert init["image"] == interpolate(compose)["services"]["redis"]["image"]
    assert init["entrypoint"] == ["/bin/sh", "-c"]
    nodes = init["environment"]["REDIS_NODES"].split()
    assert nodes == [f"{name}:6379" for name in CLUSTER_NODES]
    (script,) = init["command"]
    assert "redis-cli --cluster create $REDIS_NODES --cluster-replicas 1 --cluster-yes" in script
    # Idempotent: an already formed cluster is detected before anything is created.
    assert script.index("cluster_state") < script.index("--cluster create")


def _cluster_url_in(text: str) -> str:
    match = CLUSTER_COMMAND.search(text)
    assert match, "the cluster profile's command (USEREMBED_REDIS_URL=... --profile cluster up)"
    return match["url"]


def test_the_documented_cluster_command_names_the_nodes(compose: dict[str, Any]) -> None:
    url = _cluster_url_in(COMPOSE_FILE.read_text())
    assert url == _cluster_url_in((ROOT / "deploy" / "README.md").read_text())
    address = RedisAddress.parse(url)
    assert address.cluster and not address.tls
    assert len(address.nodes) >= 2, "seed from several nodes"
    for host, port in address.nodes:
        assert host in CLUSTER_NODES and port == 6379
    # The roles take the URL from the environment `docker compose` runs in, the single
    # `redis` when it is unset.
    for role in ROLES:
        env = compose["services"][role]["environment"]
        assert env["USEREMBED_REDIS_URL"] == "${USEREMBED_REDIS_URL:-redis://redis:6379/0}"
    assert Settings(redis_url=url).redis_url == url


# Real redis-servers with the compose nodes' own arguments, joined by the init script.
CLUSTER_BINARIES = ("redis-server", "redis-cli")


def _free_port_pair() -> int:
    """A port P with P and its cluster bus port P + 10000 both free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def _redis_major() -> int:
    out = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"v=(\d+)\.", out)
    return int(match[1]) if match else 0


@pytest.fixture
def local_cluster_nodes(compose: dict[str, Any], tmp_path: Path) -> Iterator[list[tuple[str, int]]]:
    """Six redis-servers, each with its compose service's command on a free loopback
    port, not yet joined; stopped by PID afterwards."""
    if any(shutil.which(binary) is None for binary in CLUSTER_BINARIES):
        pytest.skip("redis-server/redis-cli are not installed here")
    if _redis_major() < 7:
        pytest.skip("cluster-announce-hostname needs Redis 7")
    services = interpolate(compose)["services"]
    processes: list[subprocess.Popen[bytes]] = []
    nodes = []
    try:
        for name in CLUSTER_NODES:
            port = _free_port_pair()
            data = tmp_path / name
            data.mkdir()
            args = [*services[name]["command"], "--port", str(port), "--bind", "127.0.0.1"]
            args += ["--dir", str(data), "--maxmemory", "64mb", "--protected-mode", "no"]
            with (data / "redis.log").open("wb") as log:
                processes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
            nodes.append((name, port))
        deadline = time.monotonic() + 15
        for _, port in nodes:
            while _cli(port, "ping").stdout.strip() != "PONG":
                assert time.monotonic() < deadline, f"redis-server on {port} did not start"
                time.sleep(0.05)
        yield nodes
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait(timeout=10)


def _cli(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )


def _run_init(compose: dict[str, Any], nodes: list[tuple[str, int]]) -> str:
    init = interpolate(compose)["services"]["redis-cluster-init"]
    (script,) = init["command"]
    env = {**os.environ, "REDIS_NODES": " ".join(f"127.0.0.1:{port}" for _, port in nodes)}
    result = subprocess.run(
        ["/bin/sh", "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_cluster_init_forms_the_cluster_and_is_idempotent(
    compose: dict[str, Any], local_cluster_nodes: list[tuple[str, int]]
) -> None:
    nodes = local_cluster_nodes
    created = _run_init(compose, nodes)
    assert "All 16384 slots covered" in created
    info = dict(
        line.split(":", 1)
        for line in _cli(nodes[0][1], "cluster", "info").stdout.splitlines()
        if ":" in line
    )
    assert info["cluster_state"] == "ok" and info["cluster_size"] == "3"
    assert info["cluster_known_nodes"] == "6"
    # Every node's view converges on 3 primaries with a replica each (gossip may lag the
    # create by a moment).
    deadline = time.monotonic() + 15
    while True:
        table = _cli(nodes[0][1], "cluster", "nodes").stdout.splitlines()
        flags = sorted(line.split()[2].replace("myself,", "") for line in table)
        if flags == ["master"] * 3 + ["slave"] * 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert flags == ["master"] * 3 + ["slave"] * 3, table
    # A second start (containers restarted, volumes kept) changes nothing.
    again = _run_init(compose, nodes)
    assert "already formed" in again and "--cluster create" not in again
    # A client is redirected to a node by its announced service name, which containers
    # on the compose network resolve.
    names = {port: name for name, port in nodes}
    for key in (f"probe-{i}" for i in range(20)):
        reply = _cli(nodes[0][1], "get", key).stdout.strip()
        if reply.startswith("MOVED"):
            _, _slot, target = reply.split()
            host, port = target.rsplit(":", 1)
            assert host == names[int(port)], reply
            break
    else:
        pytest.fail("node 1 answered 20 keys itself: it should own a third of the slots")


def test_roles_are_locked_down(compose: dict[str, Any]) -> None:
    for name in ("api", "ingest", "worker", "worker-gpu", "model-init"):
        service = compose["services"][name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


def test_published_ports_are_local_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: bind {port} to localhost"


def test_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith("./"):
                continue
            path = ROOT / source
            if source == "./loadtests" and not path.exists():
                pytest.skip("loadtests/ (Locust scenarios) is not in this checkout yet")
            assert path.exists(), f"{name}: {source} does not exist"
    assert "/mnt/loadtests/locustfile.py" in compose["services"]["locust"]["command"]


def test_prometheus_scrapes_every_role(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    env = interpolate(compose)["services"]["api"]["environment"]
    expected = {
        "api": ({"api"}, int(env["USEREMBED_API_PORT"])),
        "ingest": ({"ingest"}, int(env["USEREMBED_METRICS_PORT"])),
        "worker": ({"worker", "worker-gpu"}, int(env["USEREMBED_METRICS_PORT"])),
    }
    for job, (names, port) in expected.items():
        (sd,) = jobs[job]["dns_sd_configs"]
        assert set(sd["names"]) == names and sd["port"] == port
        assert set(sd["names"]) <= set(compose["services"])
    mounted = {v.split(":")[1] for v in compose["services"]["prometheus"]["volumes"]}
    assert set(config["rule_files"]) <= mounted
