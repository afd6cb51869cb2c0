"""The import graph of the service's code, from the code itself: ``python -m tests.import_graph [--write]``.

Prints the block the README's Layout section shows (``--write`` puts it there) (tests/test_layout.py
checks that the README holds exactly this, that no module imports itself
through others, and that no module imports one of ours inside a function).
"""

from __future__ import annotations

import ast
import re
import sys
from graphlib import TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("events", "ledger", "projections", "api", "cli")
TOP_MODULES = ("service",)


def module_files() -> dict[str, Path]:
    files = {name: ROOT / f"{name}.py" for name in TOP_MODULES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):  # sub-packages too (api/console/)
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imported(node: ast.AST, modules: set[str]) -> set[str]:
    """Our modules an import statement names (``from api import auth`` names ``api.auth``)."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {name for name in names if name in modules and not _is_package_of(name, names, modules)}


def _is_package_of(name: str, names: set[str], modules: set[str]) -> bool:
    # `from api import auth` imports the package api and the module api.auth: count the module only.
    return any(other.startswith(name + ".") for other in names if other in modules)


def imports() -> dict[str, set[str]]:
    """Each module's imports of our modules, at module level (what loading it loads)."""
    files = module_files()
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = set()
        for node in tree.body:
            graph[name] |= _imported(node, modules)
        graph[name].discard(name)
    return graph


def lazy_imports() -> list[str]:
    """Imports of our modules inside functions: ``module:line imported``."""
    files = module_files()
    modules = set(files)
    found = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for top in tree.body:
            for node in ast.walk(top):
                if node is not top and isinstance(node, (ast.Import, ast.ImportFrom)) and _imported(node, modules):
                    found.append(f"{name}:{node.lineno} {', '.join(sorted(_imported(node, modules)))}")
    return found


def floors(graph: dict[str, set[str]]) -> list[list[str]]:
    """Modules by floor: each imports only modules on floors below it (graphlib.CycleError on a cycle)."""
    order = list(TopologicalSorter(graph).static_order())
    floor_of: dict[str, int] = {}
    for name in order:
        floor_of[name] = 1 + max((floor_of[dep] for dep in graph[name]), default=0)
    result: list[list[str]] = [[] for _ in range(max(floor_of.values()))]
    for name in sorted(floor_of):
        if name not in PACKAGES:  # a package's __init__ holds its docstring only
            result[floor_of[name] - 1].append(name)
    return result


def _package(module: str) -> str:
    return module.split(".")[0]


def render() -> str:
    graph = imports()
    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        packages.setdefault(_package(module), set()).update(_package(d) for d in deps if _package(d) != _package(module))
    lines = ["packages (A -> B: some module of A imports one of B):"]
    for package in sorted(packages, key=lambda p: (-len(packages[p]), p)):
        lines.append(f"  {package} -> {', '.join(sorted(packages[package])) or '(nothing of ours)'}")
    lines.append("modules by floor (each imports only modules on floors below it; no cycle):")
    for number, names in reversed(list(enumerate(floors(graph), start=1))):
        lines.append(f"  {number}: {' '.join(names)}")
    return "\n".join(lines)


README_BLOCK = re.compile(r"(<!-- imports:start -->\n```\n)(.*?)(\n```\n<!-- imports:end -->)", re.S)


def shown_in_readme() -> str | None:
    found = README_BLOCK.search((ROOT / "README.md").read_text(encoding="utf-8"))
    return found.group(2) if found else None


def write_readme() -> None:
    readme = ROOT / "README.md"
    text, count = README_BLOCK.subn(lambda m: m.group(1) + render() + m.group(3), readme.read_text(encoding="utf-8"))
    assert count == 1, "README.md needs one <!-- imports:start --> ... <!-- imports:end --> block"
    readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write_readme()
    else:
        print(render())
