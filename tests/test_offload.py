"""ZeRO offload as recipe fields (issue 20): ``trainer.offload_optimizer`` / ``offload_param``
are validated, reach DeepSpeed's ``zero_optimization`` section, move their state from the
accelerator to host memory in the ``--dry-run`` estimate, and a 2-rank ZeRO-2 run with the
optimizer offloaded logs the losses of the same run without offload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_helpers import job, make_data, tiny_recipe, train_on_ranks

from longctx.config.recipe import load_recipe
from longctx.errors import LongctxError
from longctx.launch.plan import estimate_memory
from longctx.parallel.config import ParallelConfig
from longctx.trainer.engine import deepspeed_config

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.offload_optimizer=true"], "offload_optimizer needs ZeRO (zero_stage=0)"),
        (
            ["trainer.offload_param=true", "trainer.zero_stage=2"],
            "offload_param needs zero_stage: 3 (got 2)",
        ),
    ],
)
def test_offload_without_the_zero_stage_it_needs_is_refused_in_one_line(overrides, message):
    with pytest.raises(LongctxError) as info:
        load_recipe(TINY, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_offload_fields_reach_the_deepspeed_config():
    recipe = load_recipe(
        TINY,
        ["trainer.zero_stage=3", "trainer.offload_optimizer=true", "trainer.offload_param=true"],
    )
    zero = deepspeed_config(recipe.trainer)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    plain = deepspeed_config(load_recipe(TINY, ["trainer.zero_stage=3"]).trainer)
    assert plain["zero_optimization"] == {"stage": 3}


def test_the_planner_moves_offloaded_state_to_host_memory():
    base = load_recipe(TINY, ["trainer.zero_stage=3"])
    offloaded = load_recipe(
        TINY,
        ["trainer.zero_stage=3", "trainer.offload_optimizer=true", "trainer.offload_param=true"],
    )
    layout = ParallelConfig(dp=2)
    before = estimate_memory(base, layout)
    after = estimate_memory(offloaded, layout)
    assert (after.weights, after.optimizer) == (0, 0)
    assert after.host_offload == before.weights + before.optimizer
    assert after.total == before.total - before.weights - before.optimizer
    assert after.gradients == before.gradients


def _curve(reports):
    return [metrics["loss"] for metrics, _ in reports if "loss" in metrics]


@pytest.mark.slow
def test_optimizer_offload_trains_like_the_run_without_it(tmp_path):
    """2 ranks, ZeRO-2, 3 fp32 steps: with ``offload_optimizer`` (torch AdamW stepping on
    DeepSpeed's CPU partitions) the logged losses equal the non-offloaded run's within 1e-5."""
    corpus, tokenizer = make_data(tmp_path / "data")
    common = {"steps": 3, "ckpt_every": 3, "eval_every": 3, "grad_accum": 1, "zero_stage": 2}
    plain = tiny_recipe(corpus, tokenizer, tmp_path / "plain", **common)
    offload = tiny_recipe(corpus, tokenizer, tmp_path / "offload", offload_optimizer=True, **common)
    reference, offloaded = train_on_ranks([job(plain), job(offload)], world=2)[0]
    expected = _curve(reference["reports"])
    assert len(expected) == 3
    torch.testing.assert_close(
        torch.tensor(_curve(offloaded["reports"])), torch.tensor(expected), rtol=1e-5, atol=1e-6
    )
