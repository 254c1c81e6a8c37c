"""The worker's own decisions: which model it builds, which layouts it accepts, and a run in a
plain process where nobody created a process group.

References: transformers' logits for an ``hf:`` checkpoint; the layout arithmetic
``dp = world / (ulysses x ring)``; a subprocess that starts with no distributed environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_fixtures import ROPE_SCALINGS, hf_logits, random_tokens, save_tiny_hf
from trainer_helpers import deepspeed_env, make_data, tiny_recipe

from longctx.config.recipe import Recipe
from longctx.trainer.worker import build_model, check_layout

REPO = Path(__file__).resolve().parents[1]


def hf_recipe(path: Path, **model) -> Recipe:
    """A recipe fine-tuning the checkpoint at ``path`` (its tokenizer is not read here)."""
    return Recipe.model_validate(
        {"model": {"init": f"hf:{path}", **model}, "data": {"tokenizer": {"path": str(path)}}}
    )


def test_hf_init_builds_the_checkpoint_with_transformers_logits(tmp_path):
    directory, reference = save_tiny_hf(tmp_path / "hf", "llama")
    model = build_model(hf_recipe(directory)).eval()
    input_ids = random_tokens(2, 24)
    with torch.no_grad():
        ours = model(input_ids)
    # fp32 eager attention vs our kernel: summation order only.
    torch.testing.assert_close(ours, hf_logits(reference, input_ids), rtol=1e-5, atol=1e-5)


def test_hf_init_keeps_the_recipes_rope_scaling_around_the_checkpoint_weights(tmp_path):
    directory, reference = save_tiny_hf(tmp_path / "hf", "llama")
    yarn = ROPE_SCALINGS["yarn"]
    model = build_model(hf_recipe(directory, rope_scaling=yarn))
    assert model.config.rope_scaling == yarn
    weights = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[f"model.{name}" if "lm_head" not in name else name])


def test_data_parallel_degree_follows_the_world_size():
    assert check_layout(Recipe(), 4) == 4


def test_sequence_parallel_groups_divide_the_world_into_data_parallel_groups():
    recipe = Recipe.model_validate(
        {"parallel": {"ring": 2}, "data": {"seq_len": 512, "tokenizer": {"vocab_size": 300}}}
    )
    assert check_layout(recipe, 4) == 2


def test_long_context_eval_tasks_run_under_sequence_parallelism():
    """The evaluation shards its sequences over the SP mesh (tests/test_eval_sp.py)."""
    recipe = Recipe.model_validate(
        {
            "parallel": {"ring": 2},
            "data": {"seq_len": 512, "tokenizer": {"vocab_size": 300}},
            "trainer": {"eval_tasks": ["passkey"]},
        }
    )
    assert check_layout(recipe, 4) == 2


WORKER_SCRIPT = """
import json, sys
from longctx.config.recipe import Recipe
from longctx.trainer.worker import train_worker
import torch.distributed as dist
recipe = Recipe.model_validate_json(sys.argv[1])
job = {"recipe": recipe.model_dump(mode="json"), "run_dir": recipe.trainer.run_dir, "resume": None}
summary = train_worker(job)
print(json.dumps({"summary": summary, "group_left": dist.is_initialized()}))
"""


@pytest.mark.slow
def test_a_plain_process_trains_in_its_own_one_rank_group(tmp_path):
    corpus, tokenizer = make_data(tmp_path / "data")
    recipe = tiny_recipe(corpus, tokenizer, tmp_path / "run", steps=2, ckpt_every=2)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    }
    env.update(deepspeed_env())
    done = subprocess.run(
        [sys.executable, "-c", WORKER_SCRIPT, recipe.model_dump_json()],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["summary"]["step"] == 2 and not result["group_left"]
    manifest = json.loads((tmp_path / "run/checkpoints/step_000002/manifest.json").read_text())
    assert manifest["world_size"] == 1
    assert "step 2/2 loss" in done.stdout  # rank 0's progress lines
