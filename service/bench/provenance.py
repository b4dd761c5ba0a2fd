"""Where a measurement came from: the commit and the machine, printed next to every number."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def commit_id() -> str:
    """Short HEAD commit, with ``-dirty`` when tracked files differ from it; 'unknown'
    outside a git checkout."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return f"{head}-dirty" if changed else head


def machine() -> dict[str, str | int]:
    """The facts about this machine that a latency or throughput number depends on."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "processor": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 0,
    }
