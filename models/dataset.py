"""Where training data comes from: the synthetic world or a user's own event log."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from models.examples import Examples, build_examples
from models.logs import load_events
from models.world import World, WorldConfig
from service.core.tensors import InputSchema

log = logging.getLogger(__name__)

# Hashed vocabularies of the trained model. 10,007 item buckets keep the ONNX file
# near 2 MB; the schema (and so the buckets) travels in the manifest.
TRAINED_ITEM_BUCKETS = 10_007
TRAINED_CATEGORY_BUCKETS = 1_009


@dataclass(frozen=True, slots=True)
class DataConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    logs: Path | None = None
    history_length: int = 50
    item_buckets: int = TRAINED_ITEM_BUCKETS
    category_buckets: int = TRAINED_CATEGORY_BUCKETS
    max_impressions: int = 10
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)

    @property
    def schema(self) -> InputSchema:
        return InputSchema(
            history_length=self.history_length,
            item_buckets=self.item_buckets,
            category_buckets=self.category_buckets,
        )


@dataclass(frozen=True, slots=True)
class Dataset:
    """Train / valid / test slices by time: every evaluation looks at the future."""

    schema: InputSchema
    train: Examples
    valid: Examples
    test: Examples
    source: str


def load_dataset(config: DataConfig) -> Dataset:
    if config.logs is not None:
        events = load_events(config.logs)
        source = f"logs:{config.logs}"
    else:
        events = World(config.world).simulate()
        w = config.world
        source = f"world:users={w.users},items={w.items},days={w.days},seed={w.seed}"
    log.info("event=dataset_events source=%s events=%d", source, len(events))
    examples = build_examples(events, config.schema, max_impressions=config.max_impressions)
    if len(examples) < 10:
        raise ValueError(f"{source}: only {len(examples)} sessions with views: too few to train")
    train, valid, test = examples.split_by_time(*config.split)
    return Dataset(config.schema, train, valid, test, source)
