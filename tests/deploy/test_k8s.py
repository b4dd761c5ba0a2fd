"""Kubernetes manifests: rendered (tests/deploy/kustomize.py), validated against the
Kubernetes OpenAPI schemas (kubernetes-validate, offline) and against our own policy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.settings import Settings
from service.store.address import RedisAddress
from tests.deploy.crd_schemas import validate_custom_resource
from tests.deploy.kustomize import Obj, pod_spec, render, split_image

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TARGETS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
NAMESPACES = {"dev": "userembed-dev", "prod": "userembed"}
# The oldest Kubernetes minor we support and the newest schema the package ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CUSTOM_GROUPS = {"monitoring.coreos.com", "kafka.strimzi.io"}
# Containers that cannot run with a read-only root filesystem, and why.
WRITABLE_ROOT = {
    ("StatefulSet", "userembed-kafka", "kafka"): "apache/kafka renders its config at start-up",
}
SECRET_NAME = "userembed-secrets"
ROLES = ("api", "ingest", "worker")
# Redis Cluster hashes keys to this many slots; a shard is one hash tag, so one slot.
REDIS_SLOTS = 16384


@pytest.fixture(scope="module", params=sorted(TARGETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, render(TARGETS[request.param])


def _find(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _containers(obj: Obj) -> list[Obj]:
    spec = pod_spec(obj)
    return [] if spec is None else list(spec.get("containers", []) + spec.get("initContainers", []))


def _workloads(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if pod_spec(o) is not None]


# --- schema ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_matches_the_kubernetes_schema(
    rendered: tuple[str, list[Obj]], version: str
) -> None:
    target, objects = rendered
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        label = f"{target}: {obj['kind']}/{obj['metadata']['name']}"
        if group in CUSTOM_GROUPS:
            validate_custom_resource(obj, label)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{label} is invalid for Kubernetes {version}: {exc.message}")


def test_the_secret_template_is_valid_and_holds_no_secret() -> None:
    (secret,) = yaml.safe_load_all((K8S / "secret.example.yaml").read_text())
    kubernetes_validate.validate(secret, K8S_VERSIONS[-1], strict=True)
    assert secret["metadata"]["name"] == SECRET_NAME
    for key, value in secret["stringData"].items():
        assert "REPLACE_ME" in value, f"{key}: the template must hold placeholders only"
        assert key.removeprefix("USEREMBED_").lower() in Settings.model_fields, key
    # The prod overlay's store: a managed Redis Cluster over TLS with a token, no db number.
    url = secret["stringData"]["USEREMBED_REDIS_URL"]
    address = RedisAddress.parse(url)
    assert address.cluster and address.tls, f"{url}: use rediss+cluster://"
    assert address.password == "REPLACE_ME" and address.nodes
    assert "/" not in url.split("://", 1)[1], "a cluster has only database 0"
    assert Settings(redis_url=url).redis_url == url


def test_object_names_are_unique(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys))


def test_overlays_put_everything_in_their_namespace(rendered: tuple[str, list[Obj]]) -> None:
    target, objects = rendered
    if target not in NAMESPACES:
        pytest.skip("the base leaves the namespace to the overlays")
    namespace = NAMESPACES[target]
    assert _find(objects, "Namespace", namespace)["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"
    ] == ("restricted")
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]


def test_no_secret_objects_are_rendered(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    assert not [o for o in objects if o["kind"] == "Secret"], "secrets are created out of band"


# --- policy: every container -------------------------------------------------------------


def test_images_are_pinned(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    for obj in _workloads(objects):
        for container in _containers(obj):
            _, tag = split_image(container["image"])
            assert tag and tag != "latest", f"{container['image']}: pin a tag, never latest"
            assert container.get("imagePullPolicy") == "IfNotPresent"


def test_every_container_has_requests_and_limits(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    for obj in _workloads(objects):
        for container in _containers(obj):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(kind, {}), (
                        f"{obj['metadata']['name']}/{container['name']}: no {kind}.{resource}"
                    )


def test_long_running_containers_have_probes(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    for obj in _workloads(objects):
        if obj["kind"] not in {"Deployment", "StatefulSet", "DaemonSet"}:
            continue
        for container in _containers(obj):
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in container, f"{obj['metadata']['name']}/{container['name']}: {probe}"


def test_containers_run_restricted(rendered: tuple[str, list[Obj]]) -> None:
    """Pod Security 'restricted', plus a read-only root filesystem where possible."""
    _, objects = rendered
    for obj in _workloads(objects):
        spec = pod_spec(obj)
        assert spec is not None
        name = obj["metadata"]["name"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        # Service links inject <SERVICE>_PORT=tcp://... variables, e.g. USEREMBED_API_PORT.
        assert spec.get("enableServiceLinks") is False, name
        for container in _containers(obj):
            sc = container.get("securityContext", {})
            label = f"{name}/{container['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, label
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, label
            assert sc.get("allowPrivilegeEscalation") is False, label
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], label
            assert not sc.get("privileged", False), label
            writable = (obj["kind"], name, container["name"]) in WRITABLE_ROOT
            assert sc.get("readOnlyRootFilesystem") is (not writable), label


# --- the roles -----------------------------------------------------------------------------


def _container(objects: list[Obj], deployment: str) -> Obj:
    (container,) = _containers(_find(objects, "Deployment", deployment))
    return container


def test_roles_run_the_one_image_with_their_command(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    for role, command in (("api", "serve"), ("ingest", "ingest"), ("worker", "worker")):
        container = _container(objects, f"userembed-{role}")
        assert container["args"] == [command]
        assert split_image(container["image"])[0].rsplit("/", 1)[-1] in {
            "userembed",
            "userembed-gpu",
        }
        refs = container["envFrom"]
        assert refs[0] == {"configMapRef": {"name": "userembed-config"}}
        assert refs[1]["secretRef"]["name"] == SECRET_NAME


def test_the_secret_is_optional_except_in_prod(rendered: tuple[str, list[Obj]]) -> None:
    target, objects = rendered
    for role in ("api", "ingest", "worker"):
        optional = _container(objects, f"userembed-{role}")["envFrom"][1]["secretRef"]["optional"]
        assert optional is (target != "prod"), role


def test_api_probes_services_and_autoscaling(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    container = _container(objects, "userembed-api")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 50051}
    service = _find(objects, "Service", "userembed-api")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    hpa = _find(objects, "HorizontalPodAutoscaler", "userembed-api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "userembed-api",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_ingest_and_worker_probe_their_ops_port(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    config = _find(objects, "ConfigMap", "userembed-config")["data"]
    for role in ("ingest", "worker"):
        container = _container(objects, f"userembed-{role}")
        (port,) = container["ports"]
        assert port == {"name": "metrics", "containerPort": 9400, "protocol": "TCP"}
        assert str(port["containerPort"]) == config["USEREMBED_METRICS_PORT"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_worker_gets_a_gpu_except_in_dev(rendered: tuple[str, list[Obj]]) -> None:
    target, objects = rendered
    worker = _find(objects, "Deployment", "userembed-worker")
    spec = worker["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    if target == "dev":
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert "nodeSelector" not in spec and "tolerations" not in spec
        assert split_image(container["image"])[0] == "userembed"
        return
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["nodeSelector"]
    assert split_image(container["image"])[0].endswith("userembed-gpu")


def _topic_partitions(target: str, objects: list[Obj]) -> int | None:
    if target == "prod":
        return int(_find(objects, "KafkaTopic", "user-events")["spec"]["partitions"])
    if target == "dev":
        (container,) = _containers(_find(objects, "Job", "userembed-kafka-topics"))
        env = {e["name"]: e["value"] for e in container["env"]}
        return int(env["PARTITIONS"])
    return None


def test_ingest_replicas_do_not_exceed_partitions(rendered: tuple[str, list[Obj]]) -> None:
    target, objects = rendered
    partitions = _topic_partitions(target, objects)
    if partitions is None:
        pytest.skip("the base defines no topic")
    replicas = _find(objects, "Deployment", "userembed-ingest")["spec"]["replicas"]
    assert 1 <= replicas <= partitions, f"{replicas} ingest replicas for {partitions} partitions"


def test_every_role_has_a_disruption_budget(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for role in ("api", "ingest", "worker"):
        labels = _find(objects, "Deployment", f"userembed-{role}")["spec"]["template"]["metadata"][
            "labels"
        ]
        assert any(_selects(b["spec"]["selector"], labels) for b in budgets), role


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        value = labels.get(expr["key"])
        ok = {
            "In": present and value in expr.get("values", []),
            "NotIn": not present or value not in expr.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[expr["operator"]]
        if not ok:
            return False
    return True


# --- references between objects --------------------------------------------------------------


def test_selectors_match_pods(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    pods = [o["spec"]["template"]["metadata"]["labels"] for o in _workloads(objects)]
    for obj in objects:
        if obj["kind"] == "Service":
            selector = {"matchLabels": obj["spec"]["selector"]}
        elif obj["kind"] in {"PodDisruptionBudget", "Deployment", "StatefulSet"}:
            selector = obj["spec"]["selector"]
        elif obj["kind"] == "NetworkPolicy":
            selector = obj["spec"]["podSelector"]
        else:
            continue
        assert any(_selects(selector, labels) for labels in pods), obj["metadata"]["name"]
    for obj in _workloads(objects):
        if "selector" in obj["spec"]:
            assert _selects(obj["spec"]["selector"], obj["spec"]["template"]["metadata"]["labels"])


def test_service_ports_name_container_ports(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    for service in (o for o in objects if o["kind"] == "Service"):
        selected = [
            o
            for o in _workloads(objects)
            if _selects(
                {"matchLabels": service["spec"]["selector"]},
                o["spec"]["template"]["metadata"]["labels"],
            )
        ]
        names = {
            p.get("name") for w in selected for c in _containers(w) for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, f"{service['metadata']['name']}: {port}"


def test_referenced_config_and_volumes_exist(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for obj in _workloads(objects):
        spec = pod_spec(obj)
        assert spec is not None
        for container in _containers(obj):
            for ref in container.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ("ConfigMap", ref["configMapRef"]["name"]) in names
                else:
                    assert ref["secretRef"]["name"] == SECRET_NAME
            for var in container.get("env", []):
                source = var.get("valueFrom", {})
                if "secretKeyRef" in source:
                    assert source["secretKeyRef"]["name"] == SECRET_NAME, var["name"]
                elif "configMapKeyRef" in source:
                    assert ("ConfigMap", source["configMapKeyRef"]["name"]) in names
            volumes = {v["name"] for v in spec.get("volumes", [])}
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{obj['metadata']['name']}: {mount}"
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names, claim
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names


def test_config_keys_are_settings(
    rendered: tuple[str, list[Obj]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt USEREMBED_* variable would be ignored silently (extra="ignore")."""
    _, objects = rendered
    config = _find(objects, "ConfigMap", "userembed-config")["data"]
    for key in config:
        assert key.startswith("USEREMBED_")
        assert key.removeprefix("USEREMBED_").lower() in Settings.model_fields, key
    assert config["USEREMBED_API_HOST"] == "0.0.0.0"
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # parsed as the pods will parse it
    assert settings.kafka_topic == "user-events"
    assert settings.redis_shards == int(config["USEREMBED_REDIS_SHARDS"])


def test_the_registry_path_is_mounted_or_baked(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    config = _find(objects, "ConfigMap", "userembed-config")["data"]
    path = config["USEREMBED_REGISTRY_PATH"]
    if path == "/opt/userembed/models":
        return  # baked into the image (Dockerfile, MODEL_REGISTRY)
    if "USEREMBED_REGISTRY_URL" in config:
        return  # mirrored from a bucket: test_prod_mirrors_the_registry_from_a_bucket
    for role in ("api", "worker"):
        mounts = _container(objects, f"userembed-{role}")["volumeMounts"]
        assert {"name": "registry", "mountPath": path, "readOnly": True} in mounts, role
    job = _find(objects, "Job", "userembed-model-init")
    (container,) = _containers(job)
    assert container["args"][0] == "init-registry"
    assert any(m["mountPath"] == path for m in container["volumeMounts"])


def test_prod_mirrors_the_registry_from_a_bucket() -> None:
    """Prod reads models from a bucket: each API and worker pod mirrors it into a writable
    emptyDir cache at registry_path (no shared volume), and a Job seeds the bucket."""
    objects = render(TARGETS["prod"])
    config = _find(objects, "ConfigMap", "userembed-config")["data"]
    url, path = config["USEREMBED_REGISTRY_URL"], config["USEREMBED_REGISTRY_PATH"]
    assert url.startswith(("s3://", "gs://")), url
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    for role in ("api", "worker"):
        deployment = _find(objects, "Deployment", f"userembed-{role}")
        (mount,) = [
            m
            for m in _container(objects, f"userembed-{role}")["volumeMounts"]
            if m["mountPath"] == path
        ]
        assert not mount.get("readOnly"), f"{role}: the cache is written by the mirror"
        spec = pod_spec(deployment)
        assert spec is not None
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert "emptyDir" in volume, f"{role}: a cache of its own, not a shared volume"
    (container,) = _containers(_find(objects, "Job", "userembed-model-init"))
    assert container["args"][0] == "init-registry"
    assert {"configMapRef": {"name": "userembed-config"}} in container["envFrom"]
    egress = {
        p["port"]
        for o in objects
        if o["kind"] == "NetworkPolicy"
        for rule in o["spec"].get("egress", [])
        for p in rule.get("ports", [])
    }
    assert 443 in egress, "the pods reach the object store over HTTPS"


def test_network_policies_admit_the_traffic_the_roles_need(
    rendered: tuple[str, list[Obj]],
) -> None:
    _, objects = rendered
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    egress_ports = {
        p["port"]
        for o in policies
        for rule in o["spec"].get("egress", [])
        for p in rule.get("ports", [])
    }
    assert {53, 6379, 9092} <= egress_ports
    api_in = _find(objects, "NetworkPolicy", "userembed-api-ingress")
    assert {p["port"] for p in api_in["spec"]["ingress"][0]["ports"]} == {8000, 50051}


# --- the store: single Redis in dev, a managed Redis Cluster in prod ---------------------------


def _redis_url_sources(objects: list[Obj], role: str) -> list[Obj]:
    env = _container(objects, f"userembed-{role}").get("env", [])
    return [var for var in env if var["name"] == "USEREMBED_REDIS_URL"]


def test_redis_shards_are_a_multiple_of_the_partitions(rendered: tuple[str, list[Obj]]) -> None:
    """Every user key carries a shard hash tag; a multiple of the partitions lets one
    ingest member's partition map onto whole shards (and so few slots)."""
    target, objects = rendered
    config = _find(objects, "ConfigMap", "userembed-config")["data"]
    shards = int(config["USEREMBED_REDIS_SHARDS"])
    assert 1 <= shards <= REDIS_SLOTS
    partitions = _topic_partitions(target, objects)
    if partitions is None:
        pytest.skip("the base defines no topic")
    assert shards % partitions == 0, f"{shards} shards for {partitions} partitions"
    assert shards >= partitions


def test_dev_keeps_its_single_redis() -> None:
    objects = render(TARGETS["dev"])
    config = _find(objects, "ConfigMap", "userembed-config")["data"]
    address = RedisAddress.parse(config["USEREMBED_REDIS_URL"])
    assert not address.cluster
    assert config["USEREMBED_REDIS_URL"] == "redis://userembed-redis:6379/0"
    _find(objects, "Service", "userembed-redis")
    for role in ROLES:
        assert not _redis_url_sources(objects, role), role


def test_prod_reads_the_redis_cluster_url_from_the_secret() -> None:
    objects = render(TARGETS["prod"])
    config = _find(objects, "ConfigMap", "userembed-config")["data"]
    assert "USEREMBED_REDIS_URL" not in config
    for role in ROLES:
        (var,) = _redis_url_sources(objects, role)
        # Required (no `optional`): a Secret without the key keeps the pod from starting
        # instead of the role falling back to the default in-memory store.
        assert var == {
            "name": "USEREMBED_REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": "USEREMBED_REDIS_URL"}},
        }, role
    # No Redis address or password is written into any rendered object.
    text = yaml.safe_dump_all(objects)
    assert not re.search(r"rediss?(\+cluster)?://", text), "the Redis URL belongs in the Secret"
    # A cluster client follows redirects to every node: Memorystore's node ports too.
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    ranges = {
        (p["port"], p.get("endPort", p["port"]))
        for o in policies
        for rule in o["spec"].get("egress", [])
        for p in rule.get("ports", [])
    }
    assert {(6379, 6379), (11000, 13047)} <= ranges


def test_prod_shards_leave_room_to_grow() -> None:
    """Shards are fixed for the life of the data and are the unit Redis Cluster moves:
    prod's must balance a large cluster (8 or more per primary for 48 primaries)."""
    objects = render(TARGETS["prod"])
    shards = int(_find(objects, "ConfigMap", "userembed-config")["data"]["USEREMBED_REDIS_SHARDS"])
    assert shards >= 8 * 48, f"{shards} shards: size them for the largest cluster you expect"


# --- production: Strimzi, monitoring -----------------------------------------------------------


def test_prod_runs_kafka_with_strimzi() -> None:
    objects = render(TARGETS["prod"])
    kafka = _find(objects, "Kafka", "userembed")
    pools = [o for o in objects if o["kind"] == "KafkaNodePool"]
    assert sum(p["spec"]["replicas"] for p in pools) >= 3
    assert {"controller", "broker"} <= {r for p in pools for r in p["spec"]["roles"]}
    config = _find(objects, "ConfigMap", "userembed-config")["data"]
    plain = next(li for li in kafka["spec"]["kafka"]["listeners"] if li["name"] == "plain")
    assert config["USEREMBED_KAFKA_BOOTSTRAP"] == f"userembed-kafka-bootstrap:{plain['port']}"
    topics = {o["spec"]["topicName"]: o for o in objects if o["kind"] == "KafkaTopic"}
    assert set(topics) == {
        config["USEREMBED_KAFKA_TOPIC"],
        config["USEREMBED_KAFKA_TOPIC"] + ".dlq",
    }
    for topic in topics.values():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "userembed"
        assert topic["spec"]["replicas"] >= 3
    # Redis is a managed service: its URL (with the token) comes from the Secret.
    assert "USEREMBED_REDIS_URL" not in config


def test_prod_ships_monitoring() -> None:
    objects = render(TARGETS["prod"])
    monitor = _find(objects, "ServiceMonitor", "userembed")
    scraped_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    services = [
        o
        for o in objects
        if o["kind"] == "Service"
        and _selects(monitor["spec"]["selector"], o["metadata"].get("labels", {}))
    ]
    service_ports = {p["name"] for s in services for p in s["spec"]["ports"]}
    assert {"http", "metrics"} <= scraped_ports <= service_ports
    for role in ("api", "ingest", "worker"):
        assert any(
            s["spec"]["selector"].get("app.kubernetes.io/component") == role for s in services
        )
    _find(objects, "PrometheusRule", "userembed")
    dashboard = _find(objects, "ConfigMap", "userembed-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert re.search(r'"uid": "userembed"', dashboard["data"]["userembed.json"])
