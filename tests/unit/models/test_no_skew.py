"""Training and serving build the same tensors and the same embedding for a user."""

from __future__ import annotations

import numpy as np

from models.examples import build_examples
from models.export import export_user_tower, torch_embed
from models.train import TrainResult
from models.world import World
from service.core.events import SourcedEvent
from service.core.features import FeatureState, apply_events, decode_features, encode_features
from service.core.tensors import assemble
from service.worker.runtime import OnnxModelRuntime
from tests.unit.models.conftest import TINY_DATA


def _served_state(events: list[SourcedEvent], length: int) -> FeatureState:
    """What ingest stores: events applied in small batches, through the binary codec."""
    state = FeatureState.empty()
    for start in range(0, len(events), 3):
        state, _ = apply_events(state, events[start : start + 3], length)
        state = decode_features(encode_features(state))
    return state


def test_training_tensors_and_embeddings_equal_the_serving_path(
    tiny_trained: TrainResult,
) -> None:
    schema = TINY_DATA.schema
    events = World(TINY_DATA.world).simulate()
    examples = build_examples(events, schema)
    tower = tiny_trained.model.user_tower
    runtime = OnnxModelRuntime(
        export_user_tower(tower, examples.features).onnx_bytes,
        version="skew",
        schema=schema,
        prefer_gpu=False,
    )
    checked = 0
    for row in range(0, len(examples), max(1, len(examples) // 25)):
        user, at = examples.users[row], int(examples.times[row])
        before = [e for e in events if e.user_id == user and e.ts < at]
        state = _served_state([SourcedEvent(e, 0, i) for i, e in enumerate(before)], 12)
        served = assemble([state], at, schema)
        trained = {k: v[row : row + 1] for k, v in examples.features.items()}
        for name in schema.inputs():
            if name == "counters":
                # float32 state between ingest batches: the same sums, rounded per batch
                np.testing.assert_allclose(served[name], trained[name], rtol=1e-5, atol=1e-7)
            else:
                np.testing.assert_array_equal(served[name], trained[name], err_msg=name)
        np.testing.assert_allclose(runtime.infer(served), torch_embed(tower, trained), atol=1e-5)
        checked += int(state.num_events > 0)
    assert checked >= 10
