"""The subpackage import graph is one-way: a lower layer never imports a higher one.

positional < attention < model < parallel; data stands alone (it imports nothing of longctx
but ``errors``); config (the recipe schema) composes the lower packages' config sections;
checkpoint < eval < trainer < launch < bench above them. Every ``import`` statement counts,
including those under ``if TYPE_CHECKING:`` and inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "errors": 0,
    "positional": 1,
    "attention": 2,
    "model": 3,
    "parallel": 4,
    "data": 1,
    "config": 5,
    "checkpoint": 6,
    "eval": 7,
    "trainer": 8,
    "launch": 9,
    "bench": 10,
}
STANDALONE = {"data": {"data", "errors"}}


def _imported_packages(path: Path) -> set[str]:
    """The longctx subpackages (first component after ``longctx.``) ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "longctx" and len(parts) > 1:
                found.add(parts[1])
    return found


def _violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for imported in _imported_packages(path) - {package}:
            allowed = STANDALONE.get(package)
            too_high = imported not in LAYERS or LAYERS[imported] >= LAYERS[package]
            if (allowed is not None and imported not in allowed) or too_high:
                bad.append(f"{path.relative_to(ROOT)} imports longctx.{imported}")
    return bad


@pytest.mark.parametrize("package", [name for name in LAYERS if name != "errors"])
def test_package_imports_only_lower_layers(package):
    assert _violations(package) == []


def test_every_subpackage_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "recipes"}
    assert packages == set(LAYERS) - {"errors"}
