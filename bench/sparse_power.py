"""PowerAttention against dense causal attention at long T: forward+backward time and memory.

Run: ``python -m longctx.bench.sparse_power`` (``--lengths 8192 16384 32768`` by default,
``--quick`` for 1024 2048). Prints a table and writes ``bench/results/sparse_power.json``.

Case: B=1, H=4, D=64, fp32 on CPU, the ``cpu_flash`` backend for both (torch's fused CPU op on
whole causal calls for dense; one fused call per visible tile for power). Power uses
``--block-size`` (default 512) with the tile equal to the block, window 1 block and 1 sink
block, so every visited tile is either fully visible or the causal diagonal: the kernel's work
is the pattern's visible blocks, about ``(W + S + log2(T / B))`` per query block against
``T / 2B`` for dense.

Each case runs in a fresh subprocess with one thread (the machine is shared; a one-thread
case's CPU time is its compute time on one core whatever the load), as ``bench/attention.py``
measures (``measure.peak_and_median_times``): a 256-token warm-up, then a memory run with
glibc's mmap threshold fixed at 128 KiB from the start of the process (peak: ``VmHWM`` of the
run minus the resident size at a ``/proc/self/clear_refs`` reset once the inputs exist), then
``--repeats`` timed runs (median process CPU time) with the threshold at 32 MiB. Dense attention
is timed on its memory run (``--dense-repeats`` 0): its few large buffers are their own
mappings under either threshold, so the extra run would only repeat its ~72 s at T=32768 on an
AVX2 core (see ``bench/sparse_nsa_mosa.py``). Ratios are dense / power, same run. Until
2026-12-06 every case ran a full-length warm-up and kept the default adaptive threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.registry import build_attention_core
from longctx.bench.measure import (
    MEMORY_RUN_THRESHOLD,
    TIMED_RUN_THRESHOLD,
    fix_mmap_threshold,
    peak_and_median_times,
    release_free_heap,
    run_worker,
    write_report,
)
from longctx.model.config import ModelConfig
from longctx.positional.config import PositionalConfig

RESULTS = Path(__file__).resolve().parent / "results" / "sparse_power.json"
HEADS, HEAD_DIM = 4, 64
WARMUP = 256  # tokens of the warm-up run


def _core(kind: str, block_size: int) -> torch.nn.Module:
    config = AttentionConfig(backend="cpu_flash")
    if kind != "dense":
        config = AttentionConfig(
            variant="power",
            backend="cpu_flash",
            chunk_size=block_size,
            power={"block_size": block_size, "window_blocks": 1, "sink_blocks": 1},
        )
    shape = ModelConfig(num_attention_heads=HEADS, head_dim=HEAD_DIM).attention_shape(0)
    return build_attention_core(shape, config, PositionalConfig())


def run_case(kind: str, length: int, block_size: int, repeats: int) -> dict:
    """Time and peak memory of one (core, T) case in this process (one thread)."""
    torch.set_num_threads(1)
    fix_mmap_threshold(MEMORY_RUN_THRESHOLD)  # before the inputs, as bench/attention.py
    gen = torch.Generator().manual_seed(0)
    core = _core(kind, block_size)

    def inputs(tokens: int) -> tuple[list[torch.Tensor], AttentionContext]:
        shape = (1, HEADS, tokens, HEAD_DIM)
        q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
        ctx = AttentionContext(
            position_ids=torch.arange(tokens)[None], seq_positions=torch.arange(tokens)
        )
        return [q, k, v, torch.randn(shape, generator=gen)], ctx

    def step(q, k, v, dout, ctx) -> None:
        core(q, k, v, ctx).backward(dout)  # out: [1, H, T, D]
        q.grad = k.grad = v.grad = None

    warm_up, warm_up_ctx = inputs(WARMUP)
    step(*warm_up, warm_up_ctx)  # lazy initialisation of ops
    tensors, ctx = inputs(length)
    release_free_heap()
    measured = peak_and_median_times(
        lambda: step(*tensors, ctx), repeats, timed_threshold=TIMED_RUN_THRESHOLD
    )
    return {
        "kind": kind, "length": length, "cpu_s": measured["time_s"],
        "peak_mib": measured["peak_bytes"] / 2**20,
    }  # fmt: skip


def measure(kind: str, length: int, block_size: int, repeats: int) -> dict:
    """``run_case`` in a fresh subprocess, so each peak counts only its own allocations."""
    command = [sys.executable, "-m", "longctx.bench.sparse_power", "--case", kind, str(length)]
    command += ["--block-size", str(block_size), "--repeats", str(repeats)]
    return run_worker(command, f"{kind} T={length}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of power")
    parser.add_argument(
        "--dense-repeats", type=int, default=0, help="timed runs of dense (0: its memory run)"
    )
    parser.add_argument("--quick", action="store_true", help="T = 1024, 2048")
    parser.add_argument("--case", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.block_size, args.repeats)))
        return []
    lengths = [1024, 2048] if args.quick else args.lengths
    rows = []
    print(
        f"{'T':>7} {'dense s':>9} {'power s':>9} {'speedup':>8} {'dense MiB':>10} {'power MiB':>10}"
    )
    for length in lengths:
        dense = measure("dense", length, args.block_size, args.dense_repeats)
        power = measure("power", length, args.block_size, args.repeats)
        row = {
            "length": length,
            "dense_cpu_s": dense["cpu_s"],
            "power_cpu_s": power["cpu_s"],
            "speedup": dense["cpu_s"] / power["cpu_s"],
            "dense_peak_mib": dense["peak_mib"],
            "power_peak_mib": power["peak_mib"],
        }
        rows.append(row)
        print(
            f"{length:>7} {row['dense_cpu_s']:>9.2f} {row['power_cpu_s']:>9.2f} "
            f"{row['speedup']:>7.2f}x {row['dense_peak_mib']:>10.0f} {row['power_peak_mib']:>10.0f}"
        )
    report = {
        "case": {"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32"},
        "power": {"block_size": args.block_size, "window_blocks": 1, "sink_blocks": 1},
        "threads": 1,
        "repeats": args.repeats,
        "dense_repeats": args.dense_repeats,
        "results": rows,
    }
    write_report(args.out, report)
    return rows


if __name__ == "__main__":
    main()
