"""Sharded checkpoints reshard exactly: a checkpoint written by 2 ranks under ZeRO-2 is loaded
into engines of another world size, ZeRO stage and sequence-parallel layout and saved again
from there; the re-saved fp32 weights and both AdamW moments equal the original bit for bit.

Chain (real spawned gloo ranks, fresh processes per hop, nothing shared but the files):
W 2 ZeRO-2 (a trained run) -> W 1 ZeRO-0 -> W 4 ZeRO-3 (dp 2 x Ulysses 2) -> W 2 ZeRO-3
(dp 1 x ring 2) -> W 4 ZeRO-2 (dp 4). Each hop only reads and writes: any value lost or
misplaced by a layout (partition offsets, padding, tied weights, buffers, SP wrappers' names)
shows as a difference against the independent reference, the first checkpoint's tensors.
The index records which rank wrote which fragment, so the test also checks that each rank
wrote only its share (fragments of each tensor disjoint, written by every rank of the layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import run_on_ranks
from trainer_helpers import deepspeed_environment, finished_run

from longctx.checkpoint.sharded_state import INDEX_FILE, iter_model_tensors

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # 5 spawned groups of 1-4 DeepSpeed ranks

KEYS = ("param", "exp_avg", "exp_avg_sq")


def _rank_reshard(rank: int, world: int, hop: dict) -> dict:
    """Build this hop's engine, load ``hop["source"]`` into it and save it into ``hop["out"]``."""
    from longctx.checkpoint.saved_model import build_model
    from longctx.checkpoint.store import load_checkpoint, save_checkpoint
    from longctx.config.recipe import Recipe
    from longctx.parallel.apply import apply_transforms
    from longctx.parallel.mesh import build_mesh
    from longctx.trainer.engine import build_engine
    from longctx.trainer.plans import transform_plan
    from longctx.trainer.worker import seed_everything, with_layout

    recipe = with_layout(Recipe.model_validate(hop["recipe"]), world)
    mesh = build_mesh(recipe.parallel) if recipe.parallel.sp > 1 else None
    seed_everything(rank + 100)  # a different random init on every rank: all must be replaced
    model = build_model(recipe)
    apply_transforms(model, transform_plan(recipe.trainer, mesh))
    engine = build_engine(model, recipe.trainer, None if mesh is None else mesh.sp_group)
    manifest = load_checkpoint(engine, hop["source"], recipe)
    out = save_checkpoint(
        engine,
        hop["out"],
        step=manifest["step"],
        tokens_seen=manifest["tokens_seen"],
        data_cursor=manifest["data_cursor"],
        recipe=recipe,
        tokenizer_bytes=None,
    )
    return {"checkpoint": str(out), "counters": manifest["counters"]}


def _hop_recipe(recipe, zero_stage: int, ulysses: int = 1, ring: int = 1):
    trainer = recipe.trainer.model_copy(update={"zero_stage": zero_stage})
    parallel = recipe.parallel.model_copy(update={"ulysses": ulysses, "ring": ring, "dp": "auto"})
    return recipe.model_copy(update={"trainer": trainer, "parallel": parallel})


HOPS = [  # (name, world, zero stage, ulysses, ring)
    ("w1_zero0", 1, 0, 1, 1),
    ("w4_zero3_ulysses", 4, 3, 2, 1),
    ("w2_zero3_ring", 2, 3, 1, 2),
    ("w4_zero2", 4, 2, 1, 1),
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    run = finished_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("reshard")
    source = run["run_dir"] / "checkpoints" / "step_000006"
    checkpoints = {"w2_zero2": source}
    results = {}
    with deepspeed_environment():
        for name, world, stage, ulysses, ring in HOPS:
            hop = {
                "recipe": _hop_recipe(run["recipe"], stage, ulysses, ring).model_dump(mode="json"),
                "source": str(source),
                "out": str(root / name),
            }
            results[name] = run_on_ranks(_rank_reshard, world, hop, timeout=1200)[0]
            source = Path(results[name]["checkpoint"])
            checkpoints[name] = source
    return {"checkpoints": checkpoints, "results": results}


def _tensors(checkpoint: Path, key: str) -> dict[str, torch.Tensor]:
    return dict(iter_model_tensors(checkpoint, key=key))


@pytest.mark.parametrize("name", [hop[0] for hop in HOPS])
@pytest.mark.parametrize("key", KEYS)
def test_resharded_state_equals_the_original_bit_for_bit(chain, name, key):
    original = _tensors(chain["checkpoints"]["w2_zero2"], key)
    resharded = _tensors(chain["checkpoints"][name], key)
    assert original.keys() == resharded.keys() and original
    for tensor_name, tensor in original.items():
        assert torch.equal(tensor, resharded[tensor_name]), (name, key, tensor_name)
    if key != "param":  # trained moments, not zeros
        assert any(bool(t.abs().sum() > 0) for t in original.values())


@pytest.mark.parametrize("name", [hop[0] for hop in HOPS])
def test_step_counters_carry_over(chain, name):
    saved = json.loads((chain["checkpoints"][name] / "manifest.json").read_text())
    first = json.loads((chain["checkpoints"]["w2_zero2"] / "manifest.json").read_text())
    assert saved["counters"] == first["counters"] and saved["counters"]["optimizer_step"] == 6


@pytest.mark.parametrize("name, world", [("w2_zero2", 2)] + [(h[0], h[1]) for h in HOPS])
def test_each_rank_wrote_only_its_share(chain, name, world):
    index = json.loads((chain["checkpoints"][name] / INDEX_FILE).read_text())
    assert index["world_size"] == world and len(index["files"]) == world
    writers = set()
    for tensor, entry in index["tensors"].items():
        if entry["kind"] != "param":
            continue
        numel = 1
        for size in entry["shape"]:
            numel *= size
        ranks = [int(file[7:12]) for file, _, _ in entry["fragments"]]
        assert len(ranks) == len(set(ranks)), tensor  # one fragment per rank, no copies
        assert sum(length for _, _, length in entry["fragments"]) == numel, tensor
        writers.update(ranks)
    assert writers == set(range(world))
