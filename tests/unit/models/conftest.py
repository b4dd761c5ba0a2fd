"""A tiny world, its examples and a briefly trained model, shared by the model tests."""

from __future__ import annotations

import pytest
import torch

from models.dataset import DataConfig, Dataset, load_dataset
from models.train import TrainConfig, TrainResult, train
from models.user_tower import TowerConfig
from models.world import WorldConfig

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
