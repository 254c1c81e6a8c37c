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
case's CPU time is its compute time on one core whatever the load). Time: median process CPU
time of ``--repeats`` forward+backward runs after one warm-up. Memory: the resident-set
high-water mark (``VmHWM``) after the runs minus the resident size once the inputs exist,
the mark reset through ``/proc/self/clear_refs``. Ratios are dense / power, same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.registry import build_attention_core
from longctx.bench.measure import peak_memory_since, reset_peak_memory, run_worker, write_report
from longctx.model.config import ModelConfig
from longctx.positional.config import PositionalConfig

RESULTS = Path(__file__).resolve().parent / "results" / "sparse_power.json"
HEADS, HEAD_DIM = 4, 64


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
    gen = torch.Generator().manual_seed(0)
    shape = (1, HEADS, length, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
    dout = torch.randn(shape, generator=gen)
    ctx = AttentionContext(
        position_ids=torch.arange(length)[None], seq_positions=torch.arange(length)
    )
    core = _core(kind, block_size)

    def step() -> None:
        out = core(q, k, v, ctx)  # [1, H, T, D]
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    baseline = reset_peak_memory()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.process_time()
        step()
        times.append(time.process_time() - started)
    peak_mib = peak_memory_since(baseline) / 2**20
    return {"kind": kind, "length": length, "cpu_s": statistics.median(times), "peak_mib": peak_mib}


def measure(kind: str, length: int, block_size: int, repeats: int) -> dict:
    """``run_case`` in a fresh subprocess, so each peak counts only its own allocations."""
    command = [sys.executable, "-m", "longctx.bench.sparse_power", "--case", kind, str(length)]
    command += ["--block-size", str(block_size), "--repeats", str(repeats)]
    return run_worker(command, f"{kind} T={length}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
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
        dense = measure("dense", length, args.block_size, args.repeats)
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
        "results": rows,
    }
    write_report(args.out, report)
    return rows


if __name__ == "__main__":
    main()
