"""``userembed evaluate`` end to end on the tiny preset: every section is produced from a
real pipeline run, and the numbers agree with each other (not with any target)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.bench.provenance import commit_id

SECTIONS = (
    "## 1. Freshness",
    "## 2. The value of freshness",
    "## 3. Stabilization within a model version",
    "## 4. Stabilization across retrains",
    "## 5. Read latency",
)
PLOTS = ("freshness", "value_of_freshness", "stabilization", "retrain", "reads")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("report")
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "evaluate", "--preset", "tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "report:" in done.stdout
    assert "evaluate" in done.stderr  # the progress bar
    markdown = (out / "report.md").read_text()
    raw = json.loads((out / "report" / "report.json").read_text())
    return out, markdown, raw


def test_the_report_has_every_section_plot_and_its_provenance(
    report: tuple[Path, str, dict[str, Any]],
) -> None:
    out, markdown, raw = report
    for section in SECTIONS:
        assert section in markdown
    for plot in PLOTS:
        png = out / "report" / f"{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(report/{plot}.png)" in markdown
    assert raw["commit"] == commit_id() and f"`{raw['commit']}`" in markdown
    assert raw["preset"] == "tiny" and raw["machine"]["cpus"] >= 1
    assert "userembed evaluate --preset tiny" in markdown
    retrain = markdown.split("## 4.")[1].split("## 5.")[0]
    assert "Precision:" in retrain and "from the ranker retrained on v2" in retrain
    assert not re.search(r"\bnan\b", markdown, re.IGNORECASE)  # every number was measured


def _ordered(summary: dict[str, Any]) -> None:
    assert summary["count"] > 0
    assert summary["p50_ms"] <= summary["p99_ms"] <= summary["p999_ms"] <= summary["max_ms"]
    assert summary["p50_ms"] > 0


def test_live_numbers_are_consistent(report: tuple[Path, str, dict[str, Any]]) -> None:
    live = report[2]["live"]
    assert [r["offered_rate"] for r in live["rates"]] == live["config"]["rates"]
    for rate in live["rates"]:
        _ordered(rate["probes"])
        assert rate["ingested_rate"] > 0 and rate["embedded_rate"] > 0
        assert rate["keeps_up"] == (
            live["first_failing_rate"] is None or rate["offered_rate"] < live["first_failing_rate"]
        )
    for reads in [live["idle_reads"], *(r["reads"] for r in live["rates"])]:
        assert {r["target"] for r in reads} == {"api-http", "api-grpc", "redis-get"}
        for row in reads:
            _ordered(row["latency"])
            if row["target"] != "redis-get":
                assert row["errors"] == {}


def test_offline_numbers_are_consistent(report: tuple[Path, str, dict[str, Any]]) -> None:
    offline = report[2]["offline"]
    freshness, stabilization, retrain = (
        offline["freshness"],
        offline["stabilization"],
        offline["retrain"],
    )
    assert [r["label"] for r in freshness] == ["0", "1 minute", "1 hour", "1 day", "1 week"]
    assert freshness[0]["mean_cosine_to_fresh"] == pytest.approx(1.0, abs=1e-5)
    assert freshness[0]["share_missing_events"] == 0.0
    missing = [r["share_missing_events"] for r in freshness]
    assert missing == sorted(missing)  # a longer staleness misses at least as much
    # the same frozen ranker on the same fresh embeddings, reached three ways
    assert stabilization[0]["time_constant_s"] is None
    assert stabilization[0]["auc"] == freshness[0]["auc"] == retrain[0]["auc"]
    assert stabilization[0]["mean_cosine_to_fresh"] == pytest.approx(1.0, abs=1e-5)
    for row in stabilization[1:]:
        assert row["jitter_mean"] <= stabilization[0]["jitter_mean"]
        assert row["pairs"] == stabilization[0]["pairs"]
    markdown = report[1]
    # every AUC and cosine was measured (a NaN prints "n/a") and is the one the report shows
    for row in [*freshness, *stabilization, *retrain, offline["no_user_embedding"]]:
        assert math.isfinite(row["auc"]) and math.isfinite(row["ne"]), row
        assert f"{row['auc']:.4f}" in markdown, row
    drift = offline["drift"]
    for cosine in (drift["mean_cosine_unaligned"], drift["mean_cosine_aligned"]):
        assert f"{cosine:.3f}" in markdown, drift
    assert drift["fit_sample_size"] > 0
    assert offline["impressions"]["eval"] > 0 and offline["impressions"]["ranker_train"] > 0
