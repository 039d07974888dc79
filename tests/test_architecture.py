"""The floor plan holds: no import cycle among autoprune's modules (lazy imports inside functions count too, so
that none can hide one), no module grows past what one job needs, and the core never imports what sits above it."""

from __future__ import annotations

import ast
from pathlib import Path

import autoprune

PACKAGE = Path(autoprune.__file__).parent
MAX_LINES = 400  # a module longer than this is doing more than one job


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the autoprune modules it imports, wherever the import statement stands (top level or inside a
    function). `from package import name` is an edge to package.name when that is a module, else to package."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package up
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:  # `import autoprune.a.b` names autoprune.a.b (or its parent)
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("autoprune"):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_is_read_from_the_source():
    graph = import_graph()
    assert "autoprune.trial" in graph and "autoprune.config" in graph["autoprune.trial"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail


def test_no_import_cycle_among_autoprune_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (a lazy import inside a function counts):\n" + "\n".join(
        " ↔ ".join(cycle) for cycle in found)


def test_the_settings_import_nothing_from_autoprune():
    """config.py is the floor every stage stands on."""
    assert import_graph()["autoprune.config"] == set()


def test_the_core_does_not_import_benchmarks_tests_or_the_cli():
    above = ("autoprune.bench", "autoprune.testing", "autoprune.cli", "autoprune.doctor", "autoprune.docs")
    for name, imported in import_graph().items():
        if name.startswith(above):
            continue
        wrong = sorted(target for target in imported if target.startswith(above))
        assert not wrong, f"{name} imports {wrong}"


def test_no_module_is_longer_than_one_job_needs():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
