"""Facts about the code's shape that a reviewer checks (issue 20): no import cycle between fot's
modules, counting the imports inside functions; the memory layer's code in one folder; one copy
of the crossbatch row rule."""

from __future__ import annotations

import ast
from pathlib import Path

FOT = Path(__file__).resolve().parents[1] / "fot"


def module_name(path: Path) -> str:
    parts = path.relative_to(FOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The fot modules a file imports anywhere in it (top level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fot":
            for a in node.names:  # `from fot.model import rope` names a module; `from fot.api import X` a name
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return out & modules


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in FOT.rglob("*.py")}
    return {m: imports_of(p, set(files)) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_even_counting_imports_inside_functions():
    graph = import_graph()
    assert "fot.model.memory.store" in graph and "fot.api" in graph["fot"]  # the walk sees lazy imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_memory_layer_lives_in_one_folder_and_its_row_rule_once():
    definitions = {}
    for p in FOT.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                definitions.setdefault(node.name, []).append(module_name(p))
    for name in ("Memory", "retrieve", "write", "as_if_first", "gate_of", "crossbatch_memory",
                 "session_memory", "extra_contexts"):
        assert len(definitions[name]) == 1 and definitions[name][0].startswith("fot.model.memory."), \
            (name, definitions[name])
    assert "fot.model.memory.crossbatch" in import_graph()["fot.flops"]  # flops counts with the model's rule
