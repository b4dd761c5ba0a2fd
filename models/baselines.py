"""Popularity baselines: what a model must beat to be worth serving."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from models.examples import Examples


class PopularityBaseline:
    """Per-item CTR (like rate) from training impressions, smoothed towards the global rate.

    It ignores the user, so it is the floor for ranking (AUC) and calibration (NE).
    Its top items by clicks are the popularity baseline for retrieval.
    """

    def __init__(self, train_set: Examples, item_buckets: int, prior: float = 20.0) -> None:
        seen = train_set.impression_mask > 0
        items = train_set.items[seen]
        shows = np.bincount(items, minlength=item_buckets).astype(np.float64)
        self.clicks = np.bincount(items, train_set.clicks[seen], minlength=item_buckets)
        likes = np.bincount(items, train_set.likes[seen], minlength=item_buckets)
        click_rate = train_set.clicks[seen].mean()
        like_rate = train_set.likes[seen].mean()
        self.click_ctr = (self.clicks + prior * click_rate) / (shows + prior)
        self.like_ctr = (likes + prior * like_rate) / (shows + prior)

    def predict(self, examples: Examples) -> npt.NDArray[np.float32]:
        """[S, K, 2] probabilities, like ``models.train.predict``."""
        stacked = np.stack([self.click_ctr[examples.items], self.like_ctr[examples.items]], -1)
        return stacked.astype(np.float32)

    def retrieval_scores(self, items: npt.NDArray[np.int64], rows: int) -> npt.NDArray[np.float64]:
        """Scores of ``items`` by training clicks, the same for every one of ``rows`` users."""
        return np.broadcast_to(self.clicks[items].astype(np.float64), (rows, items.size))
