"""The steptitan package's modules import each other without cycles (issue 23, item 9).

Every ``import`` / ``from ... import`` is read with ``ast`` -- at module level and inside functions,
where a cycle hides from the interpreter (a function-level import runs late, so the circle never
fails at import time, but a lower module still reaches up into one that builds on it). The built-in
plugins (registry/, installed as ``steptitan.registry``) are part of the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

ROOTS = {"steptitan": REPO / "steptitan", "steptitan.registry": REPO / "registry"}


def module_files() -> dict[str, Path]:
    out = {}
    for package, root in ROOTS.items():
        for f in root.rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = f
    return out


def imported(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` (file ``path``) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of ``name``
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]  # a name may be a submodule
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import steptitan.a.b` also names steptitan.a.b's module
                target = target.rpartition(".")[0]
            if target and target != name and target not in ("steptitan",):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "steptitan.train" in graph["steptitan.cli"]  # cli.main imports each command inside the function
    assert "steptitan.registry" in graph["steptitan.registry.peft.lora"]


def test_the_package_import_graph_has_no_cycles():
    assert cycles(import_graph()) == []
