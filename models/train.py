"""Training loop of the mix tower: seeded, progress bar, held-out AUC/NE, early stopping."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from models.examples import Examples, shown_pairs
from models.metrics import auc, normalized_entropy
from models.mix_tower import MixTower, multitask_loss, retrieval_loss
from models.user_tower import INPUT_NAMES, TowerConfig, UserTower
from service.core.tensors import InputSchema

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-5
    eval_every: int = 100  # steps between held-out evaluations
    patience: int = 3  # evaluations without improvement before stopping
    max_steps: int | None = None
    seed: int = 0
    threads: int = 2
    progress: bool = True
    # Weight of the catalogue softmax (next clicked item among all items) next to the
    # click/like BCE; 0 trains on impressions only (u . v then ranks P(click | shown)).
    retrieval_weight: float = 0.3


@dataclass
class TrainResult:
    model: MixTower
    valid: dict[str, float]  # held-out metrics of the kept (best) model
    history: list[dict[str, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    stopped_early: bool = False


class Catalogue:
    """Distinct (item, category) pairs shown in training: the retrieval softmax's items."""

    def __init__(self, examples: Examples, item_buckets: int) -> None:
        pairs = shown_pairs(examples)
        self.items = torch.as_tensor(pairs[:, 0])
        self.categories = torch.as_tensor(pairs[:, 1])
        lookup = np.full(item_buckets, -1, dtype=np.int64)
        lookup[pairs[:, 0]] = np.arange(len(pairs))  # a hash collision keeps one pair
        self.lookup = torch.as_tensor(lookup)


class ExampleTensors:
    """Examples as torch tensors, converted once."""

    def __init__(self, examples: Examples) -> None:
        self.features = [torch.as_tensor(examples.features[name]) for name in INPUT_NAMES]
        self.items = torch.as_tensor(examples.items)
        self.categories = torch.as_tensor(examples.categories)
        self.mask = torch.as_tensor(examples.impression_mask)
        self.clicks = torch.as_tensor(examples.clicks)
        self.likes = torch.as_tensor(examples.likes)
        self.size = len(examples)

    def clicked_in(self, catalogue: Catalogue) -> torch.Tensor:
        """[S, K] catalogue index of every clicked impression, -1 elsewhere."""
        index = catalogue.lookup[self.items]
        return torch.where((self.clicks > 0) & (index >= 0), index, torch.full_like(index, -1))

    def batch(self, rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        return [f[rows] for f in self.features], self.items[rows], self.categories[rows]


@torch.no_grad()
def predict(
    model: MixTower, data: ExampleTensors, batch_size: int = 2048
) -> npt.NDArray[np.float32]:
    """[S, K, tasks] probabilities."""
    model.eval()
    out = []
    for start in range(0, data.size, batch_size):
        rows = torch.arange(start, min(start + batch_size, data.size))
        out.append(torch.sigmoid(model(*data.batch(rows))))
    model.train()
    if not out:
        return np.zeros((0, data.items.shape[1], 2), dtype=np.float32)
    return torch.cat(out).numpy()


def evaluate_probs(
    probs: npt.NDArray[np.float32], examples: Examples, prefix: str = ""
) -> dict[str, float]:
    """AUC and NE for click (and like) over real impressions."""
    seen = examples.impression_mask > 0
    metrics = {
        f"{prefix}click_auc": auc(examples.clicks[seen], probs[..., 0][seen]),
        f"{prefix}click_ne": normalized_entropy(examples.clicks[seen], probs[..., 0][seen]),
    }
    if probs.shape[-1] > 1:
        metrics[f"{prefix}like_auc"] = auc(examples.likes[seen], probs[..., 1][seen])
        metrics[f"{prefix}like_ne"] = normalized_entropy(examples.likes[seen], probs[..., 1][seen])
    return metrics


def train(
    train_set: Examples,
    valid_set: Examples,
    schema: InputSchema,
    tower: TowerConfig | None = None,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Train from a seed; keep the state with the best held-out click NE."""
    cfg = config or TrainConfig()
    torch.set_num_threads(max(1, min(cfg.threads, 2)))
    torch.manual_seed(cfg.seed)
    model = MixTower(UserTower(schema, tower))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data, valid = ExampleTensors(train_set), ExampleTensors(valid_set)
    catalogue = Catalogue(train_set, schema.item_buckets)
    clicked = data.clicked_in(catalogue)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(1, -(-data.size // cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    result = TrainResult(model=model, valid={})
    best_ne, best_state, bad = float("inf"), copy.deepcopy(model.state_dict()), 0
    bar = tqdm(total=total, disable=not cfg.progress, desc="train", unit="step")
    step = 0
    while step < total and not result.stopped_early:
        order = torch.randperm(data.size, generator=generator)
        for rows in torch.split(order, cfg.batch_size):
            features, items, categories = data.batch(rows)
            users = model.user_tower(*features)
            logits = model.score(users, model.item_tower(items, categories))
            loss = multitask_loss(logits, data.clicks[rows], data.likes[rows], data.mask[rows])
            if cfg.retrieval_weight > 0:
                vectors = model.item_tower(catalogue.items, catalogue.categories)
                loss = loss + cfg.retrieval_weight * retrieval_loss(
                    users, vectors, clicked[rows], model.retrieval_scale
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            result.losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            if step % cfg.eval_every == 0 or step == total:
                metrics = evaluate_probs(predict(model, valid), valid_set, "valid_")
                metrics["step"] = float(step)
                result.history.append(metrics)
                bar.set_postfix(
                    loss=f"{np.mean(result.losses[-cfg.eval_every :]):.4f}",
                    auc=f"{metrics['valid_click_auc']:.4f}",
                    ne=f"{metrics['valid_click_ne']:.4f}",
                )
                log.info(
                    "event=train_eval %s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                )
                if metrics["valid_click_ne"] < best_ne - 1e-4:
                    best_ne, bad = metrics["valid_click_ne"], 0
                    best_state = copy.deepcopy(model.state_dict())
                    result.valid = metrics
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        result.stopped_early = True
                        break
            if step >= total:
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    result.steps = step
    return result
