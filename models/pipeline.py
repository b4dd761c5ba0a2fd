"""``userembed train`` end to end: data -> train -> evaluate -> export -> publish."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.dataset import DataConfig, Dataset, load_dataset
from models.examples import Examples
from models.export import ExportedTower, cold_start_embedding, export_user_tower, torch_embed
from models.registry import (
    FP16_MODEL_FILE,
    ModelArtifact,
    current_version,
    load_artifact,
    publish,
)
from models.train import ExampleTensors, TrainConfig, TrainResult, evaluate_probs, predict, train
from models.user_tower import TowerConfig, UserTower
from service.worker.alignment_fit import fit_to_parent

log = logging.getLogger(__name__)
ALIGNMENT_SAMPLE = 2_000


@dataclass(frozen=True, slots=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tower: TowerConfig = field(default_factory=TowerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp16: bool = False


@dataclass
class TrainingRun:
    config: RunConfig
    data: Dataset
    result: TrainResult
    test_metrics: dict[str, float]
    exported: ExportedTower
    cold_start: list[float]
    seconds: float


def latest_per_user(examples: Examples, limit: int | None = None) -> npt.NDArray[np.int64]:
    """Row of each user's most recent session (the 'recent users' of the cold start)."""
    latest: dict[str, int] = {}
    for row in np.argsort(examples.times, kind="stable").tolist():
        latest[examples.users[row]] = row
    rows = np.array(sorted(latest.values()), dtype=np.int64)
    return rows if limit is None else rows[-limit:]


def run_training(config: RunConfig, data: Dataset | None = None) -> TrainingRun:
    """Train, evaluate on the held-out future, export with parity, compute the cold start.

    ``data``: an already loaded ``config.data`` (several trainings on the same examples)."""
    start = time.perf_counter()
    data = data or load_dataset(config.data)
    log.info(
        "event=dataset source=%s train=%d valid=%d test=%d",
        data.source,
        len(data.train),
        len(data.valid),
        len(data.test),
    )
    result = train(data.train, data.valid, data.schema, config.tower, config.train)
    test_metrics = evaluate_probs(predict(result.model, ExampleTensors(data.test)), data.test)
    tower: UserTower = result.model.user_tower
    recent = data.test.take(latest_per_user(data.test))
    exported = export_user_tower(tower, recent.features, fp16=config.fp16)
    cold_start = cold_start_embedding(torch_embed(tower, recent.features))
    return TrainingRun(
        config, data, result, test_metrics, exported, cold_start, time.perf_counter() - start
    )


def manifest_metrics(run: TrainingRun) -> dict[str, float]:
    metrics = {f"test_{k}": v for k, v in run.test_metrics.items()}
    metrics.update({k: v for k, v in run.result.valid.items() if k != "step"})
    metrics["steps"] = float(run.result.steps)
    metrics["train_seconds"] = round(run.seconds, 1)
    return metrics


def publish_run(
    run: TrainingRun,
    registry: Path,
    version: str,
    parent: str | None = "auto",
    make_current: bool = True,
) -> ModelArtifact:
    """Publish to the registry; with a parent ("auto" = CURRENT), also fit the alignment."""
    parent_version = current_version(registry) if parent == "auto" else parent
    recent = run.data.test.take(latest_per_user(run.data.test, ALIGNMENT_SAMPLE))
    extra = {FP16_MODEL_FILE: run.exported.fp16_bytes} if run.exported.fp16_bytes else {}
    alignment = None
    if parent_version is not None:
        alignment = fit_to_parent(
            load_artifact(registry, parent_version),
            run.exported.onnx_bytes,
            run.data.schema,
            recent.states,
            int(run.data.test.times.max()),
        )
    return publish(
        registry,
        version=version,
        onnx_bytes=run.exported.onnx_bytes,
        schema=run.data.schema,
        output_dim=run.exported.output_dim,
        cold_start_embedding=run.cold_start,
        parent_version=parent_version,
        kind="sum",
        training_metrics=manifest_metrics(run),
        details=_details(run),
        extra_files=extra,
        alignment=alignment,
        make_current=make_current,
    )


def _details(run: TrainingRun) -> dict[str, object]:
    return {
        "source": run.data.source,
        "tower": run.config.tower.to_dict(),
        "train": asdict(run.config.train),
        "world": asdict(run.config.data.world) if run.config.data.logs is None else None,
        "parity_max_abs_diff": run.exported.parity_max_abs_diff,
        "parity_rows": run.exported.parity_rows,
        "fp16_max_abs_diff": run.exported.fp16_max_abs_diff,
        "fp16_note": run.exported.fp16_note,
        "stopped_early": run.result.stopped_early,
    }
