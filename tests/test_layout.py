"""The code's layout holds (issue 23): no import circles, not even through imports inside functions, and
no module grows past ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest_llmload

ROOT = Path(pytest_llmload.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                # a package's own parents are imported with it: not an edge
                if target in modules and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def test_no_import_circles():
    edges = _imports(_modules())
    circles = []
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(" -> ".join(circle) for circle in circles)


def test_the_implementation_is_private_and_no_module_is_over_420_lines():
    public = {p.name for p in ROOT.glob("*.py")}
    assert public == {"__init__.py", "__main__.py", "plugin.py", "fixtures.py", "assertions.py", "strategies.py",
                      "cli.py", "errors.py"}
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"} == {"_internal"}
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := p.read_text(encoding="utf-8").count("\n")) > 420}
    assert not long
