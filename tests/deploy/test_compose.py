"""docker-compose.yml: valid against the Compose Specification, and the local stack
comes up in order (health checks, depends_on conditions), with pinned images."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# Vendored from https://github.com/compose-spec/compose-spec/blob/main/schema/compose-spec.json
# (commit 00655e2222608fa6eaecdf12ac5195889ca2244a), the schema `docker compose` itself
# validates against. Refresh it from there when Compose adds fields we want to use.
SCHEMA_FILE = Path(__file__).parent / "schemas" / "compose-spec.json"
ONE_SHOT = {"kafka-init", "model-init"}
LOAD_TOOLS = {"producer", "locust"}
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


def test_docker_compose_config_accepts_it() -> None:
    """Where the Compose CLI plugin is installed (it needs no engine for `config`)."""
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
            "--profile",
            "gpu",
            "--profile",
            "load",
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
    for name in ("api", "ingest", "worker", "kafka", "redis", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start by default"


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
    for role in ("api", "ingest", "worker", "worker-gpu"):
        assert services[role]["depends_on"]["redis"]["condition"] == "service_healthy"
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
    assert int(services["kafka-init"]["environment"]["PARTITIONS"]) >= 1
    assert services["kafka-init"]["environment"]["TOPIC"] == Settings().kafka_topic


def test_redis_persists_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = interpolate(compose)["services"]["redis"]
    args = redis["command"]
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "redis-server"
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
