"""The layers hold and no module imports itself back (docs/architecture.md).

``lint-imports`` checks the contracts in pyproject.toml ([tool.importlinter]); scripts/test.sh runs
it too, so this is the default suite's own check of the same claim. The cycle check uses grimp,
the graph library import-linter is built on: an import ``a -> b`` closes a cycle when ``b`` reaches
``a`` again through any chain (imports inside functions count).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fluorosam_rt", "engines", "bridge", "train")
# Cycles left on purpose, each with its owner; the test fails when one goes, so the entry goes too.
KNOWN_CYCLES: set[frozenset[str]] = set()  # none left (the last, synth tools <-> tool_sites, went)


def module_cycles(graph: grimp.ImportGraph, packages: tuple[str, ...]) -> set[frozenset[str]]:
    """Each pair (a, b) with a -> b directly and a chain b -> ... -> a back, as {a, b}."""
    found: set[frozenset[str]] = set()
    for a in sorted(graph.modules):
        if not a.startswith(packages):
            continue
        for b in graph.find_modules_directly_imported_by(a):
            if b.startswith(packages) and graph.chain_exists(importer=b, imported=a):
                found.add(frozenset({a, b}))
    return found


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    sys.path.insert(0, str(ROOT))
    return grimp.build_graph(*PACKAGES, include_external_packages=False, cache_dir=None)


def test_lint_imports_contracts_are_kept() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_no_module_import_cycles(graph: grimp.ImportGraph) -> None:
    cycles = module_cycles(graph, PACKAGES)
    assert cycles == KNOWN_CYCLES, sorted(sorted(c) for c in cycles ^ KNOWN_CYCLES)


def test_the_cycle_check_finds_a_seeded_cycle(graph: grimp.ImportGraph) -> None:
    """The check itself can fail: an engine importing the predictor back closes a cycle."""
    graph.add_import(importer="engines.base", imported="fluorosam_rt.predictor")
    try:
        assert frozenset({"engines.base", "fluorosam_rt.predictor"}) in module_cycles(graph, PACKAGES)
    finally:
        graph.remove_import(importer="engines.base", imported="fluorosam_rt.predictor")
