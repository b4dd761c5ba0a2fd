"""The per-model alerts of issue 19 fire for the model concerned, and only then:
`promtool test rules` on synthetic series of two served models (one stops being
written while the other goes on, a refused version of one, one model failing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.deploy.test_ingest_alerts import SCRAPE, _alert, _promtool_test


def _info(model: str) -> dict[str, str]:
    """``model`` served by a worker all along (its current version's info gauge at 1)."""
    labels = f'model="{model}",version="{model}-1",space="{model}-1",provider="cpu"'
    return {"series": f"userembed_worker_model_info{{{labels}}}", "values": "1x240"}


def _written(model: str, values: str) -> dict[str, str]:
    return {"series": f'userembed_worker_embeddings_total{{model="{model}"}}', "values": values}


def _test(series: list[dict[str, str]], checks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"interval": SCRAPE, "input_series": series, "alert_rule_test": checks}


def test_a_served_model_not_written_while_the_others_are_alerts_for_that_model(
    tmp_path: Path,
) -> None:
    """clicks is written for 5 minutes, then not at all; default all along. Its 15-minute
    rate reaches 0 at 20 minutes, and the alert fires 15 minutes later."""
    alert = "UserembedModelNotEmbedding"
    series = [
        _info("default"),
        _info("clicks"),
        _written("default", "0+100x240"),
        _written("clicks", "0+100x20 2000x220"),
    ]
    checks: list[dict[str, Any]] = [
        {"eval_time": t, "alertname": alert, "exp_alerts": []} for t in ("10m", "25m", "34m")
    ]
    checks.append(
        {"eval_time": "37m", "alertname": alert, "exp_alerts": [_alert(alert, {"model": "clicks"})]}
    )
    _promtool_test(tmp_path, [_test(series, checks)])


def test_an_idle_worker_does_not_alert(tmp_path: Path) -> None:
    """Nothing dirty: no model is written, and none is singled out."""
    alert = "UserembedModelNotEmbedding"
    series = [
        _info("default"),
        _info("clicks"),
        _written("default", "500x240"),
        _written("clicks", "300x240"),
    ]
    checks: list[dict[str, Any]] = [
        {"eval_time": t, "alertname": alert, "exp_alerts": []} for t in ("20m", "50m")
    ]
    _promtool_test(tmp_path, [_test(series, checks)])


def test_a_refused_version_alerts_for_its_model(tmp_path: Path) -> None:
    alert = "UserembedModelSwapRefused"
    swaps = "userembed_worker_model_swaps_total"
    series = [
        {"series": f'{swaps}{{model="default",outcome="swapped"}}', "values": "0 0 1x20"},
        {"series": f'{swaps}{{model="clicks",outcome="refused"}}', "values": "0 0 0 0 1x20"},
    ]
    checks: list[dict[str, Any]] = [
        {"eval_time": "30s", "alertname": alert, "exp_alerts": []},
        {"eval_time": "2m", "alertname": alert, "exp_alerts": [_alert(alert, {"model": "clicks"})]},
    ]
    _promtool_test(tmp_path, [_test(series, checks)])


def test_a_failing_model_alerts_for_that_model(tmp_path: Path) -> None:
    """clicks fails on 60 users per scrape (4/s) from the start; default never."""
    alert = "UserembedModelInferenceFailing"
    skipped = "userembed_worker_skipped_total"
    series = [
        {"series": f'{skipped}{{model="clicks",reason="model_failed"}}', "values": "0+60x80"},
        {"series": f'{skipped}{{model="default",reason="no_features"}}', "values": "0+60x80"},
    ]
    expected = _alert(alert, {"model": "clicks"})
    expected["exp_annotations"]["summary"] = (
        "Model clicks fails on 4 users/s; the other models are written"
    )
    checks: list[dict[str, Any]] = [
        {"eval_time": "5m", "alertname": alert, "exp_alerts": []},
        {"eval_time": "15m", "alertname": alert, "exp_alerts": [expected]},
    ]
    _promtool_test(tmp_path, [_test(series, checks)])
