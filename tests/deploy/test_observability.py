"""The Grafana dashboard and the Prometheus alert rules: loadable, complete, and every
metric and label they query exists in service/metrics.py. promtool (when installed,
e.g. `apt-get install prometheus`) additionally parses every expression."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import service.metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "k8s" / "components" / "monitoring" / "dashboards" / "userembed.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$model": ".*",  # the model variable's "All"
}
_SELECTOR = re.compile(r"\b(userembed_[a-z0-9_]+)\b(\{[^}]*\})?")
_MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def _exposed_series() -> dict[str, set[str]]:
    """Every series name service/metrics.py exposes, with its label names."""
    series: dict[str, set[str]] = {}
    for value in vars(service.metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name, labels = value._name, set(value._labelnames)
        kind = value._type
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
        else:
            series[name] = labels
    return series


SERIES = _exposed_series()


def check_promql(expr: str, where: str) -> None:
    """Metric names and label names in ``expr`` exist in service/metrics.py."""
    used = _SELECTOR.findall(expr)
    assert used, f"{where}: no userembed metric in {expr!r}"
    labels_in_expr: set[str] = set()
    for metric, matchers in used:
        assert metric in SERIES, f"{where}: {metric} is not exposed by service/metrics.py"
        labels_in_expr |= SERIES[metric]
        for label in _MATCHER.findall(matchers):
            assert label in SERIES[metric], f"{where}: {metric} has no label {label!r}"
    for group in _GROUPING.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            assert label in labels_in_expr, f"{where}: no metric in {expr!r} has label {label!r}"
    assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), where


# --- dashboard -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "userembed" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]


def test_every_panel_has_a_datasource_and_queries(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']}: no queries"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            check_promql(target["expr"], f"panel {panel['title']!r}")
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))


def _model_metrics(expr: str) -> list[str]:
    """The metrics in ``expr`` that are labelled by model."""
    return [m for m, _ in _SELECTOR.findall(expr) if "model" in SERIES[m]]


def test_per_model_panels_follow_the_model_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query" and model["datasource"]["uid"] == "${datasource}"
    assert model["multi"] and model["includeAll"] and model["allValue"] == ".*"
    (metric,) = _model_metrics(model["query"])
    assert model["query"] == f"label_values({metric}, model)"
    per_model = 0
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            metrics = _model_metrics(expr)
            # every selector of a per-model metric filters by the variable (a shared stage
            # has model="", which '$model|' keeps)
            filtered = re.findall(r'\b(userembed_[a-z0-9_]+)\{model=~"\$model\|?"', expr)
            assert sorted(filtered) == sorted(metrics), f"{panel['title']!r}: {expr}"
            if metrics:
                per_model += 1
                assert "{{model}}" in target["legendFormat"], panel["title"]
    assert per_model >= 7


def test_dashboard_covers_what_operators_watch(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p["targets"])
    titles = " ".join(p["title"].lower() for p in _panels(dashboard))
    for needed in ("p50", "p99", "4xx", "5xx", "staleness", "lag", "queue", "oldest", "model"):
        assert needed in titles, f"no panel about {needed}"
    for metric in (
        "userembed_api_request_seconds_bucket",
        "userembed_api_embeddings_served_total",
        "userembed_worker_embedding_staleness_seconds_bucket",
        "userembed_api_served_staleness_seconds_bucket",
        "userembed_ingest_consumer_lag_messages",
        "userembed_worker_queue_depth_users",
        "userembed_worker_oldest_dirty_age_seconds",
        "userembed_worker_embeddings_total",
        "userembed_worker_model_info",
        "userembed_worker_skipped_total",
        "userembed_worker_model_swaps_total",
    ):
        assert metric in exprs, f"the dashboard does not show {metric}"


# --- alert rules -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return data


def test_compose_and_kubernetes_ship_the_same_rules(rules: dict[str, Any]) -> None:
    custom_resource = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert custom_resource["spec"]["groups"] == rules["groups"], (
        "deploy/prometheus/alerts.yml and the PrometheusRule differ: copy the groups across"
    )


def test_alert_rules_are_complete(rules: dict[str, Any]) -> None:
    names = []
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            names.append(rule["alert"])
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            if "for" in rule:
                assert re.fullmatch(r"(\d+[smhdwy])+", rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            check_promql(rule["expr"], f"alert {rule['alert']}")
    assert len(names) == len(set(names))
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    covered = " ".join(exprs.values())
    for metric in (
        "userembed_worker_embedding_staleness_seconds_bucket",  # staleness
        "userembed_ingest_consumer_lag_messages",  # consumer lag
        'status=~"5..|UNAVAILABLE',  # 5xx rate, gRPC server errors included
        "userembed_worker_oldest_dirty_age_seconds",  # queue age
        "userembed_ingest_committed_offset",  # a partition not advancing (docs/failures.md)
        "userembed_ingest_dlq_blocked",  # the dead-letter topic cannot be written
        "userembed_ingest_crash_loop_partitions",  # ingest dies on a message
        'userembed_worker_skipped_total{reason="model_failed"}',  # one model failing
    ):
        assert metric in covered, f"no alert on {metric}"
    # an alert about a model fires per model: it keeps the model label
    for alert in (
        "UserembedServingStaleEmbeddings",
        "UserembedModelSwapRefused",
        "UserembedModelInferenceFailing",
        "UserembedModelNotEmbedding",
    ):
        assert "sum by (model)" in exprs[alert], alert
        summary = next(
            r["annotations"]["summary"]
            for g in rules["groups"]
            for r in g["rules"]
            if r["alert"] == alert
        )
        assert "{{ $labels.model }}" in summary, alert


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return promtool


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each panel query as a recording rule, so promtool's PromQL parser reads it."""
    promtool = _promtool()
    rules = []
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            rules.append(
                {"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr}
            )
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_compose_prometheus_config(tmp_path: Path) -> None:
    promtool = _promtool()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["rule_files"] = [str(RULES)]  # the path it is mounted at in the container
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if "unknown long flag" in result.stderr:  # promtool older than 2.39
        result = subprocess.run(
            [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
        )
    assert result.returncode == 0, result.stdout + result.stderr
