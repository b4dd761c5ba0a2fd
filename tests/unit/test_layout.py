"""The package layout stays true: import directions between the roles, and no cycle.

Every import counts, including those inside functions and under TYPE_CHECKING, so a
lazy import cannot hide a dependency the layout forbids.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("ingest", "worker", "api")
SHARED = ("settings", "metrics")
TOP_MODULES = {"__init__.py", "cli.py", "demo.py", "settings.py", "metrics.py"}
SUBPACKAGES = {"core", "store", *ROLES, "bench", "evaluation"}

# What each part of service/ may import of service (its own part always allowed).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "settings": set(),
    "metrics": set(),
    "store": {"core", *SHARED},
    **{role: {"core", "store", *SHARED} for role in ROLES},
    "bench": {"core", "store", *ROLES, *SHARED},
    "evaluation": {"core", "store", *ROLES, "bench", *SHARED},
    "cli": SUBPACKAGES | {"demo", *SHARED},
    "demo": {"core", "store", *ROLES, *SHARED},
}
# models/ (training, export, registry) reads the core contracts and settings, and runs
# the ONNX runtime to check export parity and to fit alignments.
MODELS_MAY_IMPORT = ("service.core", "service.settings", "service.worker.runtime",
                     "service.worker.alignment_fit")  # fmt: skip
NO_MODELS = ("core", "store", "settings", "metrics")


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted([*ROOT.glob("service/**/*.py"), *ROOT.glob("models/*.py")]):
        if "proto" in path.relative_to(ROOT).parts:
            continue  # generated gRPC code
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _imports(module: str, path: Path) -> set[str]:
    """Every module (or module.name) ``module`` imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("service", "models")}


MODULES = dict(_modules())


def _resolve(name: str) -> str | None:
    """The module an imported name lives in (``pkg.mod`` for ``pkg.mod.attr``)."""
    return name if name in MODULES else name.rpartition(".")[0] or None


GRAPH = {
    module: {
        dep
        for name in _imports(module, path)
        if (dep := _resolve(name)) in MODULES and dep != module
    }
    for module, path in MODULES.items()
}


def _part(module: str) -> str:
    """core, store, ingest, ..., cli, demo, settings, metrics; or models."""
    parts = module.split(".")
    return parts[0] if parts[0] == "models" else parts[1] if len(parts) > 1 else "service"


def test_service_holds_only_the_role_packages_and_the_four_top_modules() -> None:
    entries = {p.name for p in (ROOT / "service").iterdir() if p.name != "__pycache__"}
    assert {e for e in entries if e.endswith(".py")} == TOP_MODULES
    assert {e for e in entries if not e.endswith(".py")} == SUBPACKAGES
    for package in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / "service" / package / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"service/{package}/__init__.py: say what it may import"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("service.")))
def test_service_modules_import_only_what_their_package_may(module: str) -> None:
    own = _part(module)
    if own == "service":
        return  # service/__init__.py: a docstring only
    allowed = ALLOWED[own] | {own}
    wrong = sorted(
        dep
        for dep in GRAPH[module]
        if (dep.startswith("service.") and _part(dep) not in allowed)
        or (dep.startswith("models") and own in NO_MODELS)
    )
    assert not wrong, f"{module} ({own}) may import only {sorted(allowed)}; it imports {wrong}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("models")))
def test_models_import_only_the_core_settings_and_the_onnx_runtime(module: str) -> None:
    wrong = sorted(
        dep
        for dep in GRAPH[module]
        if dep.startswith("service.") and not dep.startswith(MODELS_MAY_IMPORT)
    )
    assert not wrong, f"{module} imports {wrong}; models may import only {MODELS_MAY_IMPORT}"


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checks_see_real_imports() -> None:
    """Guards the test itself: the walk finds the edges it is meant to police."""
    assert "service.store.protocol" in GRAPH["service.worker.embedding_worker"]
    assert "service.worker.runtime" in GRAPH["service.worker.alignment_fit"]
    assert "models.alignment" in GRAPH["models.registry"]
