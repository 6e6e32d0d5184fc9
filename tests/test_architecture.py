"""The package's layers, read from the source: every import (at the top of a module or inside a
function) is an arrow from one module to another, and the arrows only point down.

    relattn.__main__                                   the entry point
    relattn.cli                                        the command line
    relattn.demo, relattn.benchmarking, relattn.viz    the tools below it
    everything else                                    the library (pe, backends, nn, models, ...)

The library imports no tool, and no tool imports the command line; what they share (the
user-error type, atomic writes and the folder lock, the progress bar) lies in the library.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import relattn

SRC = Path(relattn.__file__).resolve().parent
PACKAGE = "relattn"
TOOLS = ("demo", "benchmarking", "viz")
# Circles are looked for through the whole package: every top-level module and package.
NO_CIRCLES = tuple(
    sorted(p.stem if p.is_file() else p.name for p in SRC.iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists())
)  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(
    name: str, path: Path, known: dict[str, Path], missing: list[str] | None = None
) -> set[str]:
    """The relattn modules that ``name`` (the file ``path``) imports, anywhere in it: ``from x
    import y`` counts as ``x.y`` where that is a module, else as ``x``. Imports of relattn
    modules that do not exist are added to ``missing``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == PACKAGE and module not in known and missing is not None:
                missing.append(f"{name}: from {module} import ...")
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                       for a in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import relattn.pe.t5 as x` and the like
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_every_import_names_a_module_that_exists():
    """(A renamed module leaves no import of its old name, even inside a function.)"""
    known = _modules()
    missing: list[str] = []
    for name, path in known.items():
        _imports(name, path, known, missing)
    assert missing == []


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top == "__main__":
        return 3
    if top == "cli":
        return 2
    if top in TOOLS:
        return 1
    return 0


def test_the_graph_is_read():
    """The reader finds the arrows it must: relative, absolute, inside functions, submodules."""
    graph = _graph()
    assert "relattn._io" in graph["relattn.models.checkpoint"]  # from .._io import write_new
    assert "relattn._errors" in graph["relattn._io"]  # from ._errors import UserError
    assert "relattn.demo.evaluate" in graph["relattn.demo.experiment"]  # from . import evaluate
    assert "relattn.cli.main" in graph["relattn.__main__"]  # from relattn.cli.main import main
    assert "relattn.models" in graph["relattn.demo.experiment"]  # inside a function


def test_imports_point_only_down():
    graph = _graph()
    upward = sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)
    )
    assert upward == []


def _in_scope(module: str) -> bool:
    return any(
        module == f"{PACKAGE}.{s}" or module.startswith(f"{PACKAGE}.{s}.") for s in NO_CIRCLES
    )


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_the_circle_check_covers_the_package():
    assert {"backends", "_custom_op", "call", "functional", "distributed", "cli"} <= set(NO_CIRCLES)
    assert all(_in_scope(m) for m in _modules() if m != PACKAGE)


@pytest.mark.parametrize("scope", NO_CIRCLES)
def test_no_import_circles(scope):
    graph = _graph()
    sub = {a: {b for b in targets if _in_scope(b)} for a, targets in graph.items() if _in_scope(a)}
    circles = [c for c in _circles(sub) if any(m.split(".")[1] == scope for m in c)]
    assert circles == []


def _library_files() -> list[Path]:
    return [p for name, p in _modules().items() if _layer(name) == 0]


def test_library_errors_do_not_mention_command_line_flags():
    flag = re.compile(r"""["'][^"'\n]*\s--[a-z][a-z-]+""")
    offenders = [
        f"{path.relative_to(SRC)}:{n}: {line.strip()}"
        for path in _library_files()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if flag.search(line)
    ]
    assert offenders == []
