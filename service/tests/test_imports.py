"""The server's modules depend one way: no module imports, at any depth and even inside a function, a module that
imports it back. A circle makes import order matter and lets a settings or protocol change ripple everywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "whisper_server"


def package_imports(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (relative or absolute, module level or inside functions)."""
    modules = {path.stem for path in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 0 and not base.startswith(package.name):
                    continue
                base = base.removeprefix(package.name).lstrip(".")
                if base:
                    imported.add(base.split(".")[0])
                else:  # from . import a, b
                    imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[1] for alias in node.names
                                if alias.name.startswith(package.name + "."))
        graph[path.stem] = (imported & modules) - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle_in_the_server():
    graph = package_imports(PACKAGE)
    assert {"cli", "settings", "server", "app"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, expected", [
    ({"a.py": "from .b import x", "b.py": "def f():\n    from . import a"}, ["a", "b", "a"]),
    ({"a.py": "import whisper_server.b", "b.py": "from whisper_server.c import y", "c.py": "from .a import z"},
     ["a", "b", "c", "a"]),
    ({"a.py": "from .b import x", "b.py": "import os"}, None),
])
def test_finds_cycles_through_any_import_form(tmp_path, source, expected):
    package = tmp_path / "whisper_server"
    package.mkdir()
    for name, text in source.items():
        (package / name).write_text(text + "\n")
    assert find_cycle(package_imports(package)) == expected
