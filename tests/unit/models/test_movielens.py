"""MovieLens-1M loader, event mapping, 5-core filter and the leave-one-out tie rule."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from models import movielens
from models.movielens import (
    PIP_COMMAND,
    MovieLensMissing,
    Ratings,
    drop_rare_items,
    leave_one_out,
    load_ratings,
    to_events,
)
from service.core.events import EventType

FIRST_USERS = 200


def _installed() -> Path | None:
    try:
        return movielens.locate()
    except MovieLensMissing:
        return None


needs_ml1m = pytest.mark.skipif(
    _installed() is None, reason=f"MovieLens-1M is not installed: {PIP_COMMAND}"
)


def ratings(users: list[int], items: list[int], seconds: list[int], stars: list[float]) -> Ratings:
    n_users, n_items = max(users) + 1, max(items) + 1
    return Ratings(
        users=np.asarray(users, dtype=np.int64),
        items=np.asarray(items, dtype=np.int64),
        ratings=np.asarray(stars, dtype=np.float32),
        seconds=np.asarray(seconds, dtype=np.int64),
        user_ids=[f"1m_{u + 1}" for u in range(n_users)],
        item_ids=[f"Movie {i} (2000)" for i in range(n_items)],
        genres=["Drama"] * n_items,
    )


def test_a_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MovieLensMissing, match=re.escape(PIP_COMMAND)):
        movielens.locate()


def test_ties_in_time_keep_the_file_order() -> None:
    # user 0, file order rows 0..4 with times 5, 3, 3, 7, 7: time order 1, 2, 0, then 3, 4
    # (the tie at 7 is broken by the file: row 4 is the test target, row 3 validation)
    data = ratings([0, 0, 0, 0, 0], [0, 1, 2, 3, 4], [5, 3, 3, 7, 7], [1, 2, 3, 4, 5])
    split = leave_one_out(data)
    assert split.sequence(0).tolist() == [1, 2, 0, 3, 4]
    assert split.targets("test").tolist() == [4]
    assert split.targets("valid").tolist() == [3]
    indptr, seen = split.seen("test")
    assert indptr.tolist() == [0, 4] and seen.tolist() == [1, 2, 0, 3]
    indptr, seen = split.seen("train")
    assert indptr.tolist() == [0, 3] and seen.tolist() == [1, 2, 0]


def test_split_is_per_user_and_drops_users_with_fewer_than_three() -> None:
    # user 1 is interleaved with user 0 in the file; user 2 has two ratings only
    data = ratings(
        [0, 1, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 4, 5, 1], [1, 9, 2, 8, 1, 3, 7, 2], [3] * 8
    )
    split = leave_one_out(data)
    assert split.users.tolist() == [0, 1]
    assert split.sequence(0).tolist() == [0, 2, 5]
    assert split.sequence(1).tolist() == [6, 3, 1]  # times 7, 8, 9
    assert split.targets("test").tolist() == [4, 1]
    assert split.targets("valid").tolist() == [2, 3]


def test_rare_items_go_and_the_rest_keep_file_order() -> None:
    # item 1 has 2 ratings: with min_count 3 it goes, items 2 and 0 stay, renumbered by first use
    data = ratings([0] * 8, [2, 1, 0, 2, 1, 0, 2, 0], list(range(8)), [3] * 8)
    kept = drop_rare_items(data, min_count=3)
    assert kept.item_ids == ["Movie 2 (2000)", "Movie 0 (2000)"]
    assert kept.items.tolist() == [0, 1, 0, 1, 0, 1]
    assert kept.seconds.tolist() == [0, 2, 3, 5, 6, 7]


def test_events_map_rating_time_title_and_genre() -> None:
    data = ratings([0, 0, 0], [0, 1, 0], [978300760, 978302109, 978301968], [4, 3, 5])
    events = to_events(data, np.array([1, 0, 2]))
    assert [e.type for e in events] == [EventType.VIEW, EventType.LIKE, EventType.LIKE]
    assert [e.ts for e in events] == [978302109000, 978300760000, 978301968000]
    assert events[0].item_id == "Movie 1 (2000)" and events[0].category == "Drama"
    assert events[0].user_id == "1m_1" and events[0].value == 3.0
    assert len({e.event_id for e in events}) == 3


@needs_ml1m
def test_loader_reads_the_first_200_users_of_the_installed_file() -> None:
    directory = _installed()
    assert directory is not None
    # read the slice independently of the loader: the file's first 200 distinct users
    wanted: dict[str, None] = {}
    lines = []
    with (directory / "ml-1m.inter").open(encoding="utf-8") as handle:
        assert next(handle).startswith("user_id:token\titem_id:token")
        for line in handle:
            user = line.split("\t", 1)[0]
            if user not in wanted and len(wanted) == FIRST_USERS:
                continue
            wanted.setdefault(user)
            lines.append(line.rstrip("\n").split("\t"))
    data = load_ratings(max_users=FIRST_USERS)
    assert data.user_ids == list(wanted) and data.user_ids[0] == "1m_1"
    assert len(data) == len(lines)
    assert all(u.startswith("1m_") for u in data.user_ids)
    first = lines[0]
    assert data.item_ids[int(data.items[0])] == first[1]
    assert int(data.seconds[0]) == int(float(first[3]))
    assert float(data.ratings[0]) == float(first[2])
    toy_story = data.item_ids.index("Toy Story (1995)")
    assert data.genres[toy_story] == "Animation"  # "Animation Children's Comedy"
    assert all(data.genres)

    events = to_events(data, np.arange(len(data)))
    assert events[0].ts == int(float(first[3])) * 1000
    assert events[0].item_id == first[1]
    likes = sum(1 for row in lines if float(row[2]) >= 4)
    assert sum(1 for e in events if e.type is EventType.LIKE) == likes
    assert {e.type for e in events} == {EventType.LIKE, EventType.VIEW}

    split = leave_one_out(drop_rare_items(data))
    assert len(split.users) == FIRST_USERS  # every ML-1M user has >= 20 ratings
    for position in range(0, FIRST_USERS, 37):
        rows = split.sequence(position)
        stamps = split.ratings.seconds[rows]
        assert np.all(np.diff(stamps) >= 0)
        ties = np.diff(stamps) == 0
        assert np.all(np.diff(rows)[ties] > 0)  # equal times keep the file order


@needs_ml1m
def test_train_movielens_publishes_and_evaluate_retrieval_recomputes_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from models.cli import add_model_commands
    from models.registry import current_version, load_artifact

    parser = argparse.ArgumentParser(prog="userembed")
    add_model_commands(parser.add_subparsers(dest="command", required=True))
    registry, out = tmp_path / "registry", tmp_path / "ml"
    args = parser.parse_args(
        [
            "train", "--dataset", "movielens-1m", "--ml-max-users", "40",
            "--ml-history-length", "10", "--ml-embed-dim", "8", "--ml-output-dim", "8",
            "--ml-epochs", "1", "--ml-cuts-per-user", "1", "--threads", "1",
            "--ml-out", str(out), "--registry", str(registry), "--version", "ml-tiny",
        ]
    )  # fmt: skip
    args.func(args)
    trained = capsys.readouterr().out
    assert current_version(registry) == "ml-tiny"
    manifest = load_artifact(registry, "ml-tiny").manifest
    assert manifest.schema.history_length == 10 and manifest.output_dim == 8
    assert {"test_hr@10", "test_ndcg@10", "valid_ndcg@10"} <= set(manifest.training_metrics)
    assert {p.name for p in out.iterdir()} >= {"eval.npz", "eval-sasrec.npz", "results.json"}
    args = parser.parse_args(["evaluate-retrieval", "--dir", str(out)])
    args.func(args)
    table = capsys.readouterr().out
    for line in table.splitlines()[:4]:  # header, ours, popularity, our SASRec
        assert line in trained
    assert "BERT4Rec (published)" in table and "wall time" in table
