"""Item tower and the mix (interaction) head that train the user tower on clicks and likes.

The head scores [user embedding, item embedding] with a dot product plus an MLP
over the interaction u*v, one logit per task (click, like), trained with BCE. The
MLP deliberately does not see u or v alone: with an item-only path, popularity is
learned there first and the model sits on a popularity plateau, and user . item
(what retrieval ranks by) never learns that popular items are likely clicks.

BCE on impressions alone learns P(click | shown); ``retrieval_loss`` (a softmax over
the whole training catalogue, added by ``models.train`` with ``retrieval_weight``)
makes user . item rank every item for the next click, which is what retrieval needs.
"""

from __future__ import annotations

from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.user_tower import UserTower

TASKS: Final = ("click", "like")


class ItemTower(nn.Module):
    """Hashed item id + category -> [.., output_dim] (not normalized: norm carries popularity).

    It shares the id tables of the user tower's history: an item means the same
    thing whether the user saw it or is being shown it, and the user side learns
    from every impression instead of only from histories.
    """

    def __init__(self, item: nn.Embedding, category: nn.Embedding, output_dim: int) -> None:
        super().__init__()
        self.item, self.category = item, category
        embed_dim = item.embedding_dim
        self.mlp = nn.Sequential(
            nn.Linear(2 * embed_dim, 2 * embed_dim), nn.GELU(), nn.Linear(2 * embed_dim, output_dim)
        )

    def forward(self, items: Tensor, categories: Tensor) -> Tensor:
        out: Tensor = self.mlp(torch.cat([self.item(items), self.category(categories)], dim=-1))
        return out


class MixTower(nn.Module):
    """User tower + item tower + multi-task interaction head."""

    def __init__(self, user_tower: UserTower, hidden: int = 64) -> None:
        super().__init__()
        cfg = user_tower.config
        self.user_tower = user_tower
        self.item_tower = ItemTower(user_tower.item, user_tower.category, cfg.output_dim)
        dim = cfg.output_dim
        self.interaction = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, len(TASKS))
        )
        self.dot_scale = nn.Parameter(torch.full((len(TASKS),), 8.0))
        self.bias = nn.Parameter(torch.full((len(TASKS),), -1.5))
        # Temperature of the retrieval softmax (``retrieval_loss``); ranking ignores it.
        self.retrieval_scale = nn.Parameter(torch.tensor(8.0))

    def score(self, user: Tensor, item: Tensor) -> Tensor:
        """[B, D] users x [B, K, D] items -> [B, K, tasks] logits."""
        u = user.unsqueeze(1).expand_as(item)
        dot = (u * item).sum(dim=-1, keepdim=True)
        mlp: Tensor = self.interaction(u * item)
        return dot * self.dot_scale + mlp + self.bias

    def forward(self, user_inputs: list[Tensor], items: Tensor, categories: Tensor) -> Tensor:
        return self.score(self.user_tower(*user_inputs), self.item_tower(items, categories))


def multitask_loss(
    logits: Tensor, clicks: Tensor, likes: Tensor, mask: Tensor, like_weight: float = 0.5
) -> Tensor:
    """Masked BCE over impressions: click + like_weight * like."""
    click = F.binary_cross_entropy_with_logits(logits[..., 0], clicks, reduction="none")
    like = F.binary_cross_entropy_with_logits(logits[..., 1], likes, reduction="none")
    total = ((click + like_weight * like) * mask).sum() / mask.sum().clamp(min=1.0)
    return total


def retrieval_loss(
    users: Tensor, catalogue: Tensor, clicked: Tensor, scale: Tensor | float = 1.0
) -> Tensor:
    """Full softmax over the catalogue: -log P(clicked item | user), P by ``scale * u . v``.

    ``users`` [B, D], ``catalogue`` [N, D] (item tower over every training item),
    ``clicked`` [B, K] catalogue indices of each session's clicked items, -1 = none.
    The softmax runs over every item (no sampling, so no logQ correction is needed):
    ``u . v`` learns which item is clicked next among all items, exposure included,
    which is what retrieval ranks by. Mean over (session, clicked item) pairs.
    """
    log_probs = torch.log_softmax(scale * users @ catalogue.T, dim=-1)
    valid = clicked >= 0
    picked = log_probs.gather(1, clicked.clamp(min=0))
    return -(picked * valid).sum() / valid.sum().clamp(min=1)
