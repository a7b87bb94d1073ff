"""The package's layers are a contract (issue 18): import-linter's contracts in pyproject.toml, and no
import circle anywhere, deferred imports (inside functions) included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "us", "kr", "kis_token")


def test_import_linter_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")  # import-linter's command (dev extra)
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_module_takes_part_in_an_import_circle():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    circles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                circles.append(" -> ".join((importer, *back)))
    assert circles == []


def test_the_layer_check_sees_deferred_imports():
    """grimp counts an import inside a function like one at the top (else a circle could hide)."""
    graph = grimp.build_graph("common", cache_dir=None)
    assert "common.auth.broker" in graph.find_modules_directly_imported_by("common.base_token_manager")


def test_every_sub_package_says_its_one_job():
    for init in [*sorted((REPO / "common").rglob("__init__.py")), REPO / "kis_token" / "__init__.py"]:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, init


def test_no_production_module_is_over_400_lines():
    too_long = {
        str(path.relative_to(REPO)): lines
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if "sandbox" not in path.parts and (lines := len(path.read_text().splitlines())) > 400
    }
    assert too_long == {}
