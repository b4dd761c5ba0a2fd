"""The Dockerfile, linted by parsing it (CI has a Docker client but no engine), and the
image's health check run against a real ops endpoint."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
FINAL_STAGES = ("cpu", "gpu")
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|make|build-essential|python3?-dev|libc6-dev|cmake|pip install|git)\b"
)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comments inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with ${ARG} in FROM resolved."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert match, f"unparsable FROM {args!r}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], match[1])
            stages.append(Stage(name=match[2] or str(len(stages)), base=base))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    _, parsed = parse(DOCKERFILE.read_text())
    return {stage.name: stage for stage in parsed}


def test_multi_stage_with_cpu_and_gpu_targets(stages: dict[str, Stage]) -> None:
    _, parsed = parse(DOCKERFILE.read_text())
    assert set(FINAL_STAGES) <= set(stages)
    assert parsed[-1].name == "cpu", "the default target (the last stage) is cpu"
    assert len(parsed) >= 4, "build stages separate from the runtime stages"
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", stages["cpu"].base)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+", stages["gpu"].base)


def test_base_images_are_pinned(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        name, _, tag = stage.base.rpartition(":")
        assert name and tag and tag != "latest", f"{stage.name}: pin {stage.base}"


def test_final_stages_run_as_a_non_root_user(stages: dict[str, Stage]) -> None:
    for name in FINAL_STAGES:
        users = stages[name].all("USER")
        assert users, f"{name}: no USER"
        user = users[-1].split(":")[0]
        assert user not in {"root", "0"} and user.isdigit(), f"{name}: USER {users[-1]}"
        keywords = [kw for kw, _ in stages[name].instructions]
        assert "RUN" not in keywords[keywords.index("USER") :], "RUN after USER runs as the user"


def test_final_stages_have_no_build_tools(stages: dict[str, Stage]) -> None:
    for name in FINAL_STAGES:
        for run in stages[name].all("RUN"):
            tool = BUILD_TOOLS.search(run)
            assert tool is None, f"{name}: {tool and tool[0]} in the runtime stage"
        for copy in stages[name].all("COPY"):
            source = re.search(r"--from=(\S+)", copy)
            if source:
                assert source[1].startswith("build-"), copy
                assert "/opt/venv" in copy, "copy only the virtualenv from the build stage"
    for stage in stages.values():
        for run in stage.all("RUN"):
            if "apt-get install" in run:
                assert "--no-install-recommends" in run, f"{stage.name}: {run}"
                assert "rm -rf /var/lib/apt/lists/*" in run, f"{stage.name}: clean the apt lists"
            if "pip install" in run:
                assert "-c /tmp/constraints.txt" in run, f"{stage.name}: pin with the constraints"


def test_one_image_for_all_roles(stages: dict[str, Stage]) -> None:
    for name in FINAL_STAGES:
        stage = stages[name]
        assert stage.all("ENTRYPOINT") == ['["userembed"]']
        assert stage.all("CMD")[-1] in {'["serve"]', '["worker"]'}
        exposed = {p for e in stage.all("EXPOSE") for p in e.split()}
        assert exposed == {"8000", "50051", "9400"}
        env = " ".join(stage.all("ENV"))
        assert "USEREMBED_API_HOST=0.0.0.0" in env, "listen beyond the container's loopback"
        assert not re.search(r"(PASSWORD|SECRET|TOKEN|API_KEYS)=", env), "no secrets in ENV"


def test_healthcheck_runs_the_bundled_script(stages: dict[str, Stage]) -> None:
    for name in FINAL_STAGES:
        (check,) = stages[name].all("HEALTHCHECK")
        assert "--interval=" in check and "--timeout=" in check and "--start-period=" in check
        assert check.endswith('CMD ["python", "/opt/userembed/healthcheck.py"]')
        assert any(
            "deploy/docker/healthcheck.py /opt/userembed/healthcheck.py" in c
            for c in stages[name].all("COPY")
        )


def test_models_are_baked_by_a_build_arg(stages: dict[str, Stage]) -> None:
    for name in FINAL_STAGES:
        stage = stages[name]
        (arg,) = [a for a in stage.all("ARG") if a.startswith("MODEL_REGISTRY")]
        default = arg.partition("=")[2]
        assert (ROOT / default / "CURRENT").is_file(), f"{default} must be a registry"
        assert "COPY ${MODEL_REGISTRY} /opt/userembed/models" in [
            f"COPY {c}" for c in stage.all("COPY")
        ]
        assert "USEREMBED_REGISTRY_PATH=/opt/userembed/models" in " ".join(stage.all("ENV"))


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore: last matching pattern wins; '!' re-includes; a pattern
    matching a directory covers everything below it."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = re.escape(body.strip("/")).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if re.fullmatch(regex + "(/.*)?", path):
            excluded = not negate
    return excluded


def test_copied_files_are_in_the_build_context(stages: dict[str, Stage]) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    global_args, _ = parse(DOCKERFILE.read_text())
    for stage in stages.values():
        for copy in stage.all("COPY"):
            if "--from=" in copy:
                continue
            args = {**global_args, **dict(a.partition("=")[::2] for a in stage.all("ARG"))}
            *sources, _ = copy.split()
            for raw in sources:
                source = re.sub(r"\$\{(\w+)\}", lambda m, a=args: a[m[1]], raw)
                assert (ROOT / source).exists(), f"{stage.name}: {source} is missing"
                files = (
                    [ROOT / source]
                    if (ROOT / source).is_file()
                    else [p for p in (ROOT / source).rglob("*") if p.is_file()]
                )
                kept = [
                    f
                    for f in files
                    if not _dockerignore_excludes(str(f.relative_to(ROOT)), patterns)
                ]
                assert kept, f"{stage.name}: .dockerignore excludes {source}"
    for noise in (".venv/bin/python", ".git/HEAD", "var/registry/CURRENT", "tests/conftest.py"):
        assert _dockerignore_excludes(noise, patterns), f"{noise} must stay out of the context"


def test_constraints_pin_every_runtime_dependency() -> None:
    """A dependency added to pyproject.toml without regenerating the constraints would
    float to its newest release in the image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "deploy" / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{line}: pin with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    extras = project["optional-dependencies"]
    for requirement in [*project["dependencies"], *extras["gpu"], *extras["objectstore"]]:
        name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in pins, (
            f"{name} is not pinned in deploy/docker/constraints.txt: regenerate it (see its header)"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("is_ready", [True, False])
def test_healthcheck_script_reports_readiness(is_ready: bool) -> None:
    from service.api.ops_server import serve_ops

    port = _free_port()
    server = serve_ops("127.0.0.1", port, lambda: is_ready)
    try:
        env = {"USEREMBED_API_PORT": str(_free_port()), "USEREMBED_METRICS_PORT": str(port)}
        result = subprocess.run(
            [sys.executable, str(HEALTHCHECK)],
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == (0 if is_ready else 1)


def test_healthcheck_script_fails_when_nothing_listens() -> None:
    env = {"USEREMBED_API_PORT": str(_free_port()), "USEREMBED_METRICS_PORT": str(_free_port())}
    result = subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 1
