"""A tiny world, its examples and a briefly trained model, shared by the model tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from models.dataset import DataConfig, Dataset, load_dataset
from models.export import export_user_tower, torch_embed
from models.registry import ModelArtifact, load_artifact, publish
from models.train import TrainConfig, TrainResult, train
from models.user_tower import TowerConfig
from models.world import WorldConfig
from service.core.features import FeatureState
from service.worker.alignment_fit import fit_to_parent

TINY_WORLD = WorldConfig(users=60, items=400, categories=10, days=4, seed=3)
TINY_TOWER = TowerConfig(embed_dim=16, heads=2, mlp=(32,), output_dim=16)
TINY_DATA = DataConfig(world=TINY_WORLD, history_length=12, item_buckets=503, category_buckets=31)


@pytest.fixture(scope="session")
def tiny_data() -> Dataset:
    return load_dataset(TINY_DATA)


@pytest.fixture(scope="session")
def tiny_trained(tiny_data: Dataset) -> TrainResult:
    torch.set_num_threads(1)
    config = TrainConfig(epochs=2, batch_size=32, eval_every=10, progress=False, seed=1)
    return train(tiny_data.train, tiny_data.valid, tiny_data.schema, TINY_TOWER, config)


def publish_trained(
    root: Path,
    trained: TrainResult,
    data: Dataset,
    version: str,
    *,
    alignment_states: Sequence[FeatureState] | None = None,
    alignment_now_ms: int = 0,
    **publish_args: Any,
) -> ModelArtifact:
    """Export a trained tower and publish it, as the training pipeline does (aligned onto
    ``parent_version`` when ``alignment_states`` are given)."""
    tower = trained.model.user_tower
    exported = export_user_tower(tower, data.test.features)
    if alignment_states is not None:
        publish_args["alignment"] = fit_to_parent(
            load_artifact(root, publish_args["parent_version"]),
            exported.onnx_bytes,
            data.schema,
            alignment_states,
            alignment_now_ms,
        )
    return publish(
        root,
        version=version,
        onnx_bytes=exported.onnx_bytes,
        schema=data.schema,
        output_dim=exported.output_dim,
        cold_start_embedding=torch_embed(tower, data.test.features).mean(0).tolist(),
        **publish_args,
    )
