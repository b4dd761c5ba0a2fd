from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from models.cli import add_model_commands
from models.registry import current_version, load_artifact


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="userembed")
    add_model_commands(parser.add_subparsers(dest="command", required=True))
    return parser


TINY = [
    "--users",
    "30",
    "--items",
    "200",
    "--categories",
    "5",
    "--days",
    "3",
    "--history-length",
    "8",
    "--item-buckets",
    "211",
    "--category-buckets",
    "17",
    "--embed-dim",
    "8",
    "--mlp",
    "16",
    "--output-dim",
    "8",
    "--max-steps",
    "4",
    "--eval-every",
    "2",
    "--no-progress",
]


def test_train_publishes_twice_with_alignment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "registry"
    for version in ("sum-a", "sum-b"):
        args = _parser().parse_args(
            ["train", *TINY, "--registry", str(registry), "--version", version]
        )
        args.func(args)
    assert current_version(registry) == "sum-b"
    child = load_artifact(registry)
    assert child.manifest.parent_version == "sum-a" and child.manifest.alignment is not None
    assert child.manifest.training_metrics["steps"] == 4
    out = capsys.readouterr().out
    assert (
        "parity max|diff|=" in out and "published sum-b" in out and "mean cosine to parent" in out
    )


def test_export_world_writes_trainable_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "events.jsonl"
    args = _parser().parse_args(["export-world", str(path), "--users", "30", "--days", "3"])
    args.func(args)
    args = _parser().parse_args(["train", *TINY, "--logs", str(path), "--no-publish"])
    args.func(args)
    assert f"trained on logs:{path}" in capsys.readouterr().out


def test_report_compares_the_model_with_popularity_and_ablations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parser().parse_args(
        ["train", *TINY, "--registry", str(tmp_path / "r"), "--version", "v1", "--report"]
    )
    args.func(args)
    out = capsys.readouterr().out
    for row in ("popularity", "no-seq-encoder (pool)", "no-history (counters)", "sum ("):
        assert row in out
    assert "recall@50" in out and "onnxruntime" in out and "torch eager" in out
