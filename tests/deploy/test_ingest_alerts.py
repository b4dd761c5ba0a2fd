"""The ingest alerts of issue 16 fire when they should and only then: `promtool test
rules` on synthetic series (a partition that stops committing while its lag grows, a
busy one working off a backlog, a blocked dead-letter topic)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_observability import RULES

SCRAPE = "15s"


def _rule(name: str) -> dict[str, Any]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    [rule] = [r for g in groups for r in g["rules"] if r.get("alert") == name]
    return rule


def _annotations(name: str, labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations with ``{{ $labels.x }}`` filled in (the only template used)."""
    return {
        key: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        for key, text in _rule(name)["annotations"].items()
    }


def _alert(name: str, labels: dict[str, str]) -> dict[str, Any]:
    full = {**labels, "severity": _rule(name)["labels"]["severity"]}
    return {"exp_labels": full, "exp_annotations": _annotations(name, labels)}


def _promtool_test(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    path = tmp_path / "ingest-alerts.test.yml"
    path.write_text(
        yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": SCRAPE, "tests": tests})
    )
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_partition_that_stops_committing_while_lag_grows_alerts_within_a_minute(
    tmp_path: Path,
) -> None:
    """Partition 0 commits until 2 min, then its committed offset stays flat while new
    events arrive; partition 1 works off a growing backlog, committing all along."""
    series = [
        {"series": 'userembed_ingest_committed_offset{partition="0"}', "values": "0+100x8 800x12"},
        {
            "series": 'userembed_ingest_consumer_lag_messages{partition="0"}',
            "values": "10x8 10+50x12",
        },
        {"series": 'userembed_ingest_committed_offset{partition="1"}', "values": "0+100x20"},
        {
            "series": 'userembed_ingest_consumer_lag_messages{partition="1"}',
            "values": "0+20x20",
        },
    ]
    stuck = "UserembedIngestPartitionStuck"
    _promtool_test(
        tmp_path,
        [
            {
                "interval": SCRAPE,
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": stuck, "exp_alerts": []},
                    # last commit at 2m (135 s: first flat sample): firing 45-60 s later
                    {
                        "eval_time": "3m",
                        "alertname": stuck,
                        "exp_alerts": [_alert(stuck, {"partition": "0"})],
                    },
                    {
                        "eval_time": "5m",
                        "alertname": stuck,
                        "exp_alerts": [_alert(stuck, {"partition": "0"})],
                    },
                ],
            }
        ],
    )


def test_an_idle_partition_does_not_alert(tmp_path: Path) -> None:
    series = [
        {"series": 'userembed_ingest_committed_offset{partition="2"}', "values": "500x20"},
        {"series": 'userembed_ingest_consumer_lag_messages{partition="2"}', "values": "0x20"},
    ]
    _promtool_test(
        tmp_path,
        [
            {
                "interval": SCRAPE,
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": t, "alertname": "UserembedIngestPartitionStuck", "exp_alerts": []}
                    for t in ("1m", "3m", "5m")
                ],
            }
        ],
    )


def test_a_blocked_dead_letter_topic_alerts_within_a_minute(tmp_path: Path) -> None:
    blocked = "UserembedIngestDeadLetterTopicBlocked"
    _promtool_test(
        tmp_path,
        [
            {
                "interval": SCRAPE,
                "input_series": [
                    {
                        "series": 'userembed_ingest_dlq_blocked{instance="ingest-0"}',
                        "values": "0 0 1x10",
                    }
                ],
                "alert_rule_test": [
                    {"eval_time": "45s", "alertname": blocked, "exp_alerts": []},
                    {"eval_time": "75s", "alertname": blocked, "exp_alerts": [_alert(blocked, {})]},
                ],
            }
        ],
    )


def test_a_crash_loop_alerts(tmp_path: Path) -> None:
    crash = "UserembedIngestCrashLoop"
    _promtool_test(
        tmp_path,
        [
            {
                "interval": SCRAPE,
                "input_series": [
                    {"series": "userembed_ingest_crash_loop_partitions", "values": "0 0 1 1 0x20"},
                    {
                        "series": 'userembed_ingest_dead_letters_total{reason="crash_loop"}',
                        "values": "0 0 0 0 1x20",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "15s", "alertname": crash, "exp_alerts": []},
                    {"eval_time": "30s", "alertname": crash, "exp_alerts": [_alert(crash, {})]},
                    {"eval_time": "2m", "alertname": crash, "exp_alerts": [_alert(crash, {})]},
                ],
            }
        ],
    )
