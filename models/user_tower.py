"""SUM-style user tower: many heterogeneous user features in, one compact embedding out.

Inputs are exactly the tensors of ``service.core.tensors.assemble`` (the worker's), so
training and serving cannot disagree. Sparse history (item, category, event type,
age of each of the last L events, padding mask) goes through a masked
self-attention encoder: interests drift and jump, so *which* recent events matter
depends on the others and on their age, which a bag-of-events cannot express. The
pooled sequence and the decayed counters (dense) meet in DCN-v2 cross layers, then a
pyramid MLP with residual connections produces the L2-normalized embedding.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.core.tensors import InputSchema

Encoder = Literal["attention", "pool", "none"]
INPUT_NAMES = ("item_ids", "category_ids", "event_types", "ages", "mask", "counters")
_MASKED = -1e4  # finite, so a user without history gets uniform (then masked) weights


@dataclass(frozen=True, slots=True)
class TowerConfig:
    """Sizes of the user tower. ``encoder`` selects the ablations of the report."""

    embed_dim: int = 32
    heads: int = 2
    layers: int = 1
    cross_layers: int = 2
    mlp: tuple[int, ...] = (256, 192)
    output_dim: int = 128
    dropout: float = 0.0
    encoder: Encoder = "attention"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block with a key padding mask; plain ops so it exports to ONNX."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)

        def split(t: Tensor) -> Tensor:
            heads: Tensor = t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
            return heads

        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(self.head_dim)
        scores = scores + (1.0 - mask)[:, None, None, :] * _MASKED
        attended = torch.softmax(scores, dim=-1) @ split(v)
        x = x + self.drop(self.out(attended.transpose(1, 2).reshape(b, n, d)))
        out: Tensor = x + self.drop(self.ffn(self.norm2(x)))
        return out


class CrossLayer(nn.Module):
    """DCN-v2: x_{l+1} = x0 * (W x_l + b) + x_l (explicit bounded-degree interactions)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.linear.weight, std=0.01)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        out: Tensor = x0 * self.linear(x) + x
        return out


class ResidualBlock(nn.Module):
    """One level of the pyramid: LayerNorm(GELU(W h) + P h), P a projection when sizes differ."""

    def __init__(self, dim_in: int, dim_out: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.skip: nn.Module = (
            nn.Identity() if dim_in == dim_out else nn.Linear(dim_in, dim_out, bias=False)
        )
        self.norm = nn.LayerNorm(dim_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        out: Tensor = self.norm(self.drop(F.gelu(self.linear(h))) + self.skip(h))
        return out


class UserTower(nn.Module):
    """assemble() tensors -> [batch, output_dim] unit vectors."""

    def __init__(self, schema: InputSchema, config: TowerConfig | None = None) -> None:
        super().__init__()
        self.schema = schema
        self.config = cfg = config or TowerConfig()
        d = cfg.embed_dim
        self.item = nn.Embedding(schema.item_buckets, d, padding_idx=0)
        self.category = nn.Embedding(schema.category_buckets, d, padding_idx=0)
        self.event_type = nn.Embedding(schema.num_event_types + 1, d, padding_idx=0)
        self.age = nn.Linear(1, d)
        # Positions count back from the most recent event (histories are left-padded).
        self.position = nn.Parameter(torch.zeros(schema.history_length, d))
        # Ids must dominate the event vectors at the start: with small id tables the type
        # and age terms (shared by all users) swamp them, and every user starts out with
        # the same embedding (a collapse the optimizer is slow to leave).
        nn.init.normal_(self.item.weight, std=1.0)
        nn.init.normal_(self.category.weight, std=1.0)
        nn.init.normal_(self.event_type.weight, std=0.3)
        nn.init.normal_(self.age.weight, std=0.1)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(d, cfg.heads, cfg.dropout)
            for _ in range(cfg.layers if cfg.encoder == "attention" else 0)
        )
        self.seq_norm = nn.LayerNorm(d)
        self.dense = nn.Sequential(nn.Linear(schema.num_counters, d), nn.GELU())
        width = d * (3 if cfg.encoder != "none" else 1)
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(cfg.cross_layers))
        sizes = [width, *cfg.mlp]
        self.pyramid = nn.Sequential(
            *(ResidualBlock(a, b, cfg.dropout) for a, b in itertools.pairwise(sizes))
        )
        self.head = nn.Linear(sizes[-1], cfg.output_dim)

    def _sequence(
        self,
        item_ids: Tensor,
        category_ids: Tensor,
        event_types: Tensor,
        ages: Tensor,
        mask: Tensor,
    ) -> Tensor:
        """[batch, 2d]: masked mean and most recent position of the encoded history."""
        x = (
            self.item(item_ids)
            + self.category(category_ids)
            + self.event_type(event_types)
            + self.age(ages.unsqueeze(-1))
            + self.position
        )
        for block in self.blocks:
            x = block(x, mask)
        x = self.seq_norm(x) * mask.unsqueeze(-1)
        count = mask.sum(dim=1, keepdim=True)
        mean = x.sum(dim=1) / count.clamp(min=1.0)
        last = x[:, -1, :]  # zero when the user has no history (mask applied above)
        return torch.cat([mean, last], dim=-1)

    def forward(
        self,
        item_ids: Tensor,
        category_ids: Tensor,
        event_types: Tensor,
        ages: Tensor,
        mask: Tensor,
        counters: Tensor,
    ) -> Tensor:
        dense = self.dense(counters)
        if self.config.encoder == "none":
            x0 = dense
        else:
            x0 = torch.cat(
                [self._sequence(item_ids, category_ids, event_types, ages, mask), dense], dim=-1
            )
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        out = self.head(self.pyramid(x))
        return F.normalize(out, dim=-1, eps=1e-6)


def to_torch(tensors: dict[str, object]) -> list[Tensor]:
    """assemble() output -> positional tower arguments, in INPUT_NAMES order."""
    return [torch.as_tensor(tensors[name]) for name in INPUT_NAMES]
