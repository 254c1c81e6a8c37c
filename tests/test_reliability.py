"""Reliability of checkpoints and of the numerics guard, with real training processes.

- Corruption: a flipped byte or a truncated file in a real checkpoint is refused by its sha256,
  naming the file; a manifest entry that leaves the checkpoint directory (``../``, an absolute
  path, a symlink out) is refused before anything is read.
- Numerics: a run whose first update blows the weights up (``trainer.lr`` 3e37: every later
  loss is NaN) skips and counts the bad steps (``bad_steps`` metric) and stops after
  ``trainer.max_bad_steps`` in a row with one line. A NaN written into a real ZeRO-2 engine's
  fp32 master weights (as a memory fault would) makes ``save_checkpoint`` refuse on every rank
  before anything is renamed: no checkpoint of non-finite tensors is ever published.
- Interrupted checkpoint: a real training process is frozen (SIGSTOP) while its checkpoint
  staging directory exists and then killed (SIGKILL); ``--resume latest`` continues from the
  previous complete checkpoint, reports the partial directory on stderr and never loads it.

The training runs use the 2-layer test model (``trainer_helpers``) on 2 gloo ranks under ZeRO-2,
so every tensor of a checkpoint is gathered from two partitions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import run_on_ranks
from trainer_helpers import (
    deepspeed_env,
    deepspeed_environment,
    job,
    make_data,
    rank_train,
    tiny_recipe,
    tree_digest,
)

from longctx.checkpoint.run_dir import validate_run
from longctx.checkpoint.sharded_state import INDEX_FILE, part_file
from longctx.checkpoint.store import MANIFEST_FILE, verify_checkpoint
from longctx.errors import LongctxError

pytestmark = pytest.mark.slow  # spawned 2-rank DeepSpeed runs and a killed training process

DIVERGING_LR = 3e37  # AdamW's first update moves every weight by ~3e37: later losses are NaN
RANKS_TIMEOUT_S = 1800  # generous: a loaded machine may first rebuild DeepSpeed's comm op


def _rank_poisoned_save(recipe_dump: dict, run_dir: str) -> dict:
    """Build the recipe's engine, save a good checkpoint at step 1, write a NaN into one fp32
    master weight (every rank takes part in DeepSpeed's gather/scatter), then try step 2."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    from longctx.checkpoint.store import save_checkpoint
    from longctx.config.recipe import Recipe
    from longctx.trainer.engine import build_engine
    from longctx.trainer.worker import build_model, seed_everything

    recipe = Recipe.model_validate(recipe_dump)
    seed_everything(recipe.trainer.seed)
    engine = build_engine(build_model(recipe), recipe.trainer)
    save = {"tokens_seen": 0, "data_cursor": {}, "recipe": recipe, "tokenizer_bytes": None}
    save_checkpoint(engine, run_dir, step=1, **save)
    param = engine.module.model.layers[0].mlp.down_proj.weight
    value = safe_get_full_fp32_param(param)
    value[3, 5] = float("nan")
    safe_set_full_fp32_param(param, value)
    try:
        save_checkpoint(engine, run_dir, step=2, **save)
    except LongctxError as error:
        return {"error": str(error)}
    return {"error": None}


def _rank_runs(rank: int, world: int, jobs: list[dict], poisoned: dict) -> list[dict]:
    return [*rank_train(rank, world, jobs), _rank_poisoned_save(**poisoned)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """On the same 2 ranks: a good run (checkpoints at steps 2 and 4), a run that diverges for
    good, and the poisoned save."""
    root = tmp_path_factory.mktemp("reliability")
    corpus, tokenizer = make_data(root / "data")
    common = {"zero_stage": 2, "eval_every": 0}
    good = tiny_recipe(corpus, tokenizer, root / "good", steps=4, ckpt_every=2, **common)
    stuck = tiny_recipe(
        corpus,
        tokenizer,
        root / "stuck",
        steps=10,
        ckpt_every=100,
        max_bad_steps=3,
        lr=DIVERGING_LR,
        min_lr=0.0,
        warmup_steps=0,
        **common,
    )
    poisoned = tiny_recipe(corpus, tokenizer, root / "poisoned", **common)
    poisoned_job = {
        "recipe_dump": poisoned.model_dump(mode="json"),
        "run_dir": str(root / "poisoned"),
    }
    with deepspeed_environment():
        jobs = [job(good), job(stuck)]
        results = run_on_ranks(_rank_runs, 2, jobs, poisoned_job, timeout=RANKS_TIMEOUT_S)
    return {"root": root, "good": good, "stuck": stuck, "poisoned": poisoned, "results": results}


@pytest.fixture
def checkpoint_copy(runs, tmp_path) -> Path:
    """A private copy of the good run's step-4 checkpoint directory tree, free to damage."""
    import shutil

    run_dir = Path(shutil.copytree(runs["good"].trainer.run_dir, tmp_path / "run"))
    return run_dir / "checkpoints" / "step_000004"


def _refusal(recipe, checkpoint: Path) -> str:
    """The one-line message ``validate_run`` refuses ``--resume checkpoint`` with; also checks
    that nothing under the run directory changed."""
    run_dir = checkpoint.parent.parent
    before = tree_digest(run_dir)
    with pytest.raises(LongctxError) as caught:
        validate_run(recipe, run_dir, str(checkpoint))
    assert tree_digest(run_dir) == before
    message = str(caught.value)
    assert "\n" not in message
    return message


def _rewrite_manifest(checkpoint: Path, **changes) -> None:
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    manifest.update(changes)
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------
# Corruption


def test_the_good_run_finished_and_its_checkpoint_verifies(runs):
    assert runs["results"][0][0]["summary"]["step"] == 4
    checkpoint = Path(runs["good"].trainer.run_dir) / "checkpoints" / "step_000004"
    assert verify_checkpoint(checkpoint, runs["good"])["step"] == 4


RANK1_SHARD = part_file(1, 0)  # rank 1's fragments (the tiny model fits one part per rank)


def test_a_flipped_byte_in_the_weights_is_refused_naming_the_file(runs, checkpoint_copy):
    weights = checkpoint_copy / part_file(0, 0)
    data = bytearray(weights.read_bytes())
    data[len(data) * 2 // 3] ^= 0x01  # one bit inside the tensor data
    weights.write_bytes(bytes(data))
    message = _refusal(runs["good"], checkpoint_copy)
    assert f"sha256 of {part_file(0, 0)} is" in message and "damaged" in message


def test_a_truncated_shard_is_refused_naming_the_file(runs, checkpoint_copy):
    shard = checkpoint_copy / RANK1_SHARD
    shard.write_bytes(shard.read_bytes()[:-4096])
    message = _refusal(runs["good"], checkpoint_copy)
    assert f"shard {RANK1_SHARD} is truncated" in message and "resume from another" in message


def test_a_missing_shard_is_refused_naming_the_file(runs, checkpoint_copy):
    (checkpoint_copy / RANK1_SHARD).unlink()
    message = _refusal(runs["good"], checkpoint_copy)
    assert f"lacks 1 file(s) its manifest lists, e.g. {RANK1_SHARD}" in message


def test_a_shard_of_another_checkpoint_is_refused_even_with_its_sha256(runs, checkpoint_copy):
    """Step 2's rank-1 shard in step 4's place, the manifest's sha256 updated to match: only the
    checkpoint id inside the shard can tell."""
    foreign = checkpoint_copy.parent / "step_000002" / RANK1_SHARD
    (checkpoint_copy / RANK1_SHARD).write_bytes(foreign.read_bytes())
    manifest = json.loads((checkpoint_copy / MANIFEST_FILE).read_text())
    digest = hashlib.sha256(foreign.read_bytes()).hexdigest()
    _rewrite_manifest(checkpoint_copy, files={**manifest["files"], RANK1_SHARD: digest})
    message = _refusal(runs["good"], checkpoint_copy)
    assert f"shard {RANK1_SHARD} belongs to another checkpoint" in message


def test_a_shard_count_that_differs_from_the_index_is_refused(runs, checkpoint_copy):
    """Rank 1's shard removed together with its manifest entry: the files are consistent with
    the manifest, but not with the index (2 ranks)."""
    (checkpoint_copy / RANK1_SHARD).unlink()
    manifest = json.loads((checkpoint_copy / MANIFEST_FILE).read_text())
    files = {name: digest for name, digest in manifest["files"].items() if name != RANK1_SHARD}
    _rewrite_manifest(checkpoint_copy, files=files)
    message = _refusal(runs["good"], checkpoint_copy)
    assert "shard count does not match the metadata" in message and INDEX_FILE in message


def test_a_checkpoint_of_the_old_full_state_format_is_refused_naming_it(runs, checkpoint_copy):
    _rewrite_manifest(checkpoint_copy, format=2)
    message = _refusal(runs["good"], checkpoint_copy)
    assert "checkpoint format 2 (full-state model.safetensors + optimizer.safetensors)" in message


@pytest.mark.parametrize("escape", ["../../../config.yaml", "absolute", "symlink"])
def test_a_manifest_path_leaving_the_checkpoint_is_refused(runs, checkpoint_copy, escape):
    """The listed file exists and its sha256 is right, so only the path check can refuse it."""
    outside = checkpoint_copy.parent.parent / "config.yaml"
    if escape == "absolute":
        name = str(outside)
    elif escape == "symlink":
        name = "link.yaml"
        (checkpoint_copy / name).symlink_to(outside)
    else:
        name = escape
    manifest = json.loads((checkpoint_copy / MANIFEST_FILE).read_text())
    files = {**manifest["files"], name: hashlib.sha256(outside.read_bytes()).hexdigest()}
    _rewrite_manifest(checkpoint_copy, files=files)
    message = _refusal(runs["good"], checkpoint_copy)
    assert f"lists {name!r}, a path outside the checkpoint directory" in message


# ---------------------------------------------------------------------------------------------
# Numerics guard


def test_non_finite_weights_are_never_published_as_a_checkpoint(runs):
    """Every rank refuses with one line; step 1 stays ``latest``, no step-2 or staging
    directory exists."""
    for rank_results in runs["results"]:
        message = rank_results[2]["error"]
        assert message is not None and "\n" not in message
        assert "holds NaN or inf, so checkpoint step_000002 was not written" in message
    assert runs["results"][0][2]["error"].startswith("step 2: layers.0.mlp.down_proj.weight ")
    root = Path(runs["poisoned"].trainer.run_dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    assert (root / "latest").read_text().strip() == "step_000001"


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_after_max_bad_steps(runs):
    """Step 1's update makes every later loss NaN: steps 2 and 3 are skipped and counted in the
    logged ``bad_steps``; step 4 is the third in a row (max_bad_steps 3) and stops the run."""
    for rank_results in runs["results"]:
        message = rank_results[1]["error"]
        assert message.startswith("3 consecutive optimizer steps (up to step 4) had a non-finite")
        assert "trainer.max_bad_steps=3" in message and "\n" not in message
    # The reports before the stop (rank_train keeps them only for finished runs): TensorBoard.
    from longctx.launch.train import loss_curve

    tensorboard = Path(runs["stuck"].trainer.run_dir) / "tensorboard"
    assert [step for step, _ in loss_curve(tensorboard)] == [1]  # later losses are not finite
    bad_steps = _scalars(tensorboard, "train/bad_steps")
    assert bad_steps == [(1, 0.0), (2, 1.0), (3, 2.0)]


def _scalars(tensorboard: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# ---------------------------------------------------------------------------------------------
# Interrupted checkpoint: a real process killed while it writes one

WORKER_SCRIPT = (
    "import json, sys\n"
    "from longctx.trainer.worker import train_worker\n"
    "train_worker(json.loads(open(sys.argv[1]).read()))\n"
)


def _start_worker(job_file: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, **deepspeed_env(), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, str(job_file)], stdout=out, stderr=out, env=env
        )


def _kill_inside_a_checkpoint_write(process: subprocess.Popen, root: Path) -> tuple[str, str]:
    """Poll until a staging directory exists while ``latest`` names an earlier checkpoint,
    freeze the process, and if the staging directory is still there (not yet renamed), kill
    it. Returns (the staging directory's name, the checkpoint ``latest`` named)."""
    deadline = time.monotonic() + 1800  # a loaded machine may start DeepSpeed slowly
    while process.poll() is None and time.monotonic() < deadline:
        staging = sorted(root.glob(".tmp-step_*")) if root.is_dir() else []
        if staging and (root / "latest").is_file():
            process.send_signal(signal.SIGSTOP)
            if staging[0].is_dir():
                latest = (root / "latest").read_text().strip()
                process.send_signal(signal.SIGKILL)
                process.wait()
                return staging[0].name, latest
            process.send_signal(signal.SIGCONT)
        time.sleep(0.002)
    pytest.fail("the run ended before a checkpoint write could be interrupted")


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    corpus, tokenizer = make_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(corpus, tokenizer, run_dir, steps=60, ckpt_every=1, eval_every=0)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job(recipe)))
    root = run_dir / "checkpoints"
    first = _start_worker(job_file, tmp_path / "first.log")
    partial, previous = _kill_inside_a_checkpoint_write(first, root)
    assert first.returncode == -signal.SIGKILL
    assert (root / partial).is_dir() and not (root / partial / MANIFEST_FILE).exists()
    interrupted_step = int(partial.removeprefix(".tmp-step_"))
    assert int(previous.removeprefix("step_")) == interrupted_step - 1

    resumed = recipe.model_copy(deep=True)
    resumed.trainer.steps = interrupted_step + 1
    job_file.write_text(json.dumps(job(resumed, resume="latest")))
    second = _start_worker(job_file, tmp_path / "second.log")
    assert second.wait(timeout=1800) == 0, (tmp_path / "second.log").read_text()
    output = (tmp_path / "second.log").read_text()
    assert f"ignoring incomplete checkpoint {root / partial}" in output
    assert output.count("ignoring incomplete checkpoint") == 1
    assert f"resuming from {root / previous}" in output
    assert f"resumed from {root / previous} at step {interrupted_step - 1}" in output
    final = json.loads((root / f"step_{interrupted_step + 1:06d}" / MANIFEST_FILE).read_text())
    assert final["step"] == interrupted_step + 1
    assert not list(root.glob(".tmp-*"))  # the partial directory is gone, never published
    assert math.isfinite(final["tokens_seen"])
