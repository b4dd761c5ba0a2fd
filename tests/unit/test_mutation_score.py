"""scripts/mutation_score.py: verdicts per mutant, the score, stale equivalents."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mutation_score.py"


@pytest.fixture(scope="module")
def score() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_score", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_each_exit_code_gets_its_verdict(score: ModuleType) -> None:
    codes = {"m_1": 1, "m_2": 0, "m_3": 0, "m_4": 36, "m_5": None, "m_6": 34, "m_7": 33}
    result = score.score_module("a.py", codes, {"m_3": "same array"})
    assert result.killed == ["m_1", "m_4"]
    assert result.equivalent == ["m_3"]
    assert result.not_killed == {"m_2": "survived", "m_7": "no tests"}
    assert result.unchecked == ["m_5"]
    assert result.counted == 4
    assert result.score == 50.0


def _project(tmp_path: Path, codes: dict[str, int | None], equivalents: str) -> list[str]:
    (tmp_path / "pyproject.toml").write_text('[tool.mutmut]\nonly_mutate = ["pkg/a.py"]\n')
    (tmp_path / "mutants" / "pkg").mkdir(parents=True)
    meta = {"exit_code_by_key": codes}
    (tmp_path / "mutants" / "pkg" / "a.py.meta").write_text(json.dumps(meta))
    (tmp_path / "equivalent.toml").write_text("[equivalent]\n" + equivalents)
    return [
        "--pyproject",
        str(tmp_path / "pyproject.toml"),
        "--mutants",
        str(tmp_path / "mutants"),
        "--equivalents",
        str(tmp_path / "equivalent.toml"),
    ]


def test_all_killed_or_equivalent_passes(score: ModuleType, tmp_path: Path) -> None:
    args = _project(tmp_path, {"a_1": 1, "a_2": 0, "a_3": 36}, '"a_2" = "a hint"\n"a_3" = "x"\n')
    assert score.main(args) == 0


def test_a_module_below_the_minimum_fails(
    score: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _project(tmp_path, {"a_1": 1, "a_2": 0}, "")
    assert score.main([*args, "--min-score", "90"]) == 1
    assert "pkg/a.py: 50.0% killed, below 90%" in capsys.readouterr().err
    assert score.main([*args, "--min-score", "50"]) == 0


@pytest.mark.parametrize(
    ("codes", "problem"),
    [
        ({"a_1": 1}, "equivalent a_9 no longer exists"),
        ({"a_1": 1, "a_9": 1}, "equivalent a_9 is now killed"),
        ({"a_1": None, "a_9": 0}, "1 mutants never tested"),
    ],
)
def test_stale_equivalents_and_unfinished_runs_fail(
    score: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    codes: dict[str, int | None],
    problem: str,
) -> None:
    args = _project(tmp_path, codes, '"a_9" = "same bits"\n')
    assert score.main(args) == 1
    assert problem in capsys.readouterr().err


def test_an_equivalent_needs_a_reason(score: ModuleType, tmp_path: Path) -> None:
    args = _project(tmp_path, {"a_1": 1, "a_9": 0}, '"a_9" = ""\n')
    with pytest.raises(SystemExit, match="every equivalent needs a one-line reason: a_9"):
        score.main(args)
