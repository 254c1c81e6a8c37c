"""Per-rank memory at init of an adapter (LongLoRA) run under ZeRO-3: the frozen base built
partitioned against one whole copy per rank.

Run by hand (not in ``make bench``): ``python -m longctx.bench.peft_zero3`` (2 ranks, about a
minute of two cores; ``--world N`` for another rank count, ``--layers N`` a shallower model). Prints a table and writes
``bench/results/peft_zero3.json``. Goal (issue 20, the scale rule "a path that holds the whole
model on every rank where a shard would do is a bug"): the partitioned init's peak at most this
rank's share of the base (training dtype / W) plus the largest fp32 tensor, the LoRA matrices
and 256 MiB, and below the one-copy init's.

Workload: the SmolLM2-360M shape (32 layers, hidden 960, 15 heads, 5 KV heads, MLP 2560, vocab
49152, tied embedding: 362M parameters), random weights (``model.init: scratch``), bf16, LongLoRA
(rank 8 on q, k, v, o, trainable embedding and norms). Cases, each on ``--world`` fresh gloo
ranks (``run_ranks``, glibc mmap threshold fixed):

- ``one_copy``: ``trainer.worker.build_stage_model`` without the ZeRO-3 config, i.e. the whole
  base in bf16 on every rank (what a ZeRO-3 adapter run built before its base was partitioned;
  DeepSpeed then sharded it at engine start), the baseline;
- ``partitioned``: ``build_stage_model`` with the run's ZeRO-3 DeepSpeed config (the base built
  under ``deepspeed.zero.Init``, each rank computing only its partitions; the LoRA matrices
  created whole, then partitioned).

Peak: the resident high-water mark while the model is built minus the resident size at a reset
taken after torch, DeepSpeed and peft are imported and the process group exists
(``measure.reset_peak_memory``). Memory only: it does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from longctx.bench.measure import (
    GiB,
    peak_memory_since,
    reset_peak_memory,
    run_ranks,
    write_report,
)

RESULTS = Path(__file__).resolve().parent / "results" / "peft_zero3.json"
MiB = 2**20
SLACK = 256 * MiB
SMOLLM2_360M = {
    "vocab_size": 49152,
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
LONGLORA = {"rank": 8, "alpha": 16.0, "trainable": ["embed", "norm"]}


def bench_recipe(layers: int, run_dir: Path):
    """The LongLoRA recipe of the bench (bf16, ZeRO-3), ``layers`` deep."""
    from longctx.config.recipe import Recipe

    return Recipe.model_validate(
        {
            "model": {**SMOLLM2_360M, "num_hidden_layers": layers},
            "data": {"tokenizer": {"vocab_size": 320}},
            "peft": LONGLORA,
            "trainer": {"run_dir": str(run_dir), "dtype": "bf16", "zero_stage": 3},
        }
    )


def _init_rank(rank: int, world: int, recipe_json: dict, partitioned: bool) -> dict:
    """Build the first stage's adapted model on this rank; its peak and parameter storage."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import peft  # noqa: F401 (imported before the reset: its import is not the model's memory)

    from longctx.config.recipe import Recipe
    from longctx.config.stages import plan_stages
    from longctx.parallel.accelerator import import_deepspeed
    from longctx.trainer.engine import deepspeed_config
    from longctx.trainer.stages import resume_point
    from longctx.trainer.worker import build_stage_model, seed_everything

    import_deepspeed()
    recipe = Recipe.model_validate(recipe_json)
    stages = plan_stages(recipe)
    point = resume_point(stages, recipe.trainer.run_dir, None)
    zero3 = deepspeed_config(recipe.trainer) if partitioned else None
    seed_everything(recipe.trainer.seed)
    baseline = reset_peak_memory()
    model = build_stage_model(
        stages, point, Path(recipe.trainer.run_dir), dtype=torch.bfloat16, zero3=zero3
    )
    peak = peak_memory_since(baseline)
    params = {id(p): p for p in model.parameters()}.values()
    held = sum(
        getattr(p, "ds_tensor", p).numel() * getattr(p, "ds_tensor", p).element_size()
        for p in params
    )
    return {"peak_bytes": peak, "parameter_bytes": held}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=SMOLLM2_360M["num_hidden_layers"])
    args = parser.parse_args(argv)
    from longctx.launch.plan import largest_parameter_numel, lora_parameter_count

    recipe = bench_recipe(args.layers, Path("/tmp/longctx-bench-peft-zero3"))
    params = recipe.model.num_parameters()
    lora = lora_parameter_count(recipe)
    cases = {}
    for name, partitioned in (("one_copy", False), ("partitioned", True)):
        ranks = run_ranks(_init_rank, args.world, recipe.model_dump(mode="json"), partitioned)
        cases[name] = {
            "peak_bytes": max(r["peak_bytes"] for r in ranks),
            "parameter_bytes": max(r["parameter_bytes"] for r in ranks),
        }
    bound = 2 * params // args.world + 4 * largest_parameter_numel(recipe.model) + 2 * lora + SLACK
    ratio = cases["partitioned"]["peak_bytes"] / cases["one_copy"]["peak_bytes"]
    print(f"LongLoRA init, SmolLM2-360M shape ({params / 1e6:.0f}M, {args.layers} layers), bf16")
    print(f"{'case':12} {'W':>3} {'peak/rank GiB':>14} {'params/rank GiB':>16}")
    for name, case in cases.items():
        print(
            f"{name:12} {args.world:>3} {case['peak_bytes'] / GiB:>14.3f} "
            f"{case['parameter_bytes'] / GiB:>16.3f}"
        )
    print(f"partitioned / one copy: {ratio:.2f}x; bound {bound / GiB:.3f} GiB")
    report = {
        "config": {
            "model": "SmolLM2-360M shape",
            "layers": args.layers,
            "parameters": params,
            "lora_parameters": lora,
            "world": args.world,
            "dtype": "bf16",
            "peft": LONGLORA,
        },
        "method": "fresh gloo ranks per case; VmHWM during build_stage_model minus VmRSS at a "
        "/proc/self/clear_refs reset after imports; the largest rank's",
        "cases": cases,
        "memory_ratio": ratio,
        "bound_bytes": bound,
        "within_bound": cases["partitioned"]["peak_bytes"] <= bound,
    }
    write_report(RESULTS, report)
    return report


if __name__ == "__main__":
    main()
