from __future__ import annotations

import numpy as np
import torch

from models.dataset import Dataset
from models.user_tower import TowerConfig, UserTower, to_torch
from service.core.features import FeatureState
from service.core.tensors import InputSchema, assemble
from tests.unit.models.conftest import TINY_TOWER

SCHEMA = InputSchema(history_length=12, item_buckets=503, category_buckets=31)


def _tower(seed: int = 0, **overrides: object) -> UserTower:
    torch.manual_seed(seed)
    config = TowerConfig(**{**TINY_TOWER.to_dict(), **overrides})  # type: ignore[arg-type]
    return UserTower(SCHEMA, config).eval()


def _embed(tower: UserTower, tensors: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return tower(*to_torch(tensors)).numpy()


def test_shapes_unit_norm_and_empty_users(tiny_data: Dataset) -> None:
    tower = _tower()
    tensors = {k: v[:5] for k, v in tiny_data.test.features.items()}
    out = _embed(tower, tensors)
    assert out.shape == (5, TINY_TOWER.output_dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    empty = _embed(tower, assemble([FeatureState.empty()], 0, SCHEMA))
    assert np.all(np.isfinite(empty))


def test_padding_does_not_change_the_embedding(tiny_data: Dataset) -> None:
    for encoder in ("attention", "pool"):
        tower = _tower(encoder=encoder)
        short = np.flatnonzero(tiny_data.train.features["mask"].min(axis=1) == 0)[:16]
        tensors = {k: v[short].copy() for k, v in tiny_data.train.features.items()}
        padded = tensors["mask"] == 0
        assert padded.any(), "the tiny world should have users with short histories"
        garbage = {k: v.copy() for k, v in tensors.items()}
        rng = np.random.default_rng(0)
        garbage["item_ids"][padded] = rng.integers(1, SCHEMA.item_buckets, padded.sum())
        garbage["category_ids"][padded] = rng.integers(1, SCHEMA.category_buckets, padded.sum())
        garbage["event_types"][padded] = 3
        garbage["ages"][padded] = 7.5
        np.testing.assert_allclose(_embed(tower, tensors), _embed(tower, garbage), atol=1e-5)


def test_same_seed_same_tower_other_seed_differs(tiny_data: Dataset) -> None:
    tensors = {k: v[:4] for k, v in tiny_data.test.features.items()}
    np.testing.assert_array_equal(_embed(_tower(1), tensors), _embed(_tower(1), tensors))
    assert not np.allclose(_embed(_tower(1), tensors), _embed(_tower(2), tensors))


def test_history_matters_unless_ablated(tiny_data: Dataset) -> None:
    tensors = {k: v[:8] for k, v in tiny_data.test.features.items()}
    shuffled = dict(tensors, item_ids=np.roll(tensors["item_ids"], 1, axis=0))
    full, none = _tower(encoder="attention"), _tower(encoder="none")
    assert not np.allclose(_embed(full, tensors), _embed(full, shuffled))
    np.testing.assert_allclose(_embed(none, tensors), _embed(none, shuffled))
