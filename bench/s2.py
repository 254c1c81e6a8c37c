"""S2-attn (LongLoRA shifted sparse attention) against dense causal attention: fwd+bwd time.

Run: ``python -m longctx.bench.s2`` (``--lengths 8192 16384`` by default, ``--quick`` for 1024
2048). Prints a table and writes ``bench/results/s2.json``; the issue-20 target is S2 step time
<= 0.6x dense at 16k.

Case: B=1, H=4, D=64, fp32 on CPU, the ``cpu_flash`` backend for both, S2 with its default
groups (T / 4) in training mode. Each case runs in a fresh one-thread subprocess (the
``sparse_power`` method, ``bench/measure.py``); time is the median process CPU time of
``--repeats`` forward+backward runs after one warm-up. Ratio: S2 / dense, same run.
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
from longctx.bench.measure import run_worker, write_report
from longctx.model.config import ModelConfig
from longctx.positional.config import PositionalConfig

RESULTS = Path(__file__).resolve().parent / "results" / "s2.json"
HEADS, HEAD_DIM = 4, 64


def run_case(variant: str, length: int, repeats: int) -> dict:
    """CPU seconds of one fwd+bwd of ``variant`` ('dense' or 's2') at T=``length``."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    shape = (1, HEADS, length, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
    dout = torch.randn(shape, generator=gen)
    ctx = AttentionContext(
        position_ids=torch.arange(length)[None], seq_positions=torch.arange(length)
    )
    attention_shape = ModelConfig(num_attention_heads=HEADS, head_dim=HEAD_DIM).attention_shape(0)
    config = AttentionConfig(variant=variant, backend="cpu_flash")
    core = build_attention_core(attention_shape, config, PositionalConfig()).train()

    def step() -> None:
        core(q, k, v, ctx).backward(dout)  # out [1, H, T, D]
        q.grad = k.grad = v.grad = None

    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.process_time()
        step()
        times.append(time.process_time() - started)
    return {"variant": variant, "length": length, "cpu_s": statistics.median(times)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="T = 1024, 2048")
    parser.add_argument("--case", nargs=2, metavar=("VARIANT", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.repeats)))
        return []
    rows = []
    print(f"{'T':>7} {'dense s':>9} {'s2 s':>9} {'s2/dense':>9}")
    for length in [1024, 2048] if args.quick else args.lengths:
        seconds = {}
        for variant in ("dense", "s2"):
            command = [sys.executable, "-m", "longctx.bench.s2", "--case", variant, str(length)]
            command += ["--repeats", str(args.repeats)]
            seconds[variant] = run_worker(command, f"{variant} T={length}")["cpu_s"]
        row = {"length": length, "dense_cpu_s": seconds["dense"], "s2_cpu_s": seconds["s2"]}
        row["ratio"] = row["s2_cpu_s"] / row["dense_cpu_s"]
        rows.append(row)
        print(
            f"{length:>7} {row['dense_cpu_s']:>9.2f} {row['s2_cpu_s']:>9.2f} {row['ratio']:>8.2f}x"
        )
    report = {
        "case": {"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32"},
        "s2": {"group_size": "T/4"},
        "threads": 1,
        "repeats": args.repeats,
        "results": rows,
    }
    write_report(args.out, report)
    return rows


if __name__ == "__main__":
    main()
