"""The layout promises of README's Layout section: one direction of imports, a thin composition root."""

from __future__ import annotations

import ast

from tests.import_graph import ROOT, floors, imports, lazy_imports, module_files, render, shown_in_readme

SERVICE_LINES_MAX = 250


def test_no_module_imports_itself_through_others():
    floors(imports())  # graphlib.CycleError names the cycle


def test_no_module_imports_one_of_ours_inside_a_function():
    assert lazy_imports() == [], "import at module level; a cycle is fixed by moving code, not by a lazy import"


def test_the_readme_shows_the_import_graph_as_generated():
    shown = shown_in_readme()
    assert shown is not None, "README.md has no import graph block"
    assert shown == render(), "run `python -m tests.import_graph --write` to show the graph as it is"


def test_service_py_stays_a_composition_root():
    lines = (ROOT / "service.py").read_text(encoding="utf-8").count("\n")
    assert lines < SERVICE_LINES_MAX, f"service.py has {lines} lines: its HTTP goes to api/, its commands to cli/"


def test_only_the_settings_read_the_environment():
    readers = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and name != "ledger.settings":
                readers.append(f"{name}:{node.lineno}")
    assert readers == [], "read the environment in Settings.from_env (ledger/settings.py) only"
