"""The written design matches the tree: every module path that docs/architecture.md names
exists, every ``longctx.X.Y`` it names imports to a real module or attribute, and the README
points nowhere outside the repository."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# `attention/core.py`, `trainer/`, `recipes/tiny.yaml`, `bench/results/REPORT.md`
PATH = re.compile(r"`((?:[a-z_]+/)+(?:[A-Za-z_.\-]+\.(?:py|yaml|md|json|sh))?)(?:::[A-Za-z_.]+)?`")
DOTTED = re.compile(r"`(longctx(?:\.[A-Za-z_]+)+)`")


def _paths(text: str) -> list[str]:
    return sorted(set(PATH.findall(text)))


def test_architecture_doc_names_only_existing_paths():
    text = ARCHITECTURE.read_text()
    paths = _paths(text)
    assert len(paths) > 30, "the architecture doc should walk through the tree file by file"
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == []


@pytest.mark.parametrize("dotted", sorted(set(DOTTED.findall(ARCHITECTURE.read_text()))))
def test_architecture_doc_names_only_existing_modules(dotted):
    parts = dotted.split(".")
    for split in range(len(parts), 1, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for name in parts[split:]:
            target = getattr(target, name)
        return
    pytest.fail(f"{dotted} does not import")


def test_readme_links_stay_inside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert "../" not in text
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert all(not link.startswith(("http", "/")) for link in links), links
    # runs/ holds what a run writes; NAME stands for any benchmark
    named = [p for p in _paths(text) if not p.startswith("runs/") and "NAME" not in p]
    assert [p for p in named if not (ROOT / p).exists()] == []
