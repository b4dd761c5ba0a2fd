"""Cross-version alignment as the worker serves it, on the synthetic world: a retrained
model's embeddings mapped into its parent's space stay close to the parent's."""

from __future__ import annotations

from pathlib import Path

import torch

from models.alignment import mean_cosine
from models.dataset import Dataset
from models.train import TrainConfig, TrainResult, train
from service.core.tensors import assemble
from service.worker.serving_model import load_serving_model
from tests.unit.models.conftest import TINY_TOWER, publish_trained


def test_a_retrained_model_served_in_the_parent_space_stays_close_to_the_parent(
    tmp_path: Path, tiny_trained: TrainResult, tiny_data: Dataset
) -> None:
    torch.set_num_threads(1)
    retrained = train(
        tiny_data.train,
        tiny_data.valid,
        tiny_data.schema,
        TINY_TOWER,
        TrainConfig(epochs=2, batch_size=32, eval_every=10, progress=False, seed=2),
    )
    states = tiny_data.test.states
    now = int(tiny_data.test.times.max())
    half = len(states) // 2
    fit_on, held_out = states[:half], states[half:]  # judge on users the fit never saw
    publish_trained(tmp_path, tiny_trained, tiny_data, "sum-1")
    publish_trained(
        tmp_path,
        retrained,
        tiny_data,
        "sum-2",
        parent_version="sum-1",
        alignment_states=fit_on,
        alignment_now_ms=now,
    )
    parent = load_serving_model(tmp_path, "sum-1")
    child = load_serving_model(tmp_path, "sum-2")
    assert (child.version, child.space_version) == ("sum-2", "sum-1")

    tensors = assemble(held_out, now, tiny_data.schema)
    reference = parent.embed(tensors)
    unaligned = mean_cosine(child.runtime.infer(tensors), reference)
    aligned = mean_cosine(child.embed(tensors), reference)
    print(
        f"\nheld-out users={len(held_out)}: mean cosine to the parent's embeddings "
        f"unaligned={unaligned:.3f} aligned={aligned:.3f}"
    )
    assert aligned > unaligned + 0.2
    assert aligned > 0.5
