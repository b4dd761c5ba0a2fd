"""A downstream ranker that reads the user embedding as a frozen input feature.

It stands for the hundreds of rankers SUM serves: its own item and category
embeddings, the upstream user embedding (not fine-tuned), their interaction, and a
small MLP to P(click). It is trained once on fresh embeddings and then frozen, so
scoring it with stale, smoothed or retrained-model embeddings shows what those cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from models.metrics import auc, normalized_entropy

Float32Array = npt.NDArray[np.float32]
Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class RankerConfig:
    item_dim: int = 32
    hidden: int = 64
    epochs: int = 4
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-5
    seed: int = 0


class DownstreamRanker(nn.Module):
    """logit = MLP([user, item, W user * item]) with item = E_item + E_category."""

    def __init__(
        self, user_dim: int, item_buckets: int, category_buckets: int, config: RankerConfig
    ) -> None:
        super().__init__()
        d = config.item_dim
        self.items = nn.Embedding(item_buckets, d)
        self.categories = nn.Embedding(category_buckets, d)
        self.user_proj = nn.Linear(user_dim, d)
        self.mlp = nn.Sequential(
            nn.Linear(user_dim + 2 * d, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1)
        )

    def forward(self, users: Tensor, items: Tensor, categories: Tensor) -> Tensor:
        item = self.items(items) + self.categories(categories)
        joint = torch.cat([users, item, self.user_proj(users) * item], dim=-1)
        logits: Tensor = self.mlp(joint).squeeze(-1)
        return logits


@dataclass(frozen=True, slots=True)
class RankerData:
    """Row-aligned ranker inputs and labels."""

    users: Float32Array  # [N, d] user embeddings
    items: Int64Array
    categories: Int64Array
    clicked: Float32Array


def train_ranker(
    data: RankerData, item_buckets: int, category_buckets: int, config: RankerConfig
) -> DownstreamRanker:
    """Minimize click BCE over ``config.epochs`` passes; seeded, returns the model in eval mode."""
    torch.manual_seed(config.seed)
    model = DownstreamRanker(data.users.shape[1], item_buckets, category_buckets, config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    users, items = torch.as_tensor(data.users), torch.as_tensor(data.items)
    categories, labels = torch.as_tensor(data.categories), torch.as_tensor(data.clicked)
    generator = torch.Generator().manual_seed(config.seed)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(config.epochs):
        for rows in torch.split(
            torch.randperm(len(labels), generator=generator), config.batch_size
        ):
            loss = loss_fn(model(users[rows], items[rows], categories[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def click_probabilities(model: DownstreamRanker, data: RankerData) -> Float32Array:
    logits = model(
        torch.as_tensor(data.users), torch.as_tensor(data.items), torch.as_tensor(data.categories)
    )
    probabilities: Float32Array = torch.sigmoid(logits).numpy()
    return probabilities


def ranker_metrics(model: DownstreamRanker, data: RankerData) -> dict[str, float]:
    """Click AUC and NE of ``model`` on ``data``."""
    p = click_probabilities(model, data)
    return {"auc": auc(data.clicked, p), "ne": normalized_entropy(data.clicked, p)}
