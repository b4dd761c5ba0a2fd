"""SASRec (Kang & McAuley, 2018), the baseline of the MovieLens-1M table.

Causal self-attention over the last ``max_length`` items, learned positions
counted back from the most recent item, item embeddings tied between input and
output. Trained as in Klenitskiy & Vasilev (RecSys 2023): at every position, a full
softmax cross-entropy over all items for the next one (no negative sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.fit import FitConfig, FitResult, fit
from models.retrieval_eval import metrics_from_ranks, ranks_by_embeddings

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class SASRecConfig:
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    max_length: int = 200
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, blocked: Tensor, padding: Tensor) -> Tensor:
        q = self.norm1(x)
        attended, _ = self.attention(q, x, x, attn_mask=blocked, need_weights=False)
        x = q + self.drop(attended)  # the original's residual on the normalized query
        out: Tensor = x + self.drop(self.ffn(self.norm2(x)))
        return out * (~padding).unsqueeze(-1)


class SASRec(nn.Module):
    """Item index sequences (1-based, 0 = padding, left-padded) -> hidden states."""

    def __init__(self, num_items: int, config: SASRecConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.item = nn.Embedding(num_items + 1, cfg.hidden, padding_idx=0)
        self.position = nn.Embedding(cfg.max_length, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            _Block(cfg.hidden, cfg.heads, cfg.dropout) for _ in range(cfg.blocks)
        )
        self.norm = nn.LayerNorm(cfg.hidden)
        # tied output: N(0, 1) item vectors would start the softmax at logits of ~+-30
        nn.init.xavier_normal_(self.item.weight)
        nn.init.xavier_normal_(self.position.weight)

    def forward(self, sequences: Tensor) -> Tensor:
        n = sequences.shape[1]
        padding = sequences == 0
        positions = torch.arange(self.config.max_length - n, self.config.max_length)
        x = self.item(sequences) * self.config.hidden**0.5 + self.position(positions)
        x = self.drop(x) * (~padding).unsqueeze(-1)
        # No future keys, no padding keys, but always the position itself (else a padded
        # query attends to nothing and its NaN leaks through the values of the next block).
        future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        blocked = (future | padding[:, None, :]) & ~torch.eye(n, dtype=torch.bool)
        blocked = blocked.repeat_interleave(self.config.heads, dim=0)
        for block in self.blocks:
            x = block(x, blocked, padding)
        out: Tensor = self.norm(x)
        return out

    def item_embeddings(self) -> Tensor:
        return self.item.weight[1:]


def left_padded(
    indptr: IntArray, items: IntArray, users: IntArray, length: int
) -> npt.NDArray[np.int64]:
    """[len(users), <=length] the last ``length`` items (1-based) of each user, left-padded
    to the longest one in the batch."""
    tails = [items[max(indptr[u], indptr[u + 1] - length) : indptr[u + 1]] + 1 for u in users]
    width = max((len(t) for t in tails), default=0)
    out = np.zeros((len(users), max(width, 1)), dtype=np.int64)
    for row, tail in enumerate(tails):
        if len(tail):
            out[row, out.shape[1] - len(tail) :] = tail
    return out


@torch.no_grad()
def user_embeddings(
    model: SASRec, indptr: IntArray, items: IntArray, batch_size: int = 256
) -> npt.NDArray[np.float32]:
    """Hidden state after each user's whole input sequence (its last position)."""
    model.eval()
    out = []
    for start in range(0, len(indptr) - 1, batch_size):
        users = np.arange(start, min(start + batch_size, len(indptr) - 1))
        batch = torch.as_tensor(left_padded(indptr, items, users, model.config.max_length))
        out.append(model(batch)[:, -1, :].numpy())
    return np.concatenate(out).astype(np.float32)


def train_sasrec(
    num_items: int,
    train_indptr: IntArray,
    train_items: IntArray,
    valid_targets: IntArray,
    config: SASRecConfig,
    fit_config: FitConfig,
) -> tuple[SASRec, FitResult]:
    """Train on each user's training items; early-stop on validation NDCG@10, where the
    validation target is ranked after the training items with them filtered out."""
    torch.manual_seed(config.seed)
    model = SASRec(num_items, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.98))
    rng = np.random.default_rng(config.seed)
    users = np.flatnonzero(np.diff(train_indptr) >= 2)

    def train_epoch(_: int) -> float:
        model.train()
        losses = []
        for batch_users in np.array_split(
            rng.permutation(users), max(1, -(-len(users) // config.batch_size))
        ):
            seqs = left_padded(train_indptr, train_items, batch_users, config.max_length + 1)
            inputs, labels = torch.as_tensor(seqs[:, :-1]), torch.as_tensor(seqs[:, 1:])
            hidden = model(inputs)
            valid = (labels > 0) & (inputs > 0)
            logits = hidden[valid] @ model.item_embeddings().T
            loss = F.cross_entropy(logits, labels[valid] - 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    def validate() -> dict[str, float]:
        vectors = user_embeddings(model, train_indptr, train_items)
        items = model.item_embeddings().detach().numpy()
        ranks = ranks_by_embeddings(vectors, items, valid_targets, train_indptr, train_items)
        return metrics_from_ranks(ranks)

    return model, fit(model, train_epoch, validate, fit_config, "sasrec")
