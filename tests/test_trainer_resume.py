"""Exact resume: N steps, a crash right after the checkpoint, ``--resume latest`` for N more
steps gives fp32 weights and AdamW moments identical (``torch.equal``) to 2N uninterrupted
steps, fp32 on CPU, 2 ranks, ZeRO stages 0, 2 and 3 (the ZeRO-2 runs with activation
checkpointing and offload, so the wrapped layers save and resume under the plain names).

The interrupted run is killed by its own ``report`` callback (as a preempted worker would die
after its checkpoint); the resume runs in freshly spawned processes, so nothing survives in
memory: model, optimizer, LR schedule, step counters, data position and RNG all come from the
checkpoint. Evaluations at every other step run in both runs and must not disturb anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import run_on_ranks
from trainer_helpers import deepspeed_environment, job, make_data, rank_train, tiny_recipe

from longctx.checkpoint.sharded_state import iter_model_tensors
from longctx.checkpoint.store import verify_checkpoint
from longctx.trainer.engine import lr_factor

pytestmark = pytest.mark.slow  # two rounds of spawned 2-rank DeepSpeed runs

HALF = 3  # N: steps before the interruption
STAGES = (0, 2, 3)
RETUNED_LR = 1e-2


class Preempted(Exception):
    """Raised by the report callback to stop a run right after a checkpoint."""


def _crash_after_first_checkpoint(metrics: dict, checkpoint: str | None) -> None:
    if checkpoint is not None:
        raise Preempted(f"stopped after step {metrics['step']}")


def _rank_interrupted(rank: int, world: int, jobs: list[dict]) -> list[int]:
    from longctx.trainer.worker import train_worker

    stopped_at = []
    for one_job in jobs:
        with pytest.raises(Preempted) as stop:
            train_worker(one_job, _crash_after_first_checkpoint)
        stopped_at.append(int(str(stop.value).split()[-1]))
    return stopped_at


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    corpus, tokenizer = make_data(root / "data")

    def recipe(stage: int, name: str):
        return tiny_recipe(
            corpus,
            tokenizer,
            root / f"{name}_zero{stage}",
            zero_stage=stage,
            steps=2 * HALF,
            ckpt_every=HALF,
            eval_every=2,
            keep_last=3,
            # ZeRO-2 runs with the layer wrappers: their checkpoints carry the plain names
            activation_checkpointing=stage == 2,
            offload_activations=stage == 2,
        )

    interrupted = {s: recipe(s, "interrupted") for s in STAGES}
    uninterrupted = {s: recipe(s, "uninterrupted") for s in STAGES}
    # The ZeRO-0 checkpoint at step N, continued into a new run directory with a new peak LR.
    retuned = recipe(0, "retuned")
    retuned.trainer.lr = RETUNED_LR
    first_checkpoint = f"{interrupted[0].trainer.run_dir}/checkpoints/step_{HALF:06d}"
    with deepspeed_environment():
        stopped = run_on_ranks(_rank_interrupted, 2, [job(interrupted[s]) for s in STAGES])
        later_jobs = [job(interrupted[s], resume="latest") for s in STAGES]
        later_jobs += [job(uninterrupted[s]) for s in STAGES]
        later_jobs += [job(retuned, resume=first_checkpoint)]
        continued = run_on_ranks(rank_train, 2, later_jobs)
    return {
        "stopped": stopped,
        "resumed": {s: continued[0][i] for i, s in enumerate(STAGES)},
        "straight": {s: continued[0][len(STAGES) + i] for i, s in enumerate(STAGES)},
        "retuned": (retuned, continued[0][-1]),
        "dirs": {
            s: (interrupted[s].trainer.run_dir, uninterrupted[s].trainer.run_dir) for s in STAGES
        },
    }


def test_interrupted_runs_stopped_after_their_first_checkpoint(runs):
    assert runs["stopped"] == [[HALF] * len(STAGES)] * 2


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("key", ["param", "exp_avg", "exp_avg_sq"])
def test_resumed_weights_and_moments_equal_uninterrupted_ones(runs, stage, key):
    resumed_dir, straight_dir = runs["dirs"][stage]
    final = f"checkpoints/step_{2 * HALF:06d}"
    verify_checkpoint(f"{resumed_dir}/{final}")
    resumed = dict(iter_model_tensors(Path(f"{resumed_dir}/{final}"), key=key))
    straight = dict(iter_model_tensors(Path(f"{straight_dir}/{final}"), key=key))
    assert resumed.keys() == straight.keys() and straight
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), f"ZeRO {stage}: {key} of {name}"


@pytest.mark.parametrize("stage", STAGES)
def test_resumed_losses_equal_uninterrupted_losses_step_by_step(runs, stage):
    resumed = {m["step"]: m for m, _ in runs["resumed"][stage]["reports"]}
    straight = {m["step"]: m for m, _ in runs["straight"][stage]["reports"]}
    assert sorted(resumed) == list(range(HALF + 1, 2 * HALF + 1))  # continued from step N
    for step, metrics in resumed.items():
        for key in ("loss", "lr", "grad_norm", "tokens_seen", "eval_loss"):
            assert metrics.get(key) == straight[step].get(key), (stage, step, key)
    assert (
        runs["resumed"][stage]["summary"]["tokens_seen"]
        == (runs["straight"][stage]["summary"]["tokens_seen"])
    )


def test_a_resumed_run_uses_the_recipes_new_peak_learning_rate(runs):
    """The checkpoint stores the old rate; the continuation follows the recipe in force."""
    recipe, result = runs["retuned"]
    cfg = recipe.trainer
    logged = {m["step"]: m["lr"] for m, _ in result["reports"]}
    assert sorted(logged) == list(range(HALF + 1, 2 * HALF + 1))
    for step, lr in logged.items():
        expected = RETUNED_LR * lr_factor(
            step - 1,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            min_ratio=cfg.min_lr / RETUNED_LR,
        )
        assert lr == pytest.approx(expected, rel=1e-12), step
