"""The retrieval objective: a softmax over the training catalogue next to the click BCE."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from models.dataset import Dataset
from models.mix_tower import MixTower, retrieval_loss
from models.report import retrieval_recall
from models.train import Catalogue, ExampleTensors, TrainConfig, train
from models.user_tower import UserTower
from tests.unit.models.conftest import TINY_TOWER


def test_retrieval_loss_on_known_cases() -> None:
    users = torch.nn.functional.normalize(torch.eye(3), dim=-1)
    catalogue = torch.eye(3) * 4.0
    clicked = torch.tensor([[0, -1], [-1, -1], [2, 1]])
    # indifferent users: every item equally likely, loss log N; rows without clicks ignored
    uniform = retrieval_loss(torch.zeros(3, 3), catalogue, clicked)
    assert uniform.item() == pytest.approx(math.log(3))
    # user i points at item i: its own click is cheap, another row's item is expensive
    own = retrieval_loss(users[:1], catalogue, torch.tensor([[0]]))
    other = retrieval_loss(users[:1], catalogue, torch.tensor([[1]]))
    assert own.item() < math.log(3) < other.item()
    assert retrieval_loss(users, catalogue, torch.full((3, 2), -1)).item() == 0.0


def _catalogue_loss(model: MixTower, data: Dataset) -> float:
    tensors = ExampleTensors(data.train)
    catalogue = Catalogue(data.train, data.schema.item_buckets)
    with torch.no_grad():
        users = model.user_tower(*tensors.features)
        vectors = model.item_tower(catalogue.items, catalogue.categories)
        return float(retrieval_loss(users, vectors, tensors.clicked_in(catalogue)))


def test_retrieval_objective_lowers_its_loss_and_lifts_recall(tiny_data: Dataset) -> None:
    """Same seed and batches with and without the retrieval term; recall@20 is measured on
    the training sessions (the tiny world's 36 test sessions are too few to compare)."""
    config = TrainConfig(epochs=2, batch_size=32, eval_every=10, progress=False, seed=1)

    def fit(weight: float) -> MixTower:
        tuned = replace(config, retrieval_weight=weight)
        return train(tiny_data.train, tiny_data.valid, tiny_data.schema, TINY_TOWER, tuned).model

    torch.manual_seed(1)
    untrained = MixTower(UserTower(tiny_data.schema, TINY_TOWER)).eval()
    impressions_only, with_retrieval = fit(0.0), fit(1.0)
    losses = [_catalogue_loss(m, tiny_data) for m in (untrained, impressions_only, with_retrieval)]
    assert losses[2] < min(losses[:2])
    seen = replace(tiny_data, test=tiny_data.train)
    recalls = [
        retrieval_recall(m, seen, k=20)[0] for m in (untrained, impressions_only, with_retrieval)
    ]
    assert recalls[2] > max(recalls[:2])


def test_retrieval_weight_zero_is_impressions_only(tiny_data: Dataset) -> None:
    config = TrainConfig(max_steps=2, batch_size=16, eval_every=2, progress=False)
    results = [
        train(
            tiny_data.train,
            tiny_data.valid,
            tiny_data.schema,
            TINY_TOWER,
            replace(config, retrieval_weight=w),
        )
        for w in (0.0, 0.1)
    ]
    # same seed, same batches: only the added loss term differs
    assert results[0].losses[0] < results[1].losses[0]
