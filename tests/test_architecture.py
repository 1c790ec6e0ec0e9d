"""The layout's rules (docs/architecture.md), read from the code's own imports: no service imports another, the
library imports no service and not the command line, and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = "gpurouter"
SERVICES = ("exporter", "optimizer", "proxy", "simulator")
CLI = "cli"
ROOMS = (LIBRARY, *SERVICES, CLI)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every project module `path` imports, wherever the import stands (TYPE_CHECKING and functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ROOMS}


def _graph() -> dict[str, set[str]]:
    files = [p for room in ROOMS for p in (ROOT / room).rglob("*.py")]
    modules = {_module(p): p for p in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


GRAPH = _graph()


def _room(module: str) -> str:
    return module.split(".")[0]


def test_every_room_is_read() -> None:
    assert {_room(m) for m in GRAPH} == set(ROOMS)
    assert len(GRAPH) > 60


def test_no_service_imports_another() -> None:
    crossing = sorted(
        f"{m} imports {target}"
        for m, targets in GRAPH.items()
        for target in targets
        if _room(m) in SERVICES and _room(target) in SERVICES and _room(target) != _room(m)
    )
    assert crossing == []


def test_the_library_imports_no_service_and_not_the_command_line() -> None:
    upward = sorted(
        f"{m} imports {target}"
        for m, targets in GRAPH.items()
        for target in targets
        if _room(m) == LIBRARY and _room(target) != LIBRARY
    )
    assert upward == []


def test_services_do_not_import_the_command_line() -> None:
    assert (
        sorted(f"{m} imports {t}" for m, ts in GRAPH.items() for t in ts if _room(m) in SERVICES and _room(t) == CLI)
        == []
    )


def test_no_import_circle() -> None:
    """Tarjan's strongly connected components over module → module imports (a package counts as its __init__)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert circles == []


def test_the_simulator_imports_nothing_of_what_it_judges() -> None:
    """The simulator sizes and places models with its own model of Ollama: it imports neither the router's sizing
    nor its decisions, directly or through the library's plumbing, so no "fits" is true by construction."""
    judged = ("gpurouter.sizing", "gpurouter.decide")
    reached: dict[str, str] = {}  # module → the simulator module that leads to it
    todo = [(m, m) for m in GRAPH if _room(m) == "simulator"]
    while todo:
        module, origin = todo.pop()
        for target in GRAPH[module] - reached.keys():
            reached[target] = origin
            todo.append((target, origin))
    assert sorted(f"{origin} reaches {m}" for m, origin in reached.items() if m.startswith(judged)) == []
