"""Adapters under ZeRO-3 hold a partition of the frozen base, never the whole model.

References:
- the init: the same stage's model built in one process under ZeRO-0 (``build_stage_model``
  after the same seeding). On 2 gloo ranks every parameter of the ZeRO-3 build is
  unmaterialised, each rank's storage of the frozen base is exactly its ZeRO-3 partitions
  (``ceil(numel / W)`` elements per parameter, the arithmetic of ``partition_range``), and the
  partitions gathered equal the one-process model bit for bit (base weights and the seeded
  LoRA ``A``, ``B``);
- training: the same LongLoRA run under ZeRO-0 (data parallel 2): losses and final trained
  tensors agree within fp32 noise (1e-5); stopped at step 2 and resumed, the ZeRO-3 run ends
  bit for bit where the uninterrupted one did;
- merging: an adapter checkpoint loaded partitioned (``build_model(weights=..., zero3=...)``,
  what a full stage after an adapter stage starts from) gathers to the one-process merged
  model (``load_trained_model``), ``W + (alpha / r) B A``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from harness import run_on_ranks
from test_peft import (
    HALF,
    STEPS,
    _adapter_recipe,
    _final,
    _layout,
    _rank_whole_then_resumed,
    gathered,
)
from test_peft import _tensors as checkpoint_tensors
from trainer_helpers import (
    deepspeed_env,
    deepspeed_environment,
    job,
    make_data,
    rank_train,
    tiny_recipe,
)

from longctx.config.recipe import Recipe
from longctx.model import Transformer, save_hf

pytestmark = pytest.mark.slow  # DeepSpeed on 2 spawned gloo ranks


def _stage_model(recipe: Recipe, zero3: bool) -> torch.nn.Module:
    """The first stage's adapted model of ``recipe`` as the worker builds it."""
    from longctx.config.stages import plan_stages
    from longctx.trainer.engine import deepspeed_config
    from longctx.trainer.stages import resume_point
    from longctx.trainer.worker import build_stage_model, seed_everything

    stages = plan_stages(recipe)
    seed_everything(recipe.trainer.seed)
    point = resume_point(stages, recipe.trainer.run_dir, None)
    config = deepspeed_config(recipe.trainer) if zero3 else None
    return build_stage_model(stages, point, Path(recipe.trainer.run_dir), zero3=config)


def _rank_init(rank: int, world: int, recipe_json: dict) -> dict:
    for key, value in deepspeed_env().items():
        os.environ.setdefault(key, value)
    model = _stage_model(Recipe.model_validate(recipe_json), zero3=True)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return {
        "unmaterialised": all(p.data.numel() == 0 for p in model.parameters()),
        "base_elements": sum(p.ds_tensor.numel() for p in frozen),
        "base_partition_elements": sum(math.ceil(p.ds_numel / world) for p in frozen),
        "base_full_elements": sum(p.ds_numel for p in frozen),
        "trained": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "weights": gathered(model),
    }


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("peft_zero3")
    corpus, tokenizer = make_data(root / "data")
    config = tiny_recipe(corpus, tokenizer, root / "unused").model
    torch.manual_seed(11)
    save_hf(Transformer(config), config, root / "base")
    return root


def test_zero3_adapter_rank_holds_only_its_partition_of_the_base(base_dir):
    recipe = _adapter_recipe(base_dir, "init", base_dir / "base", zero_stage=3)
    results = run_on_ranks(_rank_init, 2, recipe.model_dump(mode="json"))
    reference = _stage_model(recipe, zero3=False)  # one process, the whole model
    expected = dict(reference.named_parameters())
    for result in results:
        assert result["unmaterialised"]
        assert result["base_elements"] == result["base_partition_elements"]
        assert result["base_elements"] <= result["base_full_elements"] // 2 + 64  # padding
        assert result["trained"] == sorted(n for n, p in expected.items() if p.requires_grad)
        assert result["weights"].keys() == expected.keys()
        for name, tensor in result["weights"].items():
            assert torch.equal(tensor, expected[name].detach()), name


def test_zero3_adapter_training_equals_zero0_and_resumes_bit_exactly(base_dir):
    """Data parallel 2, LongLoRA on the HF base: ZeRO-3 (whole, and stopped at step 2 and
    resumed) against ZeRO-0."""
    runs = {}
    for stage in (0, 3):
        recipe = _adapter_recipe(
            base_dir, f"zero{stage}", base_dir / "base", zero_stage=stage, ckpt_every=HALF
        )
        runs[stage] = _layout(recipe, dp=2)
    resumed = runs[3].model_copy(deep=True)
    resumed.trainer.run_dir = str(base_dir / "resumed")
    step_two = base_dir / "resumed" / "checkpoints" / f"step_{HALF:06d}"
    with deepspeed_environment():
        zero3, again = run_on_ranks(
            _rank_whole_then_resumed,
            2,
            job(runs[3]),
            job(resumed, resume=str(step_two)),
            timeout=900,
        )[0]
        (zero0,) = run_on_ranks(rank_train, 2, [job(runs[0])], timeout=900)[0]
    losses = [
        {m["step"]: m["loss"] for m, _ in r["reports"] if "loss" in m} for r in (zero3, zero0)
    ]
    assert sorted(losses[0]) == list(range(1, STEPS + 1)) and losses[0].keys() == losses[1].keys()
    for step, loss in losses[0].items():
        assert loss == pytest.approx(losses[1][step], rel=1e-5)
    ours, theirs = checkpoint_tensors(_final(runs[3])), checkpoint_tensors(_final(runs[0]))
    assert ours.keys() == theirs.keys() and any("lora_B" in n for n in ours)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
    assert again["summary"]["step"] == STEPS
    for key in ("param", "exp_avg", "exp_avg_sq"):
        whole, split = (
            checkpoint_tensors(_final(runs[3]), key),
            checkpoint_tensors(_final(resumed), key),
        )
        assert whole.keys() == split.keys() and whole
        assert all(torch.equal(whole[n], split[n]) for n in whole), key
