"""ZeRO-3 models that never exist in full on a rank: init from scratch and a new stage's start
from the previous stage's checkpoint, each rank computing or reading only its partitions.

References:
- scratch init: the single-process model (ZeRO-0, one rank) built after the same seeding; the
  partitions gathered from 2 and 3 ranks (3 leaves a padded tail) must equal it bit for bit,
  because every parameter's value comes from its own generator (``Transformer.initial_values``);
- a new stage: the same stage trained "by hand", i.e. stage 1's final checkpoint exported to
  Hugging Face safetensors (``longctx export --hf``) and a one-stage run of stage 2's recipe
  started from it (``model.init: hf:``, ZeRO-3's partitioned HF init, tested against
  transformers in ``test_hf_init_memory.py``): same weights, fresh optimizer and schedule, same
  data, so the losses must agree (fp32, 1e-5);
- memory: ZeRO-3's partition arithmetic. Loading a stage's weights reads, per rank, exactly its
  partitions' fp32 bytes from the shards (the flat ranges ``[r x n, (r + 1) x n)``), never a
  full parameter (the largest single read is at most one partition), and leaves every
  parameter unmaterialised; the gathered partitions equal the checkpoint's tensors.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from harness import run_on_ranks
from test_stages_train import two_stages
from trainer_helpers import (
    deepspeed_env,
    deepspeed_environment,
    make_data,
    rank_train,
    tiny_recipe,
)

from longctx.checkpoint.saved_model import build_model, export_hf
from longctx.checkpoint.sharded_state import iter_model_tensors
from longctx.checkpoint.store import load_partitioned_weights
from longctx.config.recipe import Recipe
from longctx.config.stages import plan_stages
from longctx.trainer.engine import deepspeed_config
from longctx.trainer.worker import seed_everything, with_layout

pytestmark = pytest.mark.slow  # DeepSpeed on 2-3 spawned gloo ranks
SEED = 11


def _gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a ZeRO-3 model in full (gathered one at a time), by name."""
    import deepspeed

    full = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            full[name] = param.data.detach().clone()
    return full


def _scratch_rank(rank: int, world: int, recipe_json: dict) -> dict:
    for key, value in deepspeed_env().items():
        os.environ.setdefault(key, value)
    recipe = Recipe.model_validate(recipe_json)
    seed_everything(SEED)
    model = build_model(recipe, zero3=deepspeed_config(recipe.trainer))
    unmaterialised = all(p.data.numel() == 0 for p in model.parameters())
    return {"unmaterialised": unmaterialised, "weights": _gathered(model)}


@pytest.mark.parametrize("world", [2, 3])
def test_zero3_scratch_init_equals_the_single_process_init(tmp_path, world):
    corpus, tokenizer = make_data(tmp_path / "data")
    recipe = tiny_recipe(corpus, tokenizer, tmp_path / "run", zero_stage=3)
    results = run_on_ranks(_scratch_rank, world, recipe.model_dump(mode="json"))
    seed_everything(SEED)
    reference = build_model(recipe)  # ZeRO-0, one process: the full model on this rank
    expected = dict(reference.named_parameters())
    for result in results:
        assert result["unmaterialised"]
        assert result["weights"].keys() == expected.keys()
        for name, tensor in result["weights"].items():
            assert torch.equal(tensor, expected[name].detach()), name
    norm = results[0]["weights"]["layers.0.input_layernorm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    std = results[0]["weights"]["embed_tokens.weight"].std().item()
    assert std == pytest.approx(recipe.model.initializer_range, rel=0.05)


def _stage_read_rank(rank: int, world: int, recipe_json: dict, checkpoint: str) -> dict:
    """Stage 2's model built partitioned, filled from stage 1's final checkpoint."""
    from longctx.parallel.zero_init import build_partitioned, local_partition

    for key, value in deepspeed_env().items():
        os.environ.setdefault(key, value)
    stage = with_layout(plan_stages(Recipe.model_validate(recipe_json))[1].recipe, world)
    model = build_partitioned(
        stage.model, stage.positional, stage.attention, deepspeed_config(stage.trainer)
    )
    load = load_partitioned_weights(model, checkpoint)
    local = {name: local_partition(p)[1].numel() * 4 for name, p in model.named_parameters()}
    return {
        "load": load,
        "partition_fp32_bytes": sum(local.values()),
        "largest_partition": max(local.values()),
        "unmaterialised": all(p.data.numel() == 0 for p in model.parameters()),
        "model_bytes": sum(p.ds_numel * 4 for p in model.parameters()),
        "weights": _gathered(model),
    }


@pytest.fixture(scope="module")
def zero3_stages(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zero3_stages")
    corpus, tokenizer = make_data(root / "data")
    staged = two_stages(corpus, tokenizer, root / "staged")
    staged = staged.model_copy(
        update={"trainer": staged.trainer.model_copy(update={"zero_stage": 3})}
    )
    boundary = root / "staged" / "checkpoints" / "step_000002"
    jobs = [
        {"recipe": staged.model_dump(mode="json"), "run_dir": str(root / "staged"),
         "resume": resume, "last_stage": last}
        for resume, last in ((None, 0), ("latest", 1))
    ]  # fmt: skip
    with deepspeed_environment():
        staged_results = run_on_ranks(rank_train, 2, jobs)
        reads = run_on_ranks(_stage_read_rank, 2, staged.model_dump(mode="json"), str(boundary))
    export_hf(boundary, root / "stage1_hf")
    # stage 2 by hand: its own recipe, one stage, from the exported stage-1 weights
    stage2 = plan_stages(staged)[1].recipe.model_dump(mode="json")
    stage2["model"] = {
        "init": f"hf:{root / 'stage1_hf'}",
        **{key: stage2["model"][key] for key in ("rope_scaling", "max_position_embeddings")},
    }
    stage2["trainer"]["run_dir"] = str(root / "by_hand")
    by_hand = Recipe.model_validate(stage2)
    hand_job = {"recipe": by_hand.model_dump(mode="json"), "run_dir": str(root / "by_hand")}
    with deepspeed_environment():
        hand_results = run_on_ranks(rank_train, 2, [hand_job])
    return {
        "boundary": boundary,
        "staged": [rank[1] for rank in staged_results],
        "by_hand": [rank[0] for rank in hand_results],
        "reads": reads,
    }


def test_a_zero3_stage_trains_like_the_same_stage_started_by_hand(zero3_stages):
    for staged, by_hand in zip(zero3_stages["staged"], zero3_stages["by_hand"], strict=True):
        assert "error" not in staged and "error" not in by_hand
        assert [m["step"] for m, _ in staged["reports"]] == [3, 4, 5]
        assert [m["step"] for m, _ in by_hand["reports"]] == [1, 2, 3]
        ours = [m["loss"] for m, _ in staged["reports"]]
        theirs = [m["loss"] for m, _ in by_hand["reports"]]
        assert ours == pytest.approx(theirs, rel=1e-5)


def test_a_zero3_stage_reads_only_each_ranks_partitions(zero3_stages):
    expected = dict(iter_model_tensors(zero3_stages["boundary"]))
    reads = zero3_stages["reads"]
    for result in reads:
        load = result["load"]
        assert result["unmaterialised"]
        # exactly the rank's fp32 partitions were read, each read at most one partition
        assert load.bytes_read == result["partition_fp32_bytes"]
        assert load.largest_read_bytes <= result["largest_partition"]
        assert load.bytes_read <= math.ceil(result["model_bytes"] / 2) + 4 * 64
        for name, tensor in result["weights"].items():
            assert torch.equal(tensor, expected[name]), name
    assert sum(r["load"].bytes_read for r in reads) == reads[0]["model_bytes"]


def test_partitioned_weights_refuse_a_checkpoint_of_another_shape(zero3_stages, tmp_path):
    """The names / shapes check runs before anything is read (one line naming the tensor)."""
    from longctx.checkpoint.sharded_state import check_names_and_shapes, read_index, state_entries
    from longctx.errors import LongctxError
    from longctx.model import ModelConfig, Transformer

    boundary: Path = zero3_stages["boundary"]
    index = read_index(boundary)
    model = Transformer(ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2))  # fmt: skip
    with pytest.raises(LongctxError, match="embed_tokens.weight of shape") as caught:
        check_names_and_shapes(state_entries(model), index, boundary, "load it")
    assert "\n" not in str(caught.value)
