"""Feature states to model input tensors: the one function serving and training share.

Using the same :func:`assemble` in the worker and in training is what rules out
training/serving skew. The :class:`InputSchema` travels in every model manifest,
and its digest must match before a worker serves the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from service.core.events import NUM_EVENT_TYPES
from service.core.features import NUM_HALF_LIVES, FeatureState, decay_factors

Tensors = dict[str, npt.NDArray[np.generic]]
_MS_PER_HOUR: Final = 3_600_000.0


@dataclass(frozen=True, slots=True)
class InputSchema:
    """Shapes and vocabularies of the model inputs. Index 0 of every id input is padding."""

    history_length: int = 50
    item_buckets: int = 100_003
    category_buckets: int = 1_009
    num_event_types: int = NUM_EVENT_TYPES
    num_counters: int = NUM_EVENT_TYPES * NUM_HALF_LIVES

    def inputs(self) -> dict[str, tuple[str, list[str | int]]]:
        """Input name -> (dtype, shape) with a dynamic batch axis named 'batch'."""
        seq: list[str | int] = ["batch", self.history_length]
        return {
            "item_ids": ("int64", seq),
            "category_ids": ("int64", seq),
            "event_types": ("int64", seq),
            "ages": ("float32", seq),
            "mask": ("float32", seq),
            "counters": ("float32", ["batch", self.num_counters]),
        }

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "inputs": self.inputs()}

    def digest(self) -> str:
        """sha256 of the canonical JSON of the schema: equal digests, compatible tensors."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> InputSchema:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**fields)  # type: ignore[arg-type]


def bucket_ids(hashes: npt.NDArray[np.int64], buckets: int) -> npt.NDArray[np.int64]:
    """Hash -> bucket in 1..buckets-1; hash 0 ('none') -> 0."""
    return np.where(hashes == 0, 0, hashes % (buckets - 1) + 1)


def assemble(states: Sequence[FeatureState], now_ms: int, schema: InputSchema) -> Tensors:
    """Batch tensors for ``states`` as seen at ``now_ms``.

    Histories are left-padded so the most recent event is always the last position.
    Ages are log1p(hours since the event); counters are log1p of the decayed counts.
    Vectorized over the batch: each user's tail is one slice, everything else is a
    handful of whole-batch numpy operations.
    """
    batch, length = len(states), schema.history_length
    item_ids = np.zeros((batch, length), dtype=np.int64)
    category_ids = np.zeros((batch, length), dtype=np.int64)
    event_types = np.zeros((batch, length), dtype=np.int64)
    ages = np.zeros((batch, length), dtype=np.float32)
    mask = np.zeros((batch, length), dtype=np.float32)
    counters = np.zeros((batch, schema.num_counters), dtype=np.float32)
    if batch:
        kept = np.fromiter((min(s.num_events, length) for s in states), np.int64, batch)
        total = int(kept.sum())
        if total:
            tails = [(s, s.num_events - int(n)) for s, n in zip(states, kept, strict=True)]
            rows = np.repeat(np.arange(batch), kept)
            first = np.repeat(np.cumsum(kept) - kept, kept)
            cols = length - np.repeat(kept, kept) + (np.arange(total) - first)
            items = np.concatenate([s.item_hashes[i:] for s, i in tails])
            categories = np.concatenate([s.category_hashes[i:] for s, i in tails])
            types = np.concatenate([s.types[i:] for s, i in tails])
            stamps = np.concatenate([s.timestamps[i:] for s, i in tails])
            item_ids[rows, cols] = bucket_ids(items, schema.item_buckets)
            category_ids[rows, cols] = bucket_ids(categories, schema.category_buckets)
            event_types[rows, cols] = types.astype(np.int64) + 1
            ages[rows, cols] = np.log1p(np.maximum(now_ms - stamps, 0) / _MS_PER_HOUR)
            mask[rows, cols] = 1.0
        last = np.fromiter((s.last_event_ms for s in states), np.int64, batch)
        stacked = np.stack([s.counters for s in states])  # [batch, types, half-lives]
        decayed = (stacked * decay_factors(now_ms - last)[:, None, :]).astype(np.float32)
        counters[:] = np.log1p(decayed).reshape(batch, -1)
    return {
        "item_ids": item_ids,
        "category_ids": category_ids,
        "event_types": event_types,
        "ages": ages,
        "mask": mask,
        "counters": counters,
    }
