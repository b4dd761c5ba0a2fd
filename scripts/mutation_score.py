"""Mutation score per module from a finished ``mutmut run``, net of reviewed equivalents.

mutmut 3 keeps one JSON file per mutated module, ``mutants/<path>.meta``, whose
``exit_code_by_key`` maps each mutant's name to the exit code of its test run (the
same table ``mutmut results`` prints from). This script prints, per module listed in
``[tool.mutmut] only_mutate``: killed / (total - equivalent) and the survivors, and
exits non-zero when

- a module scores below ``--min-score`` (90% by default),
- a mutant was never tested (an interrupted run),
- an entry of the equivalents list (``tests/mutation/equivalent.toml``: mutant name ->
  one-line reason) names a mutant that no longer exists or that the tests now kill:
  the list must stay a reviewed statement about the current code.

Usage: ``python scripts/mutation_score.py [--min-score 90] [--equivalents PATH]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

# mutmut's exit codes (mutmut/stats.py, status_by_exit_code). A timeout counts as a
# kill (the mutant made the tests hang), as do mutants the type checker rejects.
KILLED: Final = frozenset({1, 3, 36, 37, 24, -24, 152, 255})
# A timeout depends on the machine's load: an equivalent that timed out is not evidence
# that the tests kill it, only a failing test run (1, 3) or the type check (37) is.
TIMEOUT: Final = frozenset({36, 24, -24, 152, 255})
SURVIVED: Final = frozenset({0})
NO_TESTS: Final = frozenset({5, 33})
SKIPPED: Final = frozenset({34})
STATUS: Final = {0: "survived", 5: "no tests", 33: "no tests", 35: "suspicious", -11: "segfault"}


@dataclass
class ModuleScore:
    """The verdicts of one module's mutants."""

    path: str
    killed: list[str] = field(default_factory=list)
    equivalent: list[str] = field(default_factory=list)
    not_killed: dict[str, str] = field(default_factory=dict)  # name -> status
    unchecked: list[str] = field(default_factory=list)

    @property
    def counted(self) -> int:
        return len(self.killed) + len(self.not_killed)

    @property
    def score(self) -> float:
        return 100.0 * len(self.killed) / self.counted if self.counted else 100.0


def load_equivalents(path: Path) -> dict[str, str]:
    """Mutant name -> reason, from the ``[equivalent]`` table of ``path`` (may be absent)."""
    if not path.exists():
        return {}
    table = tomllib.loads(path.read_text("utf-8")).get("equivalent", {})
    bad = [name for name, reason in table.items() if not isinstance(reason, str) or not reason]
    if bad:
        raise SystemExit(f"{path}: every equivalent needs a one-line reason: {', '.join(bad)}")
    return dict(table)


def mutated_modules(pyproject: Path) -> list[str]:
    only = tomllib.loads(pyproject.read_text("utf-8"))["tool"]["mutmut"]["only_mutate"]
    return [str(p) for p in only]


def score_module(
    path: str, exit_codes: dict[str, int | None], equivalents: dict[str, str]
) -> ModuleScore:
    result = ModuleScore(path)
    for name, code in sorted(exit_codes.items()):
        if code is None:
            result.unchecked.append(name)
        elif code in SKIPPED:
            continue
        elif name in equivalents and code in SURVIVED | TIMEOUT:
            result.equivalent.append(name)
        elif code in KILLED:
            result.killed.append(name)
        else:
            result.not_killed[name] = STATUS.get(code, f"exit code {code}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-score", type=float, default=90.0, help="percent, per module")
    parser.add_argument("--equivalents", type=Path, default=Path("tests/mutation/equivalent.toml"))
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)

    equivalents = load_equivalents(args.equivalents)
    problems: list[str] = []
    scores: list[ModuleScore] = []
    seen: dict[str, int | None] = {}
    for path in mutated_modules(args.pyproject):
        meta = args.mutants / (path + ".meta")
        if not meta.exists():
            problems.append(f"{path}: no mutation results ({meta} missing): run `mutmut run`")
            continue
        exit_codes: dict[str, int | None] = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
        seen.update(exit_codes)
        scores.append(score_module(path, exit_codes, equivalents))

    width = max([len(s.path) for s in scores] + [6])
    print(f"{'module':<{width}}  killed  equiv  counted   score")
    for s in scores:
        print(
            f"{s.path:<{width}}  {len(s.killed):>6}  {len(s.equivalent):>5}  "
            f"{s.counted:>7}  {s.score:>5.1f}%"
        )
    killed = sum(len(s.killed) for s in scores)
    counted = sum(s.counted for s in scores)
    total_score = 100.0 * killed / counted if counted else 100.0
    n_equivalent = sum(len(s.equivalent) for s in scores)
    print(f"{'total':<{width}}  {killed:>6}  {n_equivalent:>5}  {counted:>7}  {total_score:>5.1f}%")
    print("(score = killed / counted; counted = all mutants minus the reviewed equivalents)")

    for s in scores:
        if s.not_killed:
            print(f"\nnot killed in {s.path} (`mutmut show NAME` for the diff):")
            for name, status in s.not_killed.items():
                print(f"  {name}: {status}")
        if s.unchecked:
            problems.append(f"{s.path}: {len(s.unchecked)} mutants never tested (interrupted?)")
        if s.score < args.min_score:
            problems.append(f"{s.path}: {s.score:.1f}% killed, below {args.min_score:.0f}%")

    for name in sorted(equivalents):
        if name not in seen:
            problems.append(
                f"equivalent {name} no longer exists (the code changed): review "
                f"{args.equivalents} again"
            )
        elif seen[name] is not None and seen[name] not in SURVIVED | TIMEOUT:
            problems.append(f"equivalent {name} is now killed: remove it from the list")

    if problems:
        print("\nFAILED:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
