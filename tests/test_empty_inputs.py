"""Inputs that used to fall back to defaults silently are refused with one line and exit 2:
an empty recipe (0 bytes, only comments, ``{}``), an empty ``--set`` value, an explicit empty
``stages: []``; an empty data directory already was. The recipe cases run the real ``longctx``
CLI with ``--dry-run`` (the recipe is read and validated exactly as a training launch does);
the data case launches for real, and must stop before Ray starts or anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from longctx.launch.cli import main as cli_main

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "# only a comment\n# and another\n", "{}\n"],
    ids=["0 bytes", "blank", "comments", "empty mapping"],
)
def test_empty_recipe_is_refused(tmp_path, capsys, text):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(text)
    assert cli_main(["train", str(recipe), "--dry-run"]) == 2
    line = _one_error_line(capsys)
    assert "is empty" in line and "recipes/tiny.yaml" in line


def test_empty_set_value_is_refused(capsys):
    assert cli_main(["train", str(TINY), "--dry-run", "--set", "trainer.lr="]) == 2
    line = _one_error_line(capsys)
    assert "trainer.lr=" in line and "empty value" in line


def test_empty_stage_list_is_refused(tmp_path, capsys):
    recipe = tmp_path / "staged.yaml"
    recipe.write_text(TINY.read_text() + "\nstages: []\n")
    assert cli_main(["train", str(recipe), "--dry-run"]) == 2
    line = _one_error_line(capsys)
    assert "stages is an empty list" in line


def test_empty_data_directory_is_refused(tmp_path, capsys):
    empty = tmp_path / "no_docs"
    empty.mkdir()
    args = ["train", str(TINY), "--set", f"data.sources=[{empty}]"]
    args += ["--set", "data.tasks={text: 1.0}", "--set", f"trainer.run_dir={tmp_path / 'run'}"]
    code = cli_main(args)
    line = _one_error_line(capsys)
    assert code == 2 and "has no .txt or .jsonl" in line
    assert not (tmp_path / "run").exists()
