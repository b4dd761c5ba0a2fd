"""A seeded synthetic world with ground truth, standing in for real logs.

Items have latent vectors clustered by category and a quality bias; users have a
latent interest vector that drifts slowly (a Gaussian random walk on the sphere)
and sometimes jumps towards a new category. Every impression comes from a simple
candidate generator (half personalized by category, half popular items) and is
clicked with probability ``sigmoid(a * <interest, item> + quality + b)``. The
world speaks the service's event contract, so the same generator feeds training
(:meth:`World.simulate`), the demo and the load tests (:meth:`World.events`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from service.core.events import Event, EventType

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
DAY_MS: Final = 86_400_000
# 2023-11-14: a fixed epoch so the same seed gives the same events.
DEFAULT_START_MS: Final = 1_700_000_000_000


@dataclass(frozen=True, slots=True)
class WorldConfig:
    """Size and dynamics of the world. Items depend only on the item fields and seed."""

    users: int = 2_000
    items: int = 5_000
    categories: int = 50
    latent_dim: int = 16
    days: int = 14
    sessions_per_day: float = 1.5
    impressions_per_session: int = 10
    item_noise: float = 0.5  # norm of an item's own direction, relative to its category's
    drift_per_day: float = 0.2
    jump_rate_per_day: float = 0.1
    affinity_scale: float = 5.0
    click_bias: float = -2.5
    start_ms: int = DEFAULT_START_MS
    seed: int = 0


def _normalize(x: FloatArray) -> FloatArray:
    out: FloatArray = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return out


def _sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = 1.0 / (1.0 + np.exp(-x))
    return out


@dataclass(frozen=True, slots=True)
class Impressions:
    """A vectorized batch of impressions and the user's reactions to them."""

    users: IntArray
    items: IntArray
    clicked: npt.NDArray[np.bool_]
    liked: npt.NDArray[np.bool_]
    purchased: npt.NDArray[np.bool_]
    hidden: npt.NDArray[np.bool_]


class World:
    """Ground truth: item vectors, user interests over time, the choice model."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = cfg = config or WorldConfig()
        item_seq, user_seq, event_seq = np.random.SeedSequence(cfg.seed).spawn(3)
        item_rng = np.random.default_rng(item_seq)
        self._rng = np.random.default_rng(event_seq)
        d = cfg.latent_dim
        self.centroids = _normalize(item_rng.standard_normal((cfg.categories, d)))
        self.item_category = np.arange(cfg.items, dtype=np.int64) % cfg.categories
        # Noise is scaled by 1/sqrt(d) so its norm, not each coordinate, is item_noise:
        # otherwise idiosyncratic directions drown the categories and nothing generalizes.
        noise = item_rng.standard_normal((cfg.items, d)) * (cfg.item_noise / np.sqrt(d))
        self.item_vectors = _normalize(self.centroids[self.item_category] + noise)
        self.item_quality = item_rng.normal(0.0, 0.7, size=cfg.items)
        # Exposure popularity: Zipf over a random permutation of the items.
        ranks = item_rng.permutation(cfg.items) + 1.0
        exposure = ranks**-1.0
        self._popular_cdf = np.cumsum(exposure / exposure.sum())

        user_rng = np.random.default_rng(user_seq)
        picks = user_rng.integers(0, cfg.categories, size=(cfg.users, 2))
        mix = self.centroids[picks].sum(axis=1) + 0.3 / np.sqrt(d) * user_rng.standard_normal(
            (cfg.users, d)
        )
        self.interests = _normalize(mix)
        self._interest_ms = np.full(cfg.users, cfg.start_ms, dtype=np.int64)
        user_ranks = np.arange(1, cfg.users + 1, dtype=np.float64)
        activity = user_ranks**-0.8
        self._user_cdf = np.cumsum(activity / activity.sum())
        self._next_id = 0
        self._live_offset_ms: int | None = None

    # -- ground truth ---------------------------------------------------------

    def advance(self, users: IntArray, now_ms: int) -> None:
        """Move the interests of ``users`` forward to ``now_ms``: drift plus rare jumps."""
        cfg, rng = self.config, self._rng
        users = np.unique(users)
        dt_days = np.maximum(now_ms - self._interest_ms[users], 0) / DAY_MS
        if not np.any(dt_days > 0):
            return
        steps = rng.standard_normal((users.size, cfg.latent_dim)) / np.sqrt(cfg.latent_dim)
        walked = self.interests[users] + steps * (cfg.drift_per_day * np.sqrt(dt_days))[:, None]
        jumps = rng.random(users.size) < 1.0 - np.exp(-cfg.jump_rate_per_day * dt_days)
        targets = self.centroids[rng.integers(0, cfg.categories, size=users.size)]
        walked = np.where(jumps[:, None], 0.4 * walked + targets, walked)
        self.interests[users] = _normalize(walked)
        self._interest_ms[users] = np.maximum(self._interest_ms[users], now_ms)

    def click_probability(self, users: IntArray, items: IntArray) -> FloatArray:
        """P(click | impression) under the current interests (the ground truth)."""
        cfg = self.config
        affinity = np.einsum("nd,nd->n", self.interests[users], self.item_vectors[items])
        return _sigmoid(cfg.affinity_scale * affinity + self.item_quality[items] + cfg.click_bias)

    def _candidates(self, users: IntArray) -> IntArray:
        """Half personalized (category by interest, item uniform in it), half popular."""
        rng = self._rng
        logits = 4.0 * self.interests[users] @ self.centroids.T
        gumbel = -np.log(-np.log(rng.random(logits.shape)))
        category = np.argmax(logits + gumbel, axis=1)
        per_category = self.config.items // self.config.categories
        personal = category + self.config.categories * rng.integers(0, per_category, users.size)
        popular = np.minimum(
            np.searchsorted(self._popular_cdf, rng.random(users.size)), self.config.items - 1
        )
        return np.where(rng.random(users.size) < 0.5, personal, popular).astype(np.int64)

    def impress(self, users: IntArray) -> Impressions:
        """One impression per entry of ``users`` and the sampled reactions."""
        rng = self._rng
        items = self._candidates(users)
        p_click = self.click_probability(users, items)
        clicked = rng.random(users.size) < p_click
        liked = clicked & (rng.random(users.size) < p_click)
        purchased = clicked & (rng.random(users.size) < 0.1 * p_click)
        hidden = ~clicked & (rng.random(users.size) < 0.05 * (1.0 - p_click))
        return Impressions(users, items, clicked, liked, purchased, hidden)

    # -- events ---------------------------------------------------------------

    def _event(
        self, user: int, ts: int, kind: EventType, item: int, live: bool, tag: str = "i"
    ) -> Event:
        if live:
            event_id = uuid.uuid4().hex
        else:
            event_id = f"w{self.config.seed}-{self._next_id}"
            self._next_id += 1
        return Event(
            event_id=event_id,
            user_id=f"u{user}",
            ts=ts,
            type=kind,
            item_id=f"{tag}{item}",
            category=f"c{int(self.item_category[item]) if tag == 'i' else item}",
        )

    def _reaction_events(
        self, imp: Impressions, times: IntArray, live: bool
    ) -> list[tuple[int, Event]]:
        """(ts, event) for each impression: a view, then click/like/cart+purchase or hide."""
        out: list[tuple[int, Event]] = []
        rows = zip(
            imp.users.tolist(),
            imp.items.tolist(),
            times.tolist(),
            imp.clicked.tolist(),
            imp.liked.tolist(),
            imp.purchased.tolist(),
            imp.hidden.tolist(),
            strict=True,
        )
        scale = 0 if live else 1  # live events all carry the caller's clock
        for user, item, ts, click, like, buy, hide in rows:
            reactions = [(0, EventType.VIEW)]
            if click:
                reactions.append((800, EventType.CLICK))
            if like:
                reactions.append((1500, EventType.LIKE))
            if buy:
                reactions += [(1700, EventType.ADD_TO_CART), (1900, EventType.PURCHASE)]
            if hide:
                reactions.append((600, EventType.HIDE))
            for dt, kind in reactions:
                at = ts + dt * scale
                out.append((at, self._event(user, at, kind, item, live)))
        return out

    def simulate(self) -> list[Event]:
        """``days`` of sessions for every user, ordered by time (deterministic per seed).

        Each session is a few impressions 3 s apart, sometimes opened by a search for
        a category the user currently likes.
        """
        cfg, rng = self.config, self._rng
        k = cfg.impressions_per_session
        timed: list[tuple[int, Event]] = []
        all_users = np.arange(cfg.users, dtype=np.int64)
        for day in range(cfg.days):
            day_ms = cfg.start_ms + day * DAY_MS
            self.advance(all_users, day_ms)
            counts = rng.poisson(cfg.sessions_per_day, size=cfg.users)
            users = np.repeat(all_users, counts)
            starts = day_ms + rng.integers(0, DAY_MS - 60_000, size=users.size)
            imp = self.impress(np.repeat(users, k))
            times = np.repeat(starts, k) + np.tile(
                np.arange(k, dtype=np.int64) * 3_000 + 1_000, len(users)
            )
            timed.extend(self._reaction_events(imp, times, live=False))
            searching = rng.random(users.size) < 0.2
            logits = 4.0 * self.interests[users[searching]] @ self.centroids.T
            wanted = np.argmax(logits - np.log(-np.log(rng.random(logits.shape))), axis=1)
            for user, ts, cat in zip(
                users[searching].tolist(), starts[searching].tolist(), wanted.tolist(), strict=True
            ):
                timed.append((ts, self._event(user, ts, EventType.SEARCH, cat, False, tag="q")))
        timed.sort(key=lambda pair: pair[0])
        return [event for _, event in timed]

    def events(self, count: int, now_ms: int) -> list[Event]:
        """``count`` live events at ``now_ms`` for users u0..u{N-1} (demo and load tests).

        Users are drawn with Zipf-like activity; their interests drift with the clock.
        """
        if count <= 0:
            return []
        rng = self._rng
        if self._live_offset_ms is None:
            # The live clock starts where the simulated days end, so the interests
            # carry on from there instead of drifting across the gap to today.
            self._live_offset_ms = now_ms - (self.config.start_ms + self.config.days * DAY_MS)
        users = np.minimum(
            np.searchsorted(self._user_cdf, rng.random(count)), self.config.users - 1
        ).astype(np.int64)
        self.advance(users, now_ms - self._live_offset_ms)
        imp = self.impress(users)
        timed = self._reaction_events(imp, np.full(count, now_ms, dtype=np.int64), live=True)
        return [event for _, event in timed[:count]]
