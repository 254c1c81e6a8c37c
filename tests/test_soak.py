"""Worker crashes during ``longctx train``: SIGKILL of Ray Train worker processes at random steps.

Ray Train's ``FailureConfig`` (``trainer.max_failures``) restarts the worker group, which resumes
from the last checkpoint it reported; the finished run must hold exactly (``torch.equal``, fp32)
the final weights of the same command run without kills.

- ``test_a_worker_killed_at_a_random_step_...``: 2 workers, 24 steps, a checkpoint every 4, one
  kill at a random step (slow, part of the suite).
- ``test_soak_...``: 200 steps, a checkpoint every 10, three kills at random steps, at most
  ``keep_last`` checkpoints on disk at the end (and never more than one extra while a new one is
  published). It takes several minutes on 2 cores, so it runs only with ``LONGCTX_SOAK=1``
  (``make soak``).

The runs train on the test corpus with a tokenizer trained once and passed by path, so every
invocation reads the same token ids.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
import yaml
from trainer_helpers import make_data
from worker_kills import train_with_kills

from longctx.checkpoint.store import load_model_state_dict

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _recipe_file(directory: Path, data: tuple[Path, Path]) -> Path:
    """The tiny recipe on the test corpus and tokenizer, as a file (paths inside the recipe,
    not on the command line)."""
    corpus, tokenizer = data
    raw = yaml.safe_load(TINY.read_text())
    raw["data"].update(sources=[str(corpus)], tasks={"text": 1.0})
    raw["data"]["tokenizer"] = {"path": str(tokenizer)}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _args(run_dir: Path, recipe: Path, steps: int, ckpt_every: int, **extra) -> list[str]:
    settings = {
        "trainer.run_dir": str(run_dir),
        "trainer.steps": steps,
        "trainer.ckpt_every": ckpt_every,
        "trainer.log_every": 1,
        "trainer.eval_every": 0,
        **extra,
    }
    args = [str(recipe), "--workers", "2"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def _final_weights(run_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    return load_model_state_dict(run_dir / "checkpoints" / f"step_{steps:06d}")


def _assert_same_weights(killed: Path, straight: Path, steps: int) -> None:
    got, expected = _final_weights(killed, steps), _final_weights(straight, steps)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def _crash_and_reference(tmp_path: Path, steps: int, ckpt_every: int, kill_steps, **extra):
    recipe = _recipe_file(tmp_path, make_data(tmp_path / "data"))
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = train_with_kills(
        _args(straight_dir, recipe, steps, ckpt_every, **extra), tmp_path, straight_dir, []
    )
    assert straight.returncode == 0, straight.output[-4000:]
    failures = len(kill_steps)
    killed = train_with_kills(
        _args(killed_dir, recipe, steps, ckpt_every, **{"trainer.max_failures": failures, **extra}),
        tmp_path,
        killed_dir,
        kill_steps,
        seed=steps,
    )
    assert killed.returncode == 0, killed.output[-4000:]
    return straight_dir, killed_dir, killed


@pytest.mark.slow
@pytest.mark.heavy
def test_a_worker_killed_at_a_random_step_restarts_and_ends_with_identical_weights(tmp_path):
    steps, ckpt_every = 24, 4
    kill_step = random.Random(20261128).randint(ckpt_every + 1, steps // 2)
    straight_dir, killed_dir, killed = _crash_and_reference(
        tmp_path, steps, ckpt_every, [kill_step]
    )
    assert len(killed.kills) == 1 and killed.kills[0][0] >= kill_step
    assert killed.output.count("resumed from") == 1  # the restarted group resumed once
    _assert_same_weights(killed_dir, straight_dir, steps)


SOAK_KEEP = 2


@pytest.mark.skipif(os.environ.get("LONGCTX_SOAK") != "1", reason="soak: run with make soak")
def test_soak_three_random_kills_over_200_steps_complete_with_identical_weights(tmp_path):
    steps, ckpt_every = 200, 10
    kill_steps = sorted(random.Random(7).sample(range(15, 180), 3))
    straight_dir, killed_dir, killed = _crash_and_reference(
        tmp_path, steps, ckpt_every, kill_steps, **{"trainer.keep_last": SOAK_KEEP}
    )
    assert len(killed.kills) == 3
    assert killed.output.count("resumed from") == 3
    kept = sorted(p.name for p in (killed_dir / "checkpoints").glob("step_*"))
    assert len(kept) <= SOAK_KEEP and kept[-1] == f"step_{steps:06d}"
    assert killed.most_checkpoints <= SOAK_KEEP + 1
    _assert_same_weights(killed_dir, straight_dir, steps)
