"""The demo's recipe and its before / after passkey tables (no training: the tables' rows are
built from hand-made results, the scorer is replaced where a checkpoint would be needed)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from longctx.config.recipe import load_recipe
from longctx.config.stages import plan_stages
from longctx.eval.evaluate import RetrievalResult
from longctx.eval.passkey_check import format_passkey_rows, keys_retrieved, wilson_interval
from longctx.launch import train
from longctx.launch.cli import main

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def test_the_demo_recipe_validates_and_its_dry_run_plans_both_stages(capsys):
    first, second = plan_stages(load_recipe(DEMO))
    assert second.recipe.data.seq_len == 4 * first.recipe.data.seq_len
    assert second.recipe.model.rope_scaling is not None
    assert main(["train", str(DEMO), "--workers", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 1/2 'short'" in out and "stage 2/2 'extend'" in out
    assert "dp 2 x ulysses 1 x ring 1" in out and "dp 1 x ulysses 1 x ring 2" in out


@pytest.mark.parametrize(
    ("hits", "total", "low", "high"),
    [
        (0, 100, 0.0, 0.0370),
        (50, 100, 0.4038, 0.5962),
        (100, 100, 0.9630, 1.0),
        (9, 10, 0.5958, 0.9821),
    ],
)
def test_wilson_interval_matches_the_textbook_values(hits, total, low, high):
    assert wilson_interval(hits, total) == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def result(accuracy: list[float], samples: int = 20, length: int = 1024) -> RetrievalResult:
    depths = [0.1, 0.3, 0.5, 0.7, 0.9][: len(accuracy)]
    examples = [
        {"correct": k < round(value * samples)} for value in accuracy for k in range(samples)
    ]
    return RetrievalResult(
        "passkey", [length], depths, samples, 1, [accuracy], [accuracy], examples
    )


def test_each_row_shows_its_label_depths_mean_and_95_percent_interval():
    table = format_passkey_rows(
        [
            ("stage 1, plain RoPE (no scaling)", result([0.0, 0.05, 0.0, 0.0, 0.0])),
            ("stage 1, YaRN x4 (this stage's)", result([0.5, 0.5, 0.5, 0.5, 0.5])),
        ]
    )
    header, rule, plain, scaled = table.splitlines()
    assert "at 1024 tokens" in header and "d=0.10" in header and "95% CI" in header
    assert set(rule) == {"-"}
    assert plain.startswith("stage 1, plain RoPE (no scaling) |")
    assert plain.endswith("1% (0%-5%) of 100")
    assert scaled.endswith("50% (40%-60%) of 100")
    assert plain.index("|") == scaled.index("|") == header.index("|")
    assert keys_retrieved(result([1.0, 0.5])) == (30, 40)


def test_rows_of_different_lengths_are_refused():
    with pytest.raises(ValueError):
        format_passkey_rows([("a", result([1.0])), ("b", result([1.0], length=256))])


def test_the_before_table_adds_a_plain_rope_row_and_the_after_table_does_not(monkeypatch, tmp_path):
    stage = plan_stages(load_recipe(DEMO))[1]
    scored = []

    def fake_score(checkpoint, recipe, out, stage):
        scored.append((recipe.model.rope_scaling, out))
        plain = recipe.model.rope_scaling is None
        return result([0.0] * 5 if plain else [0.6] * 5), out / "passkey.png"

    monkeypatch.setattr(train, "_score_passkey", fake_score)
    before = train.stage_passkey_table(tmp_path / "ckpt", stage, tmp_path / "b", before=True)
    assert scored == [
        (None, tmp_path / "b" / "plain_rope"),
        (stage.recipe.model.rope_scaling, tmp_path / "b"),
    ]
    lines = before.splitlines()
    assert "stage 1, plain RoPE (no scaling)" in lines[2] and "0% (0%-4%)" in lines[2]
    assert "stage 1, " in lines[3] and "(this stage's)" in lines[3] and "60%" in lines[3]
    assert lines[4].startswith("  heatmaps: ")

    scored.clear()
    after = train.stage_passkey_table(tmp_path / "ckpt", stage, tmp_path / "a")
    assert scored == [(stage.recipe.model.rope_scaling, tmp_path / "a")]
    assert after.splitlines()[2].startswith("stage 2, ") and "plain" not in after

    unscaled = replace(
        stage,
        recipe=stage.recipe.model_copy(
            update={"model": stage.recipe.model.model_copy(update={"rope_scaling": None})}
        ),
    )
    scored.clear()
    train.stage_passkey_table(tmp_path / "ckpt", unscaled, tmp_path / "c", before=True)
    assert len(scored) == 1  # no second plain row when the stage itself is plain RoPE
