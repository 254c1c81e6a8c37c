"""Sequence-parallel benchmarks: ring attention time and memory, zigzag balance, tiled loss memory.

Run: ``python -m longctx.bench.sp`` (``--quick`` for a smoke run at small sizes). Prints a table
and writes ``bench/results/sp.json``. Every number is a ratio against a baseline measured in the
same run, on the same machine:

- ring P=2 forward+backward time of causal attention at T=16k, two ranks of one thread each,
  against one process with two threads on the full sequence (target <= 1.15x);
- peak memory per ring rank against that single process (target <= 0.55x);
- per-rank causal work under the zigzag layout (target max/min <= 1.05) and a contiguous split
  (about 3x at P=2), both as exact causal (query, key) pairs and as the pairs ring attention's
  skip plan actually computes;
- a whole training step (forward, tiled loss, backward) of a small decoder at the same T under
  ring 2 against one process: peak memory per rank and time, where activations, not attention
  buffers, dominate;
- tiled cross-entropy peak memory at T=64k, V=32k against plain ``F.cross_entropy`` (target
  <= 1/8). Plain cross-entropy at 64k x 32k needs about 24 GiB (logits, log-softmax and their
  gradient, all [T, V] fp32), more than the benchmark machine has, so it is measured at
  ``--plain-loss-seq-len`` and scaled linearly in T: every one of its big buffers is [T, V].

Memory is the resident-set high-water mark of a fresh process (``VmHWM``, reset through
``/proc/self/clear_refs`` after a tiny warm-up) minus the resident size at the reset, so torch's
own libraries and the warm-up do not count. The children run with a fixed glibc mmap threshold
(``MALLOC_MMAP_THRESHOLD_``): every large tensor is then its own mapping, returned on free, and
the resident size follows live tensors instead of freed heap that glibc keeps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.attention.kernels import block_attention
from longctx.attention.mask import MaskSpec
from longctx.bench.measure import (
    GiB,
    attention_inputs,
    peak_memory_since,
    random_training_batch,
    reset_peak_memory,
    run_ranks,
    write_report,
)
from longctx.model import ModelConfig, Transformer
from longctx.parallel.apply import TransformPlan, apply_transforms
from longctx.parallel.config import ParallelConfig
from longctx.parallel.layout import causal_work, zigzag_positions
from longctx.parallel.loss import tiled_cross_entropy, world_mean_scale
from longctx.parallel.mesh import build_mesh
from longctx.parallel.ring import ring_attention, visible_pieces

RESULTS = Path(__file__).resolve().parent / "results" / "sp.json"


# ----------------------------------------------------------------------------- processes
def _attention_inputs(seq_len: int, heads: int, head_dim: int, seed: int = 0):
    """q, k, v (requiring grad) and dout, [1, H, T, D], drawn from a generator seeded ``seed``."""
    return attention_inputs(torch.Generator().manual_seed(seed), heads, seq_len, head_dim)


# ----------------------------------------------------------------------------- attention
def _warm_up_attention(heads: int, head_dim: int) -> None:
    """Load the kernels' code paths at a tiny size, so the memory reset excludes them."""
    q, k, v, dout = _attention_inputs(64, heads, head_dim)
    out, _ = block_attention(q, k, v, mask=MaskSpec(causal=True))
    out.backward(dout)


def _single_process_attention(rank, world, seq_len, heads, head_dim, threads, repeats):
    torch.set_num_threads(threads)
    _warm_up_attention(heads, head_dim)
    baseline = reset_peak_memory()
    q, k, v, dout = _attention_inputs(seq_len, heads, head_dim)
    times = []
    for _ in range(repeats):
        q.grad = k.grad = v.grad = None
        start = time.perf_counter()
        out, _ = block_attention(q, k, v, mask=MaskSpec(causal=True))
        out.backward(dout)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_bytes": peak_memory_since(baseline)}


def _ring_rank_attention(rank, world, seq_len, heads, head_dim, repeats):
    torch.set_num_threads(1)
    _warm_up_attention(heads, head_dim)
    baseline = reset_peak_memory()
    positions = zigzag_positions(seq_len, rank, world)
    # Values do not matter for time or memory; drawing only the local shard keeps the full
    # sequence from ever being resident on a rank.
    q, k, v, dout = _attention_inputs(len(positions), heads, head_dim, seed=rank)
    times = []
    for _ in range(repeats):
        q.grad = k.grad = v.grad = None
        dist.barrier()
        start = time.perf_counter()
        out = ring_attention(q, k, v, group=dist.group.WORLD, seq_positions=positions)
        out.backward(dout)
        dist.barrier()  # the slowest rank decides the step time
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_bytes": peak_memory_since(baseline)}


def _ring_vs_single(single: dict, ring: list[dict]) -> dict:
    """Ring time (slowest rank) and peak (largest rank) against the single process, each
    measurement a ``{"seconds", "peak_bytes"}`` dict."""
    ring_seconds = max(r["seconds"] for r in ring)
    ring_peak = max(r["peak_bytes"] for r in ring)
    return {
        "single_seconds": single["seconds"],
        "ring2_seconds": ring_seconds,
        "time_ratio": ring_seconds / single["seconds"],
        "single_peak_bytes": single["peak_bytes"],
        "ring2_peak_bytes_per_rank": ring_peak,
        "memory_ratio": ring_peak / single["peak_bytes"],
    }


# Block-sized fp32 tensors ([1, H, T/2, D]) a ring rank must hold at its backward peak: the
# caller's q, k, v, dout; out; the results dq, dk, dv. At P=2 the visiting K,V block arrives in
# key segments (parallel/ring.py), so it adds workspace, not whole blocks.
RING_FLOOR_BLOCKS = {"q, k, v, dout": 4, "out": 1, "dq, dk, dv": 3}


def bench_ring_attention(seq_len: int, heads: int, head_dim: int, repeats: int) -> dict:
    """Ring P=2 (1 thread per rank) vs one process with 2 threads, causal fwd+bwd; with the
    floor of the ring's block-sized tensors (``RING_FLOOR_BLOCKS``) as a ratio to the same
    single process."""
    single = run_ranks(_single_process_attention, 1, seq_len, heads, head_dim, 2, repeats)[0]
    ring = run_ranks(_ring_rank_attention, 2, seq_len, heads, head_dim, repeats)
    block_bytes = seq_len // 2 * heads * head_dim * 4
    floor = sum(RING_FLOOR_BLOCKS.values()) * block_bytes
    return {
        "seq_len": seq_len,
        "heads": heads,
        "head_dim": head_dim,
        **_ring_vs_single(single, ring),
        "block_bytes": block_bytes,
        "floor_blocks": RING_FLOOR_BLOCKS,
        "floor_bytes_per_rank": floor,
        "floor_ratio": floor / single["peak_bytes"],
    }


# ----------------------------------------------------------------------------- model step
BENCH_MODEL = ModelConfig(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=65536,
)


def _model_step_once(model, batch, group) -> None:
    hidden = model.forward_hidden(
        batch["input_ids"], batch["position_ids"], seq_positions=batch["seq_positions"]
    )
    loss = tiled_cross_entropy(hidden, model.lm_head.weight, batch["labels"], group=group)
    (loss * world_mean_scale(group)).backward()


def _model_step(rank, world, seq_len, threads):
    """Peak memory and time of one training step on this rank's tokens (ring over ``world``)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(BENCH_MODEL)
    group = None
    shard = None
    if world > 1:
        mesh = build_mesh(ParallelConfig(dp=1, ring=world))
        apply_transforms(model, TransformPlan(mesh=mesh))
        group, shard = mesh.sp_group, mesh.shard_batch
    gen = torch.Generator().manual_seed(0)

    def tokens(length: int) -> dict[str, torch.Tensor]:
        return random_training_batch(BENCH_MODEL.vocab_size, length, gen, shard)

    _model_step_once(model, tokens(64), group)  # warm-up at a tiny length
    model.zero_grad(set_to_none=False)  # gradient buffers exist in both runs before the reset
    batch = tokens(seq_len)
    baseline = reset_peak_memory()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    _model_step_once(model, batch, group)
    if world > 1:
        dist.barrier()
    return {"seconds": time.perf_counter() - start, "peak_bytes": peak_memory_since(baseline)}


def bench_model_step(seq_len: int) -> dict:
    single = run_ranks(_model_step, 1, seq_len, 2)[0]
    ring = run_ranks(_model_step, 2, seq_len, 1)
    return {
        "seq_len": seq_len,
        "model": BENCH_MODEL.model_dump(include={"hidden_size", "num_hidden_layers", "vocab_size"}),
        **_ring_vs_single(single, ring),
    }


# ----------------------------------------------------------------------------- balance
def _scheduled_pairs(positions_per_rank: list[torch.Tensor]) -> list[int]:
    """(query, key) pairs each rank computes under ring attention's skip plan (causal)."""
    world = len(positions_per_rank)
    local = positions_per_rank[0].shape[0]
    work = []
    for rank in range(world):
        pairs = 0
        for step in range(world):
            mask = MaskSpec(
                causal=True,
                q_positions=positions_per_rank[rank],
                k_positions=positions_per_rank[(rank - step) % world],
            ).bind(local, local)
            pairs += sum(
                (qs.stop - qs.start) * (ks.stop - ks.start)
                for qs, ks in visible_pieces(mask, local, local)
            )
        work.append(pairs)
    return work


def bench_balance(seq_len: int, world: int) -> dict:
    """max/min per-rank causal work: zigzag and contiguous layouts, exact and as scheduled."""
    zigzag = [zigzag_positions(seq_len, r, world) for r in range(world)]
    contiguous = list(torch.arange(seq_len).chunk(world))

    def ratio(values: list[int]) -> float:
        return max(values) / min(values)

    return {
        "seq_len": seq_len,
        "world": world,
        "zigzag_causal_pairs_ratio": ratio([causal_work(p) for p in zigzag]),
        "contiguous_causal_pairs_ratio": ratio([causal_work(p) for p in contiguous]),
        "zigzag_scheduled_ratio": ratio(_scheduled_pairs(zigzag)),
        "contiguous_scheduled_ratio": ratio(_scheduled_pairs(contiguous)),
    }


# ----------------------------------------------------------------------------- loss
def _loss_inputs(seq_len: int, vocab: int, dim: int):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(seq_len, dim, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (seq_len,), generator=gen)
    return hidden, weight, labels


def _loss_peak(rank, world, kind, seq_len, vocab, dim):
    torch.set_num_threads(2)
    hidden, weight, labels = _loss_inputs(64, vocab // 64, dim)
    tiled_cross_entropy(hidden, weight, labels, chunk_size=16).backward()
    F.cross_entropy(hidden @ weight.t(), labels).backward()
    hidden, weight, labels = _loss_inputs(seq_len, vocab, dim)
    baseline = reset_peak_memory()  # inputs excluded: both losses share them
    start = time.perf_counter()
    if kind == "tiled":
        tiled_cross_entropy(hidden, weight, labels).backward()
    else:
        F.cross_entropy(hidden @ weight.t(), labels).backward()
    return {"peak_bytes": peak_memory_since(baseline), "seconds": time.perf_counter() - start}


def bench_tiled_loss(seq_len: int, plain_seq_len: int, vocab: int, dim: int) -> dict:
    tiled = run_ranks(_loss_peak, 1, "tiled", seq_len, vocab, dim)[0]
    plain = run_ranks(_loss_peak, 1, "plain", plain_seq_len, vocab, dim)[0]
    plain_scaled = plain["peak_bytes"] * seq_len / plain_seq_len
    return {
        "seq_len": seq_len,
        "vocab": vocab,
        "hidden_dim": dim,
        "tiled_peak_bytes": tiled["peak_bytes"],
        "tiled_seconds": tiled["seconds"],
        "plain_measured_seq_len": plain_seq_len,
        "plain_measured_peak_bytes": plain["peak_bytes"],
        "plain_peak_bytes_at_seq_len": plain_scaled,
        "memory_ratio": tiled["peak_bytes"] / plain_scaled,
    }


# ----------------------------------------------------------------------------- report
def _rows(results: dict) -> list[tuple[str, str, str, str]]:
    ring, balance, loss = results["ring"], results["balance"], results["tiled_loss"]
    step = results["model_step"]
    t = ring["seq_len"]
    return [
        (
            f"ring P=2 fwd+bwd time, T={t}",
            f"{ring['ring2_seconds']:.2f} s vs {ring['single_seconds']:.2f} s",
            f"{ring['time_ratio']:.3f}x",
            "<= 1.15x",
        ),
        (
            f"ring P=2 peak memory per rank, T={t}",
            f"{ring['ring2_peak_bytes_per_rank'] / GiB:.3f} vs "
            f"{ring['single_peak_bytes'] / GiB:.3f} GiB",
            f"{ring['memory_ratio']:.3f}x",
            "<= 0.55x",
        ),
        (
            f"model step time, ring 2 vs 1 process, T={step['seq_len']}",
            f"{step['ring2_seconds']:.2f} s vs {step['single_seconds']:.2f} s",
            f"{step['time_ratio']:.3f}x",
            "",
        ),
        (
            f"model step peak memory per rank, T={step['seq_len']}",
            f"{step['ring2_peak_bytes_per_rank'] / GiB:.3f} vs "
            f"{step['single_peak_bytes'] / GiB:.3f} GiB",
            f"{step['memory_ratio']:.3f}x",
            "",
        ),
        (
            f"zigzag causal work max/min, P={balance['world']}",
            f"scheduled {balance['zigzag_scheduled_ratio']:.3f}",
            f"{balance['zigzag_causal_pairs_ratio']:.3f}x",
            "<= 1.05x",
        ),
        (
            f"contiguous causal work max/min, P={balance['world']}",
            f"scheduled {balance['contiguous_scheduled_ratio']:.3f}",
            f"{balance['contiguous_causal_pairs_ratio']:.3f}x",
            "~3x",
        ),
        (
            f"tiled loss peak memory, T={loss['seq_len']}, V={loss['vocab']}",
            f"{loss['tiled_peak_bytes'] / GiB:.3f} vs "
            f"{loss['plain_peak_bytes_at_seq_len'] / GiB:.3f} GiB",
            f"{loss['memory_ratio']:.4f}x",
            "<= 0.125x",
        ),
    ]


def print_table(results: dict) -> None:
    rows = [("measure", "values", "ratio", "target"), *_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=16384, help="ring attention length")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; the fastest counts")
    parser.add_argument("--loss-seq-len", type=int, default=65536)
    parser.add_argument("--plain-loss-seq-len", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--loss-dim", type=int, default=64, help="hidden size of the loss bench")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_len, args.loss_seq_len, args.plain_loss_seq_len = 2048, 8192, 2048
        args.vocab, args.repeats = 4096, 1
    results = {
        "ring": bench_ring_attention(args.seq_len, args.heads, args.head_dim, args.repeats),
        "model_step": bench_model_step(args.seq_len),
        "balance": bench_balance(args.seq_len, 2),
        "tiled_loss": bench_tiled_loss(
            args.loss_seq_len, args.plain_loss_seq_len, args.vocab, args.loss_dim
        ),
    }
    print_table(results)
    write_report(args.out, results)
    return results


if __name__ == "__main__":
    main()
