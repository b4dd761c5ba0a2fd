"""``userembed evaluate``: run the sections with one progress bar, then write the report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from tqdm import tqdm

from service.bench.provenance import commit_id, machine
from service.evaluation.config import EvalConfig
from service.evaluation.report import EvaluationResults, write_report

Part = Literal["live", "offline"]
PARTS: Final[tuple[Part, ...]] = ("live", "offline")
# Share of the bar each part takes (about its share of the default run's time).
_WEIGHT: Final[dict[Part, float]] = {"live": 0.6, "offline": 0.4}
log = logging.getLogger(__name__)


def run_evaluation(
    config: EvalConfig, out_dir: Path, *, parts: Collection[Part] = PARTS, command: str = ""
) -> Path:
    """Run ``parts`` (live: sections 1 and 5; offline: 2-4), write the report under
    ``out_dir`` and return the path of report.md."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {sorted(parts)}")
    started, started_at = time.perf_counter(), datetime.now(UTC).isoformat(timespec="seconds")
    commit = commit_id()  # what is measured is the tree as it was when the run began
    total = sum(_WEIGHT[p] for p in parts)
    bar = tqdm(
        total=1000,
        desc="evaluate",
        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}",
        dynamic_ncols=True,
    )
    done = 0.0

    def progress_of(part: Part) -> Callable[[str, float], None]:
        def report(stage: str, fraction: float) -> None:
            position = int(1000 * (done + _WEIGHT[part] * min(max(fraction, 0.0), 1.0)) / total)
            bar.update(max(0, position - bar.n))
            bar.set_postfix_str(stage)
            log.info("event=evaluate_stage stage=%r fraction=%.2f", stage, fraction)

        return report

    live = offline = None
    try:
        if "live" in parts:
            from service.evaluation.live import run_live

            live = run_live(config.live, progress_of("live"))
            done += _WEIGHT["live"]
        if "offline" in parts:
            from service.evaluation.offline import run_offline

            offline = run_offline(config.offline, progress_of("offline"))
            done += _WEIGHT["offline"]
        bar.set_postfix_str("write the report")
        results = EvaluationResults(
            commit=commit,
            started_at=started_at,
            preset=config.preset,
            command=command or f"userembed evaluate --preset {config.preset}",
            machine=machine(),
            live=live,
            offline=offline,
            seconds=time.perf_counter() - started,
        )
        path = write_report(results, out_dir)
        bar.update(1000 - bar.n)
    finally:
        bar.close()
    return path
