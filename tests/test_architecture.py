"""The package's floors: no import cycle, and no room imports a room above it (read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ftforget"

#: room -> the rooms its modules may import (besides its own); a room is ``ftforget.<room>``
ALLOWED: dict[str, set[str]] = {
    "inference": set(),
    "resources": set(),
    "runs": {"files"},
    "backbone_families": set(),
    "backbones": {"backbone_families"},
    "adapters": set(),
    "machine": set(),
    "files": set(),
    "config_files": set(),
    "checkpoint_io": {"files"},
    "guards": set(),
    "stats": set(),
    "checkpointing": {"checkpoint_io"},
    "progress": {"forgetting.collectives"},  # the rank, from the one place that knows it
    "logging_setup": {"progress"},
    "data": {"machine", "progress"},
    "methods": {"adapters", "backbones", "inference", "runs"},
    "forgetting": {"backbones", "files", "guards", "inference", "data.probe", "machine", "progress", "stats"},
    "report": {"files", "methods", "runs", "stats"},
    "validation": {"methods"},  # the validation at a fit's last step; the methods' random-state helpers
    "cli": {
        "backbones",
        "config_files",
        "checkpoint_io",
        "checkpointing",
        "data",
        "guards",
        "logging_setup",
        "machine",
        "methods",
        "progress",
        "resources",
        "runs",
        "slurm",
        "validation",
    },
    "slurm": set(),  # the job array script; a fit's behaviour inside a SLURM job
    "sweep": {"resources", "runs", "slurm"},
    # one base, many tasks: export, attach, the multi-task model, routing, merging (issue 12)
    "tasks": {"adapters", "backbones", "data", "files", "forgetting", "methods", "runs"},
    "demo": {
        "backbones",
        "cli",
        "data",
        "files",
        "forgetting",
        "methods",
        "report",
        "resources",
        "runs",
        "sweep",
        "tasks",
    },
    "commands": {
        "config_files",
        "files",
        "backbones",
        "cli",
        "data",
        "demo",
        "forgetting",
        "guards",
        "inference",
        "logging_setup",
        "methods",
        "report",
        "resources",
        "runs",
        "slurm",
        "stats",
        "sweep",
        "tasks",
    },
    "__main__": {"commands"},
    "__init__": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path) -> set[str]:
    """``ftforget`` modules imported by ``path`` at run time (``if TYPE_CHECKING:`` blocks excluded)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ftforget")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ftforget":
            for alias in node.names:  # ``from ftforget.methods import registry`` imports a submodule
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in runtime_imports(path) if m != name} for name, path in MODULES.items()}


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def test_the_graph_was_read() -> None:
    assert {"ftforget.commands", "ftforget.inference", "ftforget.forgetting.callback"} <= set(GRAPH)
    assert "ftforget.forgetting.evaluate" in GRAPH["ftforget.forgetting.callback"]


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components: every component must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    assert cycles == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_room_imports_a_room_above_it(module: str) -> None:
    own = room(module)
    allowed = ALLOWED[own]
    bad = []
    for target in sorted(GRAPH[module]):
        other = room(target)
        dotted = ".".join(target.split(".")[1:3])  # e.g. data.probe
        # The package root holds only __version__: anyone may read it.
        if other in (own, "__init__") or other in allowed or dotted in allowed:
            continue
        bad.append(target)
    assert bad == [], f"{module} ({own}) may import only {sorted(allowed)} besides its own room"


def test_forgetting_imports_no_dataset_and_no_method() -> None:
    """The probe only knows the ProbeData interface and the inference contract."""
    offenders = {
        (m, t)
        for m, targets in GRAPH.items()
        if room(m) == "forgetting"
        for t in targets
        if room(t) == "methods" or (room(t) == "data" and t != "ftforget.data.probe")
    }
    assert offenders == set()
