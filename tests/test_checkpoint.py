"""Checkpoints on disk (DESIGN section 8) and every class of bad resume / run-directory input.

The shared run (``trainer_helpers.finished_run``) is a real 2-rank ZeRO-2 training of 6 steps
with checkpoints at steps 2, 4 and 6 and ``keep_last: 2``. Layout and manifest are checked
against independent computations (hashlib over the files, a data loader advanced by hand).
Each bad input must give one ``LongctxError`` line naming the problem and leave every file of
the run directory byte for byte as it was (``tree_digest`` before and after).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import finished_run, tiny_recipe, tree_digest

from longctx.checkpoint.run_dir import validate_run
from longctx.checkpoint.store import (
    MANIFEST_FILE,
    capture_rng_state,
    list_checkpoints,
    load_model_state_dict,
    prune_checkpoints,
    resolve_checkpoint,
    restore_rng_state,
    verify_checkpoint,
)
from longctx.data import PackedLoader, build_datasets, load_tokenizer
from longctx.errors import LongctxError
from longctx.model import Transformer


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return finished_run(tmp_path_factory)


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    """A private copy of the finished run directory, free to damage."""
    return Path(shutil.copytree(run["run_dir"], tmp_path / "run"))


def assert_one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------------------------------------
# Layout and manifest


def test_the_last_two_checkpoints_are_kept_and_latest_names_the_newest(run):
    root = run["run_dir"] / "checkpoints"
    steps = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
    assert steps == ["step_000004", "step_000006"]  # step_000002 pruned (keep_last 2)
    assert (root / "latest").read_text().strip() == "step_000006"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging leftovers
    assert (run["run_dir"] / "config.yaml").read_text() == run["recipe"].resolved_yaml()


def test_manifest_lists_the_sha256_of_every_other_file(run):
    directory = run["run_dir"] / "checkpoints" / "step_000006"
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    on_disk = {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    }
    assert manifest["files"] == on_disk
    expected_files = {"rng_rank_00000.pt", "rng_rank_00001.pt", "recipe.yaml", "tokenizer.model"}
    assert expected_files <= set(on_disk)
    # one shard part per rank (the tiny model fits one part) and the fragment index
    shards = {"state_r00000_p00000.safetensors", "state_r00001_p00000.safetensors"}
    assert shards | {"state_index.json"} <= set(on_disk)
    assert not {"model.safetensors", "optimizer.safetensors"} & set(on_disk)  # no full copy


def test_manifest_records_step_tokens_recipe_hash_and_the_data_cursor(run):
    recipe = run["recipe"]
    cfg = recipe.trainer
    manifest = json.loads((run["run_dir"] / "checkpoints/step_000006" / MANIFEST_FILE).read_text())
    assert manifest["step"] == 6
    assert manifest["tokens_seen"] == 6 * cfg.micro_batch_size * cfg.grad_accum * 64 * 2
    assert manifest["world_size"] == 2 and manifest["zero_stage"] == 2
    assert manifest["rng_states"] == ["rng_rank_00000.pt", "rng_rank_00001.pt"]
    assert manifest["recipe_hash"] == recipe.recipe_hash()
    # The cursor is where a loader stands after 6 steps x 2 micro-batches, advanced by hand.
    splits = build_datasets(recipe.data, load_tokenizer(str(run["tokenizer"])))
    loader = PackedLoader(splits.train, cfg.micro_batch_size, dp_rank=0, dp_size=2)
    for _ in islice(loader, 6 * cfg.grad_accum):
        pass
    assert manifest["data_cursor"] == loader.state_dict()


def test_rng_state_round_trip_reproduces_every_generator():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_consolidated_weights_load_strictly_into_the_decoder(run):
    directory = run["run_dir"] / "checkpoints" / "step_000006"
    state = load_model_state_dict(directory)
    model = Transformer(run["recipe"].model, run["recipe"].positional, run["recipe"].attention)
    model.load_state_dict(state, strict=True)
    assert all(tensor.dtype == torch.float32 for tensor in state.values())


def test_prune_keeps_the_last_k_complete_checkpoints_and_drops_staging_dirs(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"step_{step:06d}").mkdir()
        (tmp_path / f"step_{step:06d}" / MANIFEST_FILE).write_text("{}")
    (tmp_path / "step_000005").mkdir()  # incomplete: no manifest, never counted nor loaded
    (tmp_path / ".tmp-step_000006").mkdir()
    (tmp_path / "latest").write_text("step_000002\n")  # latest is never deleted
    prune_checkpoints(tmp_path, keep_last=2)
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == ["latest", "step_000002", "step_000003", "step_000004", "step_000005"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3, 4]


def test_resume_path_of_a_run_directory_means_its_latest_checkpoint(run):
    expected = run["run_dir"] / "checkpoints" / "step_000006"
    assert resolve_checkpoint("elsewhere", str(run["run_dir"])) == expected
    assert resolve_checkpoint(run["run_dir"], "latest") == expected
    assert verify_checkpoint(expected, run["recipe"])["step"] == 6


# ---------------------------------------------------------------------------------------------
# Bad input: one line, nothing on disk changed


def test_worker_refuses_a_run_directory_that_holds_a_run(run):
    for rank_results in run["results"]:
        first, before, refused, after = rank_results
        assert "summary" in first
        assert "already holds a run" in refused["error"] and "--resume latest" in refused["error"]
        assert "\n" not in refused["error"]
        assert before["digest"] == after["digest"]


def test_validate_run_refuses_a_run_directory_that_holds_a_run(run_copy, run):
    before = tree_digest(run_copy)
    with pytest.raises(LongctxError) as error:
        validate_run(run["recipe"], run_copy, None)
    assert_one_line(error, str(run_copy), "config.yaml", "checkpoints/", "--resume latest")
    assert tree_digest(run_copy) == before


def test_resume_latest_without_a_checkpoint_is_refused(tmp_path, run):
    empty = tmp_path / "fresh"
    empty.mkdir()
    with pytest.raises(LongctxError) as error:
        validate_run(run["recipe"], empty, "latest")
    assert_one_line(error, "checkpoints/latest does not exist", "without --resume")
    assert tree_digest(empty) == {}


def test_resume_path_that_does_not_exist_is_refused(tmp_path, run):
    with pytest.raises(LongctxError) as error:
        validate_run(run["recipe"], tmp_path, str(tmp_path / "nowhere" / "step_000100"))
    assert_one_line(error, "nowhere/step_000100", "no such file or directory")
    assert tree_digest(tmp_path) == {}


def test_checkpoint_without_manifest_is_refused(run_copy, run):
    checkpoint = run_copy / "checkpoints" / "step_000004"
    (checkpoint / MANIFEST_FILE).unlink()
    before = tree_digest(run_copy)
    with pytest.raises(LongctxError) as error:
        validate_run(run["recipe"], run_copy, str(checkpoint))
    assert_one_line(error, "step_000004", "has no manifest.json")
    assert tree_digest(run_copy) == before


def test_checkpoint_with_a_wrong_sha256_is_refused(run_copy, run):
    checkpoint = run_copy / "checkpoints" / "step_000006"
    damaged = checkpoint / "state_r00001_p00000.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    damaged.write_bytes(bytes(data))
    before = tree_digest(run_copy)
    with pytest.raises(LongctxError) as error:
        validate_run(run["recipe"], run_copy, "latest")
    assert_one_line(error, "sha256 of state_r00001_p00000.safetensors", "damaged")
    assert tree_digest(run_copy) == before


def test_checkpoint_of_a_different_model_shape_is_refused(run_copy, run):
    wider = run["recipe"].model_copy(deep=True)
    wider.model.intermediate_size = 128
    before = tree_digest(run_copy)
    with pytest.raises(LongctxError) as error:
        validate_run(wider, run_copy, "latest")
    assert_one_line(error, "model.intermediate_size=128 in the recipe but 96 in the checkpoint")
    assert tree_digest(run_copy) == before


def test_checkpoint_of_another_zero_stage_is_accepted_for_elastic_resume(run_copy, run):
    """The saved state is full fp32 (test_elastic_resume.py resumes it under other layouts)."""
    stage0 = run["recipe"].model_copy(deep=True)
    stage0.trainer.zero_stage = 0
    assert validate_run(stage0, run_copy, "latest") == run_copy / "checkpoints" / "step_000006"


def test_a_learning_rate_change_still_resumes(run_copy, run):
    """The recipe hash covers the model shape only, so training knobs may change on resume."""
    tuned = run["recipe"].model_copy(deep=True)
    tuned.trainer.lr = 1e-2
    assert validate_run(tuned, run_copy, "latest") == run_copy / "checkpoints" / "step_000006"


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, run):
    recipe = tiny_recipe(run["corpus"], run["tokenizer"], tmp_path / "run", model_vocab=300)
    with pytest.raises(LongctxError) as error:
        validate_run(recipe, recipe.trainer.run_dir, None)
    assert_one_line(error, "has 320 tokens", "model.vocab_size=300", "model.vocab_size >= 320")
    assert not (tmp_path / "run").exists()


def test_a_restarted_launch_may_start_over_in_its_own_run_directory(run_copy, run):
    """Ray Train restarts the workers of one launch before its first checkpoint: launch.json
    names that launch, so the half-started run is not refused; another launch still is."""
    (run_copy / "launch.json").write_text(json.dumps({"launch_id": "launch-a"}))
    assert validate_run(run["recipe"], run_copy, None, launch_id="launch-a") is None
    with pytest.raises(LongctxError, match="already holds a run"):
        validate_run(run["recipe"], run_copy, None, launch_id="launch-b")
