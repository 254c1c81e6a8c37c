"""Training memory of the demo model: activation bytes per token per layer, and the longest
trainable sequence on this machine with 1 worker and with 2 workers in ring mode.

Run: ``python -m longctx.bench.memory`` (quick, ~3 minutes; writes ``bench/results/memory.json``)
or ``python -m longctx.bench.memory --longest`` (real training steps at 128k and 256k tokens with
2 workers, ~12 minutes; writes ``bench/results/memory_longest.json``).

One training step = forward, tiled cross-entropy, backward and an AdamW step, on the model of
``recipes/demo.yaml`` (2 layers, hidden 64) with RoPE positions reaching T. Each case runs in
fresh processes (``run_ranks``: gloo ranks, glibc mmap threshold fixed); its peak is the
resident high-water mark after the reset minus the resident size at the reset, which is taken
after the model, optimizer state and a tiny warm-up step exist.

- **Bytes per token per layer**: for each memory setting (``plain``; per-layer activation
  ``checkpointing``; checkpointing + the sequence-``tiled MLP``) the step peak is measured at
  several T with 2 and with 4 layers; the slope of peak over T (least squares) is the bytes per
  token, and the difference of the 4- and 2-layer slopes over 2 is the bytes per token per
  layer, free of what every token costs once (embeddings, final norm, tiled loss, RoPE
  tables).
- **Memory ceiling**: with checkpointing + tiled MLP, the per-rank peak at several T (the whole
  sequence; with 2 workers each rank holds half) is fitted as ``fixed + bytes_per_token x T``;
  ``fixed`` includes the resident size of a rank at the reset (torch, the model). The longest
  trainable T is where ``workers x (fixed + bytes_per_token x T)`` reaches the memory the
  machine has available when the benchmark runs. Step time is scaled as T^2 from the longest
  step measured (attention dominates there) to give the time of a step at 128k and at the
  ceiling: on this CPU the compute, not the memory, is what stops long sequences.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from longctx.bench.measure import (
    GiB,
    peak_memory_since,
    random_training_batch,
    reset_peak_memory,
    run_ranks,
    write_report,
)
from longctx.config.recipe import load_recipe
from longctx.model import Transformer
from longctx.parallel.apply import TransformPlan, apply_transforms
from longctx.parallel.config import ParallelConfig
from longctx.parallel.loss import tiled_cross_entropy, world_mean_scale
from longctx.parallel.mesh import build_mesh

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
LONGEST_RESULTS = RESULTS.with_name("memory_longest.json")
DEMO_RECIPE = REPO / "recipes" / "demo.yaml"
TILED_MLP_CHUNK = 4096
SETTINGS = {
    "plain": (False, None),
    "checkpointing": (True, None),
    "checkpointing + tiled MLP": (True, TILED_MLP_CHUNK),
}
CEILING_SETTING = "checkpointing + tiled MLP"


def demo_model(layers: int, max_tokens: int) -> tuple:
    """The demo recipe's model and attention configs, with ``layers`` layers and RoPE tables
    reaching ``max_tokens``."""
    recipe = load_recipe(DEMO_RECIPE)
    model = recipe.model.model_copy(
        update={"num_hidden_layers": layers, "max_position_embeddings": max_tokens}
    )
    return model, recipe.positional, recipe.attention


def _training_step(model, optimizer, batch, group) -> None:
    hidden = model.forward_hidden(
        batch["input_ids"], batch["position_ids"], seq_positions=batch["seq_positions"]
    )  # [1, T_local, d]
    loss = tiled_cross_entropy(hidden, model.lm_head.weight, batch["labels"], group=group)
    (loss * world_mean_scale(group)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def rank_steps(
    rank: int, world: int, setting: str, layer_counts: list[int], lengths: list[int]
) -> dict[int, list[dict]]:
    """Per layer count, one training step per length (ascending) on this rank: peak bytes
    since a reset taken just before the step, resident bytes at that reset, wall and CPU
    seconds. The models are built one after another in this process; the mmap threshold
    returns a freed model's memory before the next one's steps."""
    torch.set_num_threads(1)
    return {layers: _steps_of_model(world, setting, layers, lengths) for layers in layer_counts}


def _steps_of_model(world: int, setting: str, layers: int, lengths: list[int]) -> list[dict]:
    torch.manual_seed(0)
    checkpointing, tiled_chunk = SETTINGS[setting]
    config, positional, attention = demo_model(layers, max(lengths))
    model = Transformer(config, positional, attention)
    mesh = build_mesh(ParallelConfig(dp=1, ring=world)) if world > 1 else None
    plan = TransformPlan(
        mesh=mesh, tiled_mlp_chunk=tiled_chunk, activation_checkpointing=checkpointing
    )
    apply_transforms(model, plan)
    group, shard = (None, None) if mesh is None else (mesh.sp_group, mesh.shard_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def batch_of(length: int) -> dict[str, torch.Tensor]:
        return random_training_batch(config.vocab_size, length, gen, shard)

    _training_step(model, optimizer, batch_of(256), group)  # optimizer state, code paths
    results = []
    for length in lengths:
        batch = batch_of(length)
        if world > 1:
            dist.barrier()
        baseline = reset_peak_memory()
        wall, cpu = time.perf_counter(), time.process_time()
        _training_step(model, optimizer, batch, group)
        if world > 1:
            dist.barrier()
        results.append(
            {
                "seq_len": length,
                "peak_bytes": peak_memory_since(baseline),
                "resident_bytes": baseline,
                "seconds": time.perf_counter() - wall,
                "cpu_seconds": time.process_time() - cpu,
            }
        )
        del batch
    return results


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = intercept + slope x``: returns (intercept, slope)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return mean_y - slope * mean_x, slope


def per_layer_bytes(lengths: list[int], layer_counts: tuple[int, int]) -> list[dict]:
    """Bytes per token per layer of each setting (module docstring)."""
    rows = []
    for setting in SETTINGS:
        steps = run_ranks(rank_steps, 1, setting, list(layer_counts), lengths)[0]
        slopes = {n: fit_line(lengths, [s["peak_bytes"] for s in steps[n]])[1] for n in steps}
        low, high = layer_counts
        per_layer = (slopes[high] - slopes[low]) / (high - low)
        rows.append(
            {
                "name": setting,
                "lengths": lengths,
                "layers": list(layer_counts),
                "bytes_per_token": {str(n): slopes[n] for n in layer_counts},
                "bytes_per_token_per_layer": per_layer,
                "steps": {str(n): steps[n] for n in layer_counts},
            }
        )
        print(
            f"{setting:>26}: {per_layer:8.0f} bytes/token/layer "
            f"({slopes[low]:.0f} B/token with {low} layers, {slopes[high]:.0f} with {high})",
            flush=True,
        )
    return rows


def memory_ceiling(lengths: list[int], workers: int, layers: int) -> dict:
    """Fit of the per-rank step peak and time over ``lengths``; the longest T that fits."""
    ranks = [r[layers] for r in run_ranks(rank_steps, workers, CEILING_SETTING, [layers], lengths)]
    peaks = [max(rank[i]["peak_bytes"] for rank in ranks) for i in range(len(lengths))]
    seconds = [max(rank[i]["seconds"] for rank in ranks) for i in range(len(lengths))]
    resident = max(rank[0]["resident_bytes"] for rank in ranks)
    intercept, per_token = fit_line(lengths, peaks)
    fixed = resident + max(intercept, 0.0)
    budget = psutil.virtual_memory().available
    max_tokens = int((budget / workers - fixed) / per_token)

    def step_seconds(length: int) -> float:
        # x T^2 from the longest step measured: attention dominates there; an overestimate
        # by the share of the linear parts
        return seconds[-1] * (length / lengths[-1]) ** 2

    row = {
        "workers": workers,
        "setting": CEILING_SETTING,
        "lengths": lengths,
        "peak_bytes_per_rank": peaks,
        "seconds": seconds,
        "fixed_bytes": fixed,
        "bytes_per_token": per_token,
        "memory_budget_bytes": budget,
        "max_tokens": max_tokens,
        "seconds_at_128k": step_seconds(131072),
        "seconds_at_max_tokens": step_seconds(max_tokens),
        "limit": (
            f"memory allows {max_tokens:,} tokens, but one step there would take "
            f"~{step_seconds(max_tokens) / 3600:.1f} h: compute bound"
        ),
    }
    print(
        f"{workers} worker(s): peak per rank {fixed / GiB:.2f} GiB + {per_token:.0f} B x T; "
        f"ceiling {max_tokens:,} tokens in {budget / GiB:.1f} GiB; step at 128k "
        f"~{row['seconds_at_128k']:.0f} s; {row['limit']}",
        flush=True,
    )
    return row


def longest(lengths: list[int], workers: int, layers: int) -> dict:
    """Real training steps at each length (``--longest``); a failure is recorded, not raised."""
    runs = []
    for length in lengths:
        started = time.perf_counter()
        try:
            ranks = run_ranks(rank_steps, workers, CEILING_SETTING, [layers], [length])
            ranks = [rank[layers] for rank in ranks]
        except (RuntimeError, TimeoutError) as error:
            runs.append(
                {
                    "seq_len": length,
                    "workers": workers,
                    "completed": False,
                    "seconds": time.perf_counter() - started,
                    "peak_bytes_per_rank": 0,
                    "error": str(error)[-500:],
                }
            )
            print(f"T={length}: failed: {str(error)[-200:]}", flush=True)
            continue
        step = {
            "seq_len": length,
            "workers": workers,
            "completed": True,
            "seconds": max(rank[0]["seconds"] for rank in ranks),
            "peak_bytes_per_rank": max(
                rank[0]["peak_bytes"] + rank[0]["resident_bytes"] for rank in ranks
            ),
        }
        runs.append(step)
        print(
            f"T={length}: step in {step['seconds']:.0f} s, peak "
            f"{step['peak_bytes_per_rank'] / GiB:.2f} GiB per rank (resident included)",
            flush=True,
        )
    return {"setting": CEILING_SETTING, "layers": layers, "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--layer-lengths", type=int, nargs="+", default=[4096, 8192],
        help="T of the bytes-per-token-per-layer fits",
    )  # fmt: skip
    parser.add_argument(
        "--ceiling-lengths", type=int, nargs="+", default=[8192, 16384, 32768],
        help="T of the memory-ceiling fits",
    )  # fmt: skip
    parser.add_argument(
        "--longest", action="store_true", help="real steps at --longest-lengths instead"
    )
    parser.add_argument("--longest-lengths", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--workers", type=int, default=2, help="workers of --longest")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    layers = load_recipe(DEMO_RECIPE).model.num_hidden_layers
    if args.longest:
        report = longest(sorted(args.longest_lengths), args.workers, layers)
        write_report(args.out or LONGEST_RESULTS, report)
        return report
    layer_lengths = sorted(args.layer_lengths)
    ceiling_lengths = sorted(args.ceiling_lengths)
    report = {
        "model": str(DEMO_RECIPE.relative_to(REPO)),
        "tiled_mlp_chunk": TILED_MLP_CHUNK,
        "per_layer": per_layer_bytes(layer_lengths, (layers, 2 * layers)),
        "ceiling": [memory_ceiling(ceiling_lengths, w, layers) for w in (1, 2)],
    }
    write_report(args.out or RESULTS, report)
    return report


if __name__ == "__main__":
    main()
