"""Staged recipes (trainer/stages.py): validation, the stage plan, where a resume lands, and the
checkpoint tokenizer of ``model.init: hf:PATH``. No processes are started here; training across
a stage boundary is in tests/test_stages_train.py and end to end in tests/test_stages_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hf_fixtures import save_tiny_hf

from longctx.checkpoint.store import CHECKPOINTS_DIR, LATEST_FILE, MANIFEST_FILE
from longctx.config.recipe import Recipe, load_recipe
from longctx.config.stages import plan_stages, stage_of_step
from longctx.errors import LongctxError
from longctx.launch.cli import main
from longctx.trainer.stages import (
    STAGES_FILE,
    check_stage_record,
    resume_point,
    write_stage_record,
)

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}


def staged(stages: list, **trainer) -> dict:
    """A small recipe mapping with ``stages``."""
    return {
        "name": "staged",
        "model": {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
        },
        "data": {"seq_len": 128, "tokenizer": {"vocab_size": 512}},
        "trainer": {"steps": 10, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, **trainer},
        "stages": stages,
    }


EXTEND = {
    "name": "extend",
    "data": {"seq_len": 512},
    "model": {"rope_scaling": YARN, "max_position_embeddings": 512},
    "parallel": {"ring": 2},
    "trainer": {"steps": 6, "lr": 3e-4, "min_lr": 3e-5},
}


def error_of(raw: dict) -> str:
    with pytest.raises(LongctxError) as caught:
        from longctx.config.recipe import parse_recipe

        parse_recipe(raw, source="r.yaml")
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_each_stage_is_the_recipe_with_its_fields_laid_over():
    recipe = Recipe.model_validate(staged([{"name": "short"}, EXTEND]))
    short, extend = plan_stages(recipe)
    assert (short.name, short.start_step, short.end_step) == ("short", 0, 10)
    assert (extend.name, extend.start_step, extend.end_step) == ("extend", 10, 16)
    assert short.recipe.data.seq_len == 128 and short.recipe.model.rope_scaling is None
    assert extend.recipe.data.seq_len == 512
    assert extend.recipe.model.rope_scaling == YARN
    assert extend.recipe.model.max_position_embeddings == 512
    assert (extend.recipe.parallel.ring, extend.recipe.trainer.lr) == (2, 3e-4)
    # untouched fields come from the recipe; the model's shape and hash are shared
    assert extend.recipe.trainer.warmup_steps == 2
    assert extend.recipe.model.hidden_size == 64 and extend.recipe.stages == []
    assert extend.recipe.recipe_hash() == short.recipe.recipe_hash() == recipe.recipe_hash()


def test_a_recipe_without_stages_is_one_stage_of_itself():
    recipe = Recipe.model_validate(staged([]))
    (only,) = plan_stages(recipe)
    assert (only.index, only.count, only.start_step, only.end_step) == (0, 1, 0, 10)
    assert only.recipe is recipe


def test_a_shorter_sequence_in_a_later_stage_is_refused():
    message = error_of(staged([EXTEND, {"name": "back", "data": {"seq_len": 256}}]))
    assert message == (
        "r.yaml: stages[1] ('back'): data.seq_len=256 is shorter than the previous stage's 512; "
        "stages extend the context, so use data.seq_len >= 512 or reorder the stages"
    )


def test_a_stage_cannot_change_the_model_shape():
    message = error_of(staged([{"model": {"hidden_size": 128}}]))
    assert message.startswith("r.yaml: stages[0]: model.hidden_size cannot change per stage")


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ({"data": {"sources": ["x.txt"]}}, "stages[0]: data.sources cannot change per stage"),
        ({"positional": {"kind": "none"}}, "stages[0]: section 'positional' cannot change"),
        ({"trainer": {"zero_stage": 2}}, "stages[0]: trainer.zero_stage cannot change"),
        ("long", "stages[0] is 'long', not a mapping"),
    ],
)
def test_fields_a_stage_may_not_set_are_named(stage, expected):
    assert expected in error_of(staged([stage]))


def test_a_stage_whose_merged_recipe_is_invalid_names_the_stage_and_field():
    # ring 3 needs a sequence length divisible by 2 x 3
    message = error_of(staged([{"name": "odd", "parallel": {"ring": 3}, "data": {"seq_len": 256}}]))
    assert message.startswith("r.yaml: stages[0] ('odd'): data.seq_len=256 is not divisible")
    message = error_of(staged([{"trainer": {"steps": 1}}]))  # warmup 2 > 1 step
    assert "stages[0]: trainer: warmup_steps=2 exceeds steps=1" in message


def test_the_cli_reports_a_bad_stage_in_one_line_with_exit_2(tmp_path: Path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(staged([EXTEND, {"data": {"seq_len": 64}}])))
    assert main(["train", str(path), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "stages[1]: data.seq_len=64 is shorter" in error


def test_the_until_stage_flag_must_name_a_stage(tmp_path: Path, capsys):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(staged([{"name": "short"}, EXTEND])))
    run_dir = tmp_path / "run"
    args = ["train", str(path), "--until-stage", "3", "--set", f"trainer.run_dir={run_dir}"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "error: --until-stage 3 is not a stage of this recipe, which has 2; pass a number "
        "from 1 to 2\n"
    )
    assert not run_dir.exists()


def test_stage_of_step_covers_each_range_end_inclusive():
    stages = plan_stages(Recipe.model_validate(staged([{"name": "a"}, EXTEND])))
    assert [stage_of_step(stages, step).index for step in (0, 1, 10, 11, 16, 99)] == [
        0,
        0,
        0,
        1,
        1,
        1,
    ]


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint directory with a manifest naming ``step``, published as latest (enough for
    ``resume_point``, which only reads the step)."""
    directory = run_dir / CHECKPOINTS_DIR / f"step_{step:06d}"
    directory.mkdir(parents=True)
    (directory / MANIFEST_FILE).write_text(json.dumps({"step": step}))
    (run_dir / CHECKPOINTS_DIR / LATEST_FILE).write_text(directory.name + "\n")
    return directory


@pytest.mark.parametrize(
    ("step", "stage", "new_stage", "writer"),
    [(4, 0, False, 0), (10, 1, True, 0), (12, 1, False, 1), (16, 1, False, 1)],
)
def test_resume_point_continues_a_stage_or_starts_the_next_at_its_boundary(
    tmp_path: Path, step: int, stage: int, new_stage: bool, writer: int
):
    stages = plan_stages(Recipe.model_validate(staged([{"name": "a"}, EXTEND])))
    checkpoint = fake_checkpoint(tmp_path, step)
    point = resume_point(stages, tmp_path, "latest")
    assert point.checkpoint == checkpoint
    assert (point.stage.index, point.new_stage, point.checkpoint_stage.index) == (
        stage,
        new_stage,
        writer,
    )
    assert point.resumes_exactly == (not new_stage)


def test_a_fresh_start_is_the_first_stage_from_scratch(tmp_path: Path):
    stages = plan_stages(Recipe.model_validate(staged([{"name": "a"}, EXTEND])))
    point = resume_point(stages, tmp_path, None)
    assert (point.stage.index, point.checkpoint, point.new_stage) == (0, None, True)


def test_moving_a_finished_stage_boundary_is_refused_on_resume(tmp_path: Path):
    recorded = plan_stages(Recipe.model_validate(staged([{"name": "a"}, EXTEND])))
    write_stage_record(recorded, tmp_path, recorded[1])
    assert json.loads((tmp_path / STAGES_FILE).read_text())["stages"][1] == {
        "index": 1,
        "name": "extend",
        "start_step": 10,
        "end_step": 16,
        "seq_len": 512,
    }
    fake_checkpoint(tmp_path, 12)
    longer = plan_stages(Recipe.model_validate(staged([{"name": "a"}, EXTEND], steps=12)))
    point = resume_point(longer, tmp_path, "latest")
    with pytest.raises(LongctxError, match=r"stage 1/2 'a' covered steps 0-10 when .* now says"):
        check_stage_record(longer, tmp_path, point)
    # the unfinished last stage may grow: its range is not yet part of the run
    grown = plan_stages(
        Recipe.model_validate(staged([{"name": "a"}, {**EXTEND, "trainer": {"steps": 9}}]))
    )
    check_stage_record(grown, tmp_path, resume_point(grown, tmp_path, "latest"))


def test_hf_init_uses_the_checkpoint_tokenizer_when_it_has_one(tmp_path: Path):
    directory, _ = save_tiny_hf(tmp_path / "hf", "llama", vocab_size=512)
    raw = {
        "model": {"init": f"hf:{directory}"},
        "data": {"seq_len": 64, "tokenizer": {"vocab_size": 300}},
    }
    assert Recipe.model_validate(raw).data.tokenizer.path is None  # none there: trained later
    (directory / "tokenizer.model").write_bytes(b"sentencepiece bytes")
    recipe = Recipe.model_validate(raw)
    assert recipe.data.tokenizer.path == str(directory / "tokenizer.model")
    assert recipe.data.tokenizer.vocab_size == 300  # the section's other fields are kept
    assert recipe.model.hidden_size == 64  # the checkpoint's shape
    explicit = {**raw, "data": {"seq_len": 64, "tokenizer": {"path": "mine.model"}}}
    assert Recipe.model_validate(explicit).data.tokenizer.path == "mine.model"


def test_the_demo_recipe_extends_four_times_with_yarn_and_ring_attention():
    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    first, second = plan_stages(load_recipe(demo))
    assert second.recipe.data.seq_len == 4 * first.recipe.data.seq_len
    assert second.recipe.model.rope_scaling["rope_type"] == "yarn"
    assert second.recipe.parallel.ring == 2
