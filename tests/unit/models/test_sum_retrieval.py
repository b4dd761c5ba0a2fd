"""The SUM tower's next-item objective: the next item, or the next K weighted."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.sum_retrieval import SumRetrievalConfig, future_loss

ITEMS = np.array([3, 1, 4, 1, 5, 0, 2, 6], dtype=np.int64)


def test_one_target_is_plain_cross_entropy_of_the_item_at_the_cut() -> None:
    logits = torch.randn(2, 7)
    starts, ends = np.array([1, 5]), np.array([4, 8])
    got = future_loss(logits, ITEMS, starts, ends, SumRetrievalConfig(targets_per_cut=1))
    torch.testing.assert_close(got, F.cross_entropy(logits, torch.tensor([1, 0])))


def test_later_targets_are_weighted_and_stop_at_the_end_of_training() -> None:
    logits = torch.randn(2, 7)
    # row 0: targets at 1, 2, 3 (end 4); row 1: targets at 6 only (end 7)
    starts, ends = np.array([1, 6]), np.array([4, 7])
    config = SumRetrievalConfig(targets_per_cut=3, future_decay=0.5)
    got = future_loss(logits, ITEMS, starts, ends, config)
    ce = lambda row, item: F.cross_entropy(logits[row : row + 1], torch.tensor([item]))  # noqa: E731
    expected = (ce(0, 1) + ce(1, 2) + 0.5 * ce(0, 4) + 0.25 * ce(0, 1)) / (1 + 1 + 0.5 + 0.25)
    torch.testing.assert_close(got, expected)
