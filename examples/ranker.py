"""A minimal ranker: score candidate items for one user with the embedding userembed serves.

    userembed serve &        # or `make demo`, which also feeds users u0..u9999
    python examples/ranker.py --url http://127.0.0.1:8000 --user u42

Candidates come from ``--items`` (an ``.npy`` float32 matrix, one item vector per row,
in the space of the user model: pin that space with ``--model-version``) or, without
it, random unit vectors as stand-ins for an item tower's output. The score is the dot
product, as in a two-tower retrieval model. ``--model`` reads a named model (of several
the server serves) instead of the default one.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import numpy.typing as npt

from userembed import Client, UserembedError


def top_k(
    user: npt.NDArray[np.float32], items: npt.NDArray[np.float32], k: int
) -> list[tuple[int, float]]:
    """The ``k`` best items by ``items @ user``, best first: (row, score)."""
    scores = items @ user
    best = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in best]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="http:// or grpc://")
    parser.add_argument("--user", default="u42")
    parser.add_argument("--items", help=".npy item vectors (default: 1000 random ones)")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--model", help="the served model to read (default: the default one)")
    parser.add_argument("--model-version", help="the space the item vectors are in")
    parser.add_argument("--api-key")
    args = parser.parse_args(argv)

    with Client(
        args.url, api_key=args.api_key, model=args.model, model_version=args.model_version
    ) as client:
        try:
            user = client.get(args.user)
        except UserembedError as exc:
            print(f"no embedding for {args.user!r}: {exc}", file=sys.stderr)
            return 1
    assert user.vector is not None  # a single get answers with a vector or raises

    if args.items:
        items = np.load(args.items, allow_pickle=False).astype(np.float32)
    else:
        items = np.random.default_rng(0).standard_normal((1000, len(user.vector)))
        items = (items / np.linalg.norm(items, axis=1, keepdims=True)).astype(np.float32)

    print(
        f"user {user.user_id}: {user.status}, model {user.model_version} "
        f"(space {user.space_version}), staleness {user.staleness_ms} ms"
    )
    for rank, (item, score) in enumerate(top_k(user.vector, items, args.top), 1):
        print(f"{rank:>3}. item {item:<6} score {score:+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
