"""Sections 2-4 of the report: what fresh, stabilized and aligned embeddings are worth
to a downstream ranker, on the synthetic world in simulated time.

One world, two trained SUM versions published to a private registry (v2 is a retrain
of v1 with another seed, aligned to it by the registry's Procrustes fit), and a
downstream ranker trained on v1's fresh embeddings and then frozen. Every embedding
goes through the service's own code: ``apply_events`` -> ``assemble`` -> the served
ONNX model -> ``stabilize``; only the clock is simulated (see models/impressions.py).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.alignment import mean_cosine
from models.dataset import DataConfig, Dataset, load_dataset
from models.downstream import RankerConfig, RankerData, ranker_metrics, train_ranker
from models.impressions import Embedder, ImpressionLog, embed_as_of, impressions_from_events
from models.metrics import auc_standard_error
from models.pipeline import RunConfig, TrainingRun, publish_run, run_training
from models.registry import load_manifest
from models.train import TrainConfig
from models.world import DAY_MS, World, WorldConfig
from service.core.events import Event
from service.core.stabilization import StabilizationConfig, stabilize
from service.core.tensors import InputSchema
from service.evaluation.config import STALENESS_MS, OfflineConfig
from service.worker.serving_model import ServingModel, load_serving_model

log = logging.getLogger(__name__)
Float32Array = npt.NDArray[np.float32]
Progress = Callable[[str, float], None]
Score = Callable[[Float32Array], tuple[float, float]]
V1, V2 = "eval-v1", "eval-v2"


@dataclass(frozen=True, slots=True)
class Scored:
    """A ranker's click AUC and NE on the held-out impressions."""

    name: str
    auc: float
    ne: float


@dataclass(frozen=True, slots=True)
class StalenessRow:
    label: str
    staleness_ms: int
    auc: float
    ne: float
    mean_cosine_to_fresh: float  # how far the stale embedding is from the fresh one
    share_missing_events: float  # impressions whose user had events the stale one lacks


@dataclass(frozen=True, slots=True)
class StabilizationRow:
    name: str
    time_constant_s: float | None  # None: stabilization off (the raw model output)
    jitter_mean: float  # 1 - cosine between consecutive serves of a user
    jitter_p90: float
    pairs: int
    auc: float
    ne: float
    mean_cosine_to_fresh: float


@dataclass(frozen=True, slots=True)
class Drift:
    mean_cosine_unaligned: float  # v1 vs v2 embeddings of the same impressions
    mean_cosine_aligned: float
    fit_sample_size: int  # users the registry fitted the rotation on
    fit_mean_cosine_before: float
    fit_mean_cosine_after: float


@dataclass(frozen=True, slots=True)
class OfflineResults:
    config: dict[str, object]
    world: dict[str, int]
    models: dict[str, dict[str, float]]  # version -> held-out test metrics of the SUM model
    impressions: dict[str, float]  # counts and click rates of the ranker's train / eval sets
    no_user_embedding: Scored  # the same ranker without the user embedding: the floor
    freshness: list[StalenessRow]
    stabilization: list[StabilizationRow]
    stabilization_settings: dict[str, float]
    retrain: list[Scored]
    drift: Drift
    seconds: float

    @property
    def eval_clicks(self) -> tuple[int, int]:
        """Clicked and not-clicked impressions of the held-out day every AUC is scored on."""
        n = round(self.impressions["eval"])
        positives = round(n * self.impressions["eval_click_rate"])
        return positives, n - positives

    def auc_error(self, auc: float) -> float:
        """Standard error of one AUC on the held-out impressions (Hanley-McNeil)."""
        return auc_standard_error(auc, *self.eval_clicks)


def run_offline(config: OfflineConfig, progress: Progress | None = None) -> OfflineResults:
    """Train both versions and the ranker, then measure sections 2-4."""
    started = time.perf_counter()
    report = progress or (lambda stage, fraction: None)
    world = WorldConfig(users=config.users, days=config.days, seed=config.world_seed)
    report("offline: simulate the world", 0.0)
    events = World(world).simulate()
    data_config = DataConfig(world=world)
    data = load_dataset(data_config)
    schema = data_config.schema
    with tempfile.TemporaryDirectory(prefix="userembed-eval-registry-") as tmp:
        registry = Path(tmp)
        runs = _train_versions(config, data_config, data, registry, report)
        v1 = load_serving_model(registry, V1, precision="fp32")
        v2_aligned = load_serving_model(registry, V2, precision="fp32")
        v2 = ServingModel.unaligned(v2_aligned.runtime)
        to_v1 = v2_aligned.to_space
        if to_v1 is None:
            raise RuntimeError(f"{V2} was published without an alignment to {V1}")
        ranker_set, eval_set = _impression_sets(events, world, config, schema)
        replay = _replay_progress(report, len(ranker_set) + len(STALENESS_MS) * len(eval_set))
        fresh = _embed(
            events, [ranker_set, eval_set], 0, schema, {"v1": v1.embed, "v2": v2.embed}, replay
        )
        stale = {
            ms: _embed(events, [eval_set], ms, schema, {"v1": v1.embed}, replay)["v1"]
            for _, ms in STALENESS_MS
            if ms
        }
        report("offline: train the downstream rankers", 0.85)
        n_train = len(ranker_set)
        ranker_config = RankerConfig(epochs=config.ranker_epochs)
        buckets = (schema.item_buckets, schema.category_buckets)

        def fit(users: Float32Array) -> Score:
            model = train_ranker(_ranker_data(ranker_set, users), *buckets, ranker_config)

            def score(eval_users: Float32Array) -> tuple[float, float]:
                m = ranker_metrics(model, _ranker_data(eval_set, eval_users))
                return m["auc"], m["ne"]

            return score

        v1_fresh, v2_fresh = fresh["v1"][n_train:], fresh["v2"][n_train:]
        ranker_v1 = fit(fresh["v1"][:n_train])
        ranker_v2 = fit(fresh["v2"][:n_train])
        blind = fit(np.zeros_like(fresh["v1"][:n_train]))(np.zeros_like(v1_fresh))
        report("offline: score staleness, stabilization and retrains", 0.95)
        missed = _events_missed(events, eval_set)
        freshness = [
            _staleness_row(label, ms, ranker_v1, v1_fresh, stale.get(ms, v1_fresh), missed(ms))
            for label, ms in STALENESS_MS
        ]
        stabilization = [
            _stabilization_row(None, eval_set, v1_fresh, ranker_v1),
            *(
                _stabilization_row(tau, eval_set, v1_fresh, ranker_v1)
                for tau in config.stabilization_time_constants_s
            ),
        ]
        aligned = (v2_fresh @ to_v1).astype(np.float32)
        retrain = [
            Scored(f"{V1} embeddings, ranker trained on {V1} (reference)", *ranker_v1(v1_fresh)),
            Scored(f"{V2} unaligned, ranker trained on {V1}", *ranker_v1(v2_fresh)),
            Scored(f"{V2} aligned (Procrustes), ranker trained on {V1}", *ranker_v1(aligned)),
            Scored(f"{V2}, ranker retrained on {V2} (upper bound)", *ranker_v2(v2_fresh)),
        ]
        manifest_alignment = _alignment_stats(registry)
    report("offline: done", 1.0)
    return OfflineResults(
        config=asdict(config),
        world=asdict(world),
        models={v: {k: round(x, 5) for k, x in r.test_metrics.items()} for v, r in runs.items()},
        impressions={
            "ranker_train": float(len(ranker_set)),
            "ranker_train_click_rate": float(ranker_set.clicked.mean()),
            "eval": float(len(eval_set)),
            "eval_click_rate": float(eval_set.clicked.mean()),
            "eval_users": float(np.unique(eval_set.users).size),
        },
        no_user_embedding=Scored("no user embedding (item features only)", *blind),
        freshness=freshness,
        stabilization=stabilization,
        stabilization_settings={
            k: float(v)
            for k, v in asdict(StabilizationConfig()).items()
            if k in ("min_weight", "max_step")
        },
        retrain=retrain,
        drift=Drift(
            mean_cosine(v1_fresh, v2_fresh),
            mean_cosine(v1_fresh, aligned),
            *manifest_alignment,
        ),
        seconds=time.perf_counter() - started,
    )


def _train_versions(
    config: OfflineConfig,
    data_config: DataConfig,
    data: Dataset,
    registry: Path,
    report: Progress,
) -> dict[str, TrainingRun]:
    """Train v1 and its retrain v2 (another seed) on the same examples; publish v2 with
    v1 as its parent, so the registry fits the alignment as it does in production."""
    runs: dict[str, TrainingRun] = {}
    for seed, version in enumerate((V1, V2)):
        report(f"offline: train SUM model {version}", 0.05 + 0.3 * seed)
        train = TrainConfig(
            epochs=config.train_epochs, max_steps=config.train_max_steps, seed=seed, progress=False
        )
        runs[version] = run_training(RunConfig(data=data_config, train=train), data)
        publish_run(runs[version], registry, version, parent=V1 if seed else None)
    return runs


def _impression_sets(
    events: list[Event], world: WorldConfig, config: OfflineConfig, schema: InputSchema
) -> tuple[ImpressionLog, ImpressionLog]:
    """(ranker training sample: days 2..N-1, evaluation: whole users of the last day)."""
    impressions = impressions_from_events(events, schema)
    eval_start = world.start_ms + (world.days - 1) * DAY_MS
    ranker_set = impressions.between(world.start_ms + DAY_MS, eval_start)
    eval_set = impressions.between(eval_start, world.start_ms + world.days * DAY_MS)
    return (
        ranker_set.sample(config.ranker_train_impressions),
        _whole_users(eval_set, config.eval_impressions),
    )


def _replay_progress(report: Progress, total: int) -> Callable[[int], None]:
    """Advance the replay stage (0.65 -> 0.85 of the offline part) by embedded rows."""
    done = 0

    def advance(rows: int) -> None:
        nonlocal done
        done += rows
        report("offline: replay feature states and embed", 0.65 + 0.2 * done / max(total, 1))

    return advance


def _whole_users(impressions: ImpressionLog, limit: int, seed: int = 0) -> ImpressionLog:
    """Whole users (random order) until ``limit`` impressions: serve sequences stay intact."""
    users = np.unique(impressions.users)
    np.random.default_rng(seed).shuffle(users)
    counts = np.bincount(impressions.users, minlength=int(users.max(initial=0)) + 1)[users]
    keep = users[: int(np.searchsorted(np.cumsum(counts), limit, side="right")) or 1]
    return impressions.take(np.flatnonzero(np.isin(impressions.users, keep)))


def _embed(
    events: list[Event],
    sets: list[ImpressionLog],
    staleness_ms: int,
    schema: InputSchema,
    embedders: dict[str, Embedder],
    on_progress: Callable[[int], None],
) -> dict[str, Float32Array]:
    """Embeddings of every impression of ``sets`` (concatenated) as computed
    ``staleness_ms`` before it was shown."""
    user_ids = [s.user_ids[u] for s in sets for u in s.users.tolist()]
    times = np.concatenate([s.times for s in sets]) - staleness_ms
    return embed_as_of(events, user_ids, times, schema, embedders, on_progress=on_progress)


def _ranker_data(impressions: ImpressionLog, users: Float32Array) -> RankerData:
    return RankerData(users, impressions.items, impressions.categories, impressions.clicked)


def _staleness_row(
    label: str, ms: int, score: Score, fresh: Float32Array, served: Float32Array, missed: float
) -> StalenessRow:
    auc, ne = score(served)
    return StalenessRow(label, ms, auc, ne, mean_cosine(served, fresh), missed)


def _events_missed(events: list[Event], impressions: ImpressionLog) -> Callable[[int], float]:
    """staleness -> share of impressions whose user had events in [t - staleness, t)."""
    wanted = set(impressions.user_ids[u] for u in np.unique(impressions.users).tolist())
    stamps: dict[str, list[int]] = {u: [] for u in wanted}
    for e in events:
        if e.user_id in wanted:
            stamps[e.user_id].append(e.ts)
    sorted_ts = {u: np.sort(np.asarray(t, dtype=np.int64)) for u, t in stamps.items()}

    def share(staleness_ms: int) -> float:
        if not staleness_ms or not len(impressions):
            return 0.0
        hits = 0
        for u, t in zip(impressions.users.tolist(), impressions.times.tolist(), strict=True):
            ts = sorted_ts[impressions.user_ids[u]]
            hits += bool(np.searchsorted(ts, t, "left") > np.searchsorted(ts, t - staleness_ms))
        return hits / len(impressions)

    return share


def _stabilization_row(
    tau: float | None, impressions: ImpressionLog, fresh: Float32Array, score: Score
) -> StabilizationRow:
    """Serve each user's impressions in time order, each from the freshly computed
    embedding, stabilized against the previous serve (or not, for ``tau=None``)."""
    order = np.lexsort((impressions.times, impressions.users))
    users, times = impressions.users[order], impressions.times[order]
    first = np.r_[True, users[1:] != users[:-1]]
    position = np.arange(users.size) - np.maximum.accumulate(
        np.where(first, np.arange(users.size), 0)
    )
    served = fresh[order].copy()
    if tau is not None:
        config = StabilizationConfig(time_constant_s=tau)
        for k in range(1, int(position.max(initial=0)) + 1):
            rows = np.flatnonzero(position == k)
            served[rows] = stabilize(
                fresh[order][rows],
                served[rows - 1],
                times[rows] - times[rows - 1],
                np.ones(rows.size, dtype=bool),
                normalized=True,
                config=config,
            )
    pairs = np.flatnonzero(~first)
    cosine = np.einsum("nd,nd->n", served[pairs], served[pairs - 1]) / np.maximum(
        np.linalg.norm(served[pairs], axis=1) * np.linalg.norm(served[pairs - 1], axis=1), 1e-12
    )
    jitter = 1.0 - cosine
    unsorted = np.empty_like(served)
    unsorted[order] = served
    auc, ne = score(unsorted)
    name = "off (raw model output)" if tau is None else f"on, time constant {tau:g} s"
    return StabilizationRow(
        name,
        tau,
        float(jitter.mean()) if jitter.size else 0.0,
        float(np.percentile(jitter, 90)) if jitter.size else 0.0,
        int(pairs.size),
        auc,
        ne,
        mean_cosine(unsorted, fresh),
    )


def _alignment_stats(registry: Path) -> tuple[int, float, float]:
    alignment = load_manifest(registry, V2).alignment
    if alignment is None:
        raise RuntimeError(f"{V2} has no alignment to {V1} in its manifest")
    return alignment.sample_size, alignment.mean_cosine_before, alignment.mean_cosine_after
