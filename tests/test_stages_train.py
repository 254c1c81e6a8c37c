"""Training across a stage boundary on 2 real gloo ranks (``train_worker`` as the launcher calls
it, one call per stage): stage 1 at 64 tokens data parallel, stage 2 at 128 tokens with YaRN
and ring attention over both ranks.

References: an uninterrupted run (a stage-2 run interrupted after its first checkpoint and
resumed must end with the same weights and losses, fp32, exact algorithms: 1e-6), the stage's
own LR schedule formula (``lr_factor`` restarted at the stage's first step), and the stage-1
weights themselves (a stage 2 with a negligible LR must end where stage 1 ended).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import run_on_ranks
from trainer_helpers import deepspeed_environment, make_data, tiny_recipe

from longctx.checkpoint.store import load_model_state_dict
from longctx.config.recipe import Recipe
from longctx.config.stages import plan_stages
from longctx.trainer.engine import lr_factor

pytestmark = pytest.mark.slow  # 6 stage launches of DeepSpeed on 2 spawned ranks (~40 s)

YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}


class Interrupted(Exception):
    """Raised by the report callback to stop a rank right after a checkpoint."""


def rank_stages(rank: int, world: int, jobs: list[dict]) -> list[dict]:
    """Run ``train_worker`` for each job in turn; a job with ``interrupt_at`` stops (as a killed
    launch would) right after the checkpoint of that step is reported."""
    from longctx.trainer.worker import train_worker

    results = []
    for job in jobs:
        reports: list[dict] = []
        job = dict(job)
        stop = job.pop("interrupt_at", None)  # the test's own key, not a TrainJob field

        def report(metrics: dict, checkpoint: str | None, sink=reports, stop=stop) -> None:
            sink.append(metrics)
            if stop is not None and checkpoint is not None and metrics["step"] == stop:
                raise Interrupted

        try:
            summary = train_worker(job, report)
        except Interrupted:
            summary = None
        results.append({"summary": summary, "reports": reports})
    return results


def two_stages(corpus: Path, tokenizer: Path, run_dir: Path, **extend_trainer) -> Recipe:
    base = tiny_recipe(
        corpus, tokenizer, run_dir, steps=2, grad_accum=1, eval_every=0, ckpt_every=1, keep_last=9
    ).model_dump(mode="json")
    extend = {
        "name": "extend",
        "data": {"seq_len": 128},
        "model": {"rope_scaling": YARN, "max_position_embeddings": 128},
        "parallel": {"ring": 2},
        "trainer": {"steps": 3, "micro_batch_size": 1, "warmup_steps": 2, **extend_trainer},
    }
    return Recipe.model_validate({**base, "stages": [{"name": "short"}, extend]})


def stage_job(recipe: Recipe, resume: str | None, last_stage: int, **extra) -> dict:
    return {
        "recipe": recipe.model_dump(mode="json"),
        "run_dir": recipe.trainer.run_dir,
        "resume": resume,
        "last_stage": last_stage,
        **extra,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stages")
    corpus, tokenizer = make_data(root / "data")
    full = two_stages(corpus, tokenizer, root / "full")
    interrupted = two_stages(corpus, tokenizer, root / "interrupted")
    frozen = two_stages(corpus, tokenizer, root / "frozen", lr=1e-12, min_lr=0.0)
    boundary = str(root / "full" / "checkpoints" / "step_000002")
    jobs = [
        stage_job(full, None, 0),
        stage_job(full, "latest", 1),
        stage_job(interrupted, None, 0),
        stage_job(interrupted, "latest", 1, interrupt_at=3),
        stage_job(interrupted, "latest", 1),
        stage_job(frozen, boundary, 1),  # stage 2 from the full run's stage-1 weights
    ]
    with deepspeed_environment():
        results = run_on_ranks(rank_stages, 2, jobs)
    return {"root": root, "results": results[0], "full": full}


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_model_state_dict(run_dir / "checkpoints" / f"step_{step:06d}")


def test_steps_are_global_and_each_launch_trains_one_stage(runs):
    first, second = runs["results"][:2]
    assert [m["step"] for m in first["reports"]] == [1, 2]
    assert [m["step"] for m in second["reports"]] == [3, 4, 5]
    assert (first["summary"]["stage"], second["summary"]["stage"]) == (0, 1)
    assert second["summary"]["tokens_seen"] == 2 * (2 * 2 * 64) + 3 * (1 * 128)


def test_a_new_stage_starts_a_fresh_lr_schedule_over_its_own_steps(runs):
    cfg = plan_stages(runs["full"])[1].recipe.trainer
    second = runs["results"][1]
    expected = [
        cfg.lr * lr_factor(k, warmup_steps=2, total_steps=3, min_ratio=cfg.min_lr / cfg.lr)
        for k in range(3)
    ]  # [lr / 2, lr, min_lr]: a continued stage-1 schedule would sit at its floor
    assert [m["lr"] for m in second["reports"]] == pytest.approx(expected, rel=1e-6)


def test_a_new_stage_starts_from_the_previous_stage_final_weights(runs):
    root = runs["root"]
    start = weights(root / "full", 2)
    end = weights(root / "frozen", 5)  # 3 steps at lr 1e-12 from those weights
    for name, tensor in start.items():
        torch.testing.assert_close(end[name], tensor, rtol=0, atol=1e-8)


def test_resume_inside_a_stage_continues_that_stage_exactly(runs):
    root = runs["root"]
    full, interrupted, resumed = (runs["results"][i] for i in (1, 3, 4))
    assert interrupted["summary"] is None and [m["step"] for m in interrupted["reports"]] == [3]
    assert [m["step"] for m in resumed["reports"]] == [4, 5]
    full_losses = {m["step"]: m["loss"] for m in full["reports"]}
    for metrics in resumed["reports"]:
        assert metrics["loss"] == pytest.approx(full_losses[metrics["step"]], rel=1e-6)
    expected = weights(root / "full", 5)
    for name, tensor in weights(root / "interrupted", 5).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6)


def test_the_stage_passkey_table_scores_the_weights_under_the_stage_settings(runs, tmp_path):
    """The demo's before/after table: the checkpoint's weights in a model built with the
    stage's YaRN settings, scored by the passkey evaluator at the stage's length."""
    from longctx.data import load_tokenizer
    from longctx.eval.evaluate import passkey_accuracy
    from longctx.eval.passkey_check import DEPTHS
    from longctx.launch.train import STAGE_PASSKEY_EXAMPLES, stage_passkey_table
    from longctx.model import Transformer

    raw = runs["full"].model_dump(mode="json")
    raw["stages"][1]["data"]["seq_len"] = 192  # long enough for a passkey prompt
    stage = plan_stages(Recipe.model_validate(raw))[1]
    checkpoint = runs["root"] / "full" / "checkpoints" / "step_000005"
    table = stage_passkey_table(checkpoint, stage, tmp_path / "eval")
    written = json.loads((tmp_path / "eval" / "passkey.json").read_text())
    assert (tmp_path / "eval" / "passkey.png").is_file() and "heatmap" in table

    model = Transformer(stage.recipe.model, stage.recipe.positional, stage.recipe.attention)
    model.load_state_dict(load_model_state_dict(checkpoint))
    expected = passkey_accuracy(
        model,
        load_tokenizer(stage.recipe.data.tokenizer.path),
        [192],
        list(DEPTHS),
        samples=STAGE_PASSKEY_EXAMPLES // len(DEPTHS),
        seed=stage.recipe.data.seed + 1,
        params=stage.recipe.data.task_params,
    )
    assert written["lengths"] == [192] and written["accuracy"] == expected.accuracy
    ours = [example["answer_nll"] for example in written["examples"]]
    theirs = [example["answer_nll"] for example in expected.examples]
    assert ours == pytest.approx(theirs, rel=1e-5)
