"""The core's imports point one way (docs/architecture.md): no import cycle among elkscan_core's modules,
and no import of a plugin package from the core.

Every import statement counts, also those under ``TYPE_CHECKING`` and inside functions: a cycle that
only type checkers or a late import see is still two modules that cannot be read, tested or changed
apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import elkscan_core

CORE = Path(elkscan_core.__file__).resolve().parent
PACKAGE = CORE.name


def _modules() -> dict[str, Path]:
    modules = {}
    for path in CORE.rglob("*.py"):
        parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imported(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports: ``from X import a`` is X.a when that is a module, else X."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[:None if path.name == "__init__.py" else -1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return found


IMPORTS = {name: _imported(name, path) for name, path in MODULES.items()}


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A shortest import path from ``start`` back to itself, if any."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        later = []
        for module in frontier:
            for dep in sorted(graph[module]):
                if dep == start:
                    return paths[module] + [start]
                if dep not in paths:
                    paths[dep] = paths[module] + [dep]
                    later.append(dep)
        frontier = later
    return None


def test_the_scan_finds_the_core_and_its_imports():
    assert {f"{PACKAGE}.runner", f"{PACKAGE}.components", f"{PACKAGE}.default_plugins.dirscan"} <= set(MODULES)
    assert f"{PACKAGE}.components" in IMPORTS[f"{PACKAGE}.runner"]
    assert f"{PACKAGE}.model" in IMPORTS[f"{PACKAGE}.default_plugins.dirscan"]


def test_no_import_cycle_inside_the_core():
    graph = {name: {dep for dep in deps if dep in MODULES and dep != name} for name, deps in IMPORTS.items()}
    cycles = {" -> ".join(cycle) for cycle in map(lambda m: _cycle_through(m, graph), sorted(graph)) if cycle}
    assert not cycles, "import cycles inside the core:\n" + "\n".join(sorted(cycles))


def test_the_core_imports_no_plugin():
    plugins = {f"{name} imports {dep}" for name, deps in IMPORTS.items() for dep in deps
               if dep.split(".")[0].startswith("elkscan_") and dep.split(".")[0] != PACKAGE}
    assert not plugins, "the core must reach plugins through hooks:\n" + "\n".join(sorted(plugins))


def test_a_cycle_and_a_plugin_import_are_seen(tmp_path):
    """The checks above can fail: the same scan over a module pair that imports each other."""
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set()}
    assert _cycle_through("a", graph) == ["a", "b", "a"] and _cycle_through("c", graph) is None
    module = tmp_path / "mod.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .runner import Session\n"
                      "def f():\n    from elkscan_clamav_backend.defaults import x\n")
    assert _imported(f"{PACKAGE}.mod", module) >= {f"{PACKAGE}.runner", "elkscan_clamav_backend.defaults"}
