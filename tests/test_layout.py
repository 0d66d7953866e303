"""The layout: the import graph read from the source has no cycle, counting imports inside functions
and under ``TYPE_CHECKING``; every library module declares ``__all__``; PAM does not reach BDIA's
front door or run; each module imports on its own."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"bdia_fx": "bdia_fx", "passes": "bdia_fx.passes", "tools": "bdia_fx.tools"}  # as pyproject installs them


def library_modules() -> dict[str, pathlib.Path]:
    """Every module the package installs, by its import name."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The library modules ``name`` imports anywhere in its source (``from p import m`` of a module m is
    m; of any other name it is p)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that starts and ends at the same module, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[name] = "done"
        stack.pop()
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and sum(map(len, graph.values())) > 90  # read the whole package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")
    (tmp_path / "c.py").write_text("from a import y\n")
    modules = {p.stem: p for p in tmp_path.glob("*.py")}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_library_modules_never_import_the_front_door():
    graph = import_graph()
    importers = sorted(name for name, targets in graph.items() if "bdia_fx" in targets and ".tools" not in name)
    assert importers == []


def test_pam_is_a_system_of_its_own():
    """PAM's front door and pass reach neither BDIA's front doors nor, when imported, its run."""
    graph = import_graph()
    reached = reach(graph, "bdia_fx.pam") | reach(graph, "bdia_fx.passes.pam")
    assert {"bdia_fx.pam.model", "bdia_fx.pam.ops"} <= reached
    assert not {"bdia_fx", "bdia_fx.conversion"} & reached
    code = ("import sys, bdia_fx.pam\nbdia_fx.pam.convert\n"
            "print(sorted(m for m in sys.modules if m.startswith(('bdia_fx.run', 'bdia_fx.conversion'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"


def test_every_library_module_declares_all():
    missing = sorted(name for name, path in library_modules().items()
                     if "__all__" not in {t.id for n in ast.walk(ast.parse(path.read_text()))
                                          if isinstance(n, (ast.Assign, ast.AnnAssign))
                                          for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                                          if isinstance(t, ast.Name)})
    assert missing == []


def test_all_names_what_the_module_defines():
    import importlib

    for name in library_modules():
        module = importlib.import_module(name)
        undefined = [export for export in module.__all__ if not hasattr(module, export)]
        assert undefined == [], name


@pytest.mark.slow
def test_each_module_imports_on_its_own():
    """In one interpreter, every module imported first with no bdia_fx module loaded (an import-order
    cycle at run time fails here even where the source graph has none)."""
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(library_modules())!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('bdia_fx')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
