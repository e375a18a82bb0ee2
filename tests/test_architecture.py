"""The shape of the package: no import cycle between janus_job modules, production rooms never import the
demo, and each room imports only the rooms docs/architecture.md allows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "janus_job"

# What each room may import (docs/architecture.md); a room may always import itself.
ALLOWED = {
    "errors": set(),
    "io": {"errors"},
    "config": {"errors"},
    "deploy": {"config", "errors"},
    "data": {"io", "errors"},
    "models": {"data", "io", "errors"},
    "features": {"models", "data", "io", "errors"},
    "train": {"features", "models", "data", "config", "deploy", "monitor", "io", "errors"},
    "monitor": {"io", "errors"},
}
PRODUCTION = set(ALLOWED)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every janus_job module `path` imports, at top level or inside functions (`from a import b` counts
    b when it is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("janus_job"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("janus_job"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {name for name in found if name in MODULES}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_is_read():
    """The parser sees real edges (a broken parser would make every other test here pass)."""
    assert "janus_job.errors" in GRAPH["janus_job.config.load"]
    assert "janus_job.train.engine" in GRAPH["janus_job.train.trainer"]  # an in-function import
    assert "janus_job.data.frames" in GRAPH["janus_job.data.dataset"]  # `from janus_job.data import frames`


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_production_never_imports_the_demo():
    offenders = sorted(f"{name} imports {dep}" for name, deps in GRAPH.items() if room(name) in PRODUCTION
                       for dep in deps if room(dep) == "demo")
    assert not offenders, "production code imports the demo: " + "; ".join(offenders)


def test_rooms_import_only_what_the_map_allows():
    offenders = sorted(
        f"{name} imports {dep}" for name, deps in GRAPH.items() if room(name) in ALLOWED
        for dep in deps if room(dep) != room(name) and room(dep) not in ALLOWED[room(name)] and room(dep) != "demo"
    )
    assert not offenders, "imports the architecture map does not allow: " + "; ".join(offenders)
