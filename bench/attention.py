"""Block-attention kernels against naive attention: forward+backward time and peak memory.

Run: ``python -m longctx.bench.attention`` (``--quick`` for a smoke run at small sizes;
``--lengths 2048 4096`` to choose T). Prints a table and writes ``bench/results/attention.json``.

Cases: causal attention, B=1, H=8, D=64, fp32 on CPU, for each length T:

- ``cpu_flash`` and ``chunked`` (``block_attention``, default tiles): forward + backward;
- ``naive``: ``softmax(mask(Q K^T * scale)) V`` in plain torch with autograd, forward + backward;
  its [B, H, T, T] tensors need ~25 GiB at T=16k (8 GiB each);
- ``flex``: FlexAttention's eager CPU path, forward only (it has no CPU backward; it also
  materialises the scores), compared against ``naive`` forward only.

A case runs only while its peak, estimated as T^2 times that of the largest length measured for
the same backend and mode (exact for naive and flex, whose big buffers are all [B, H, T, T]; an
overestimate for the others), fits in ``--memory-fraction`` of the available memory. Otherwise
its time (x T^2, the attention FLOPs) and memory (x T^2) are estimates, marked as such.

Ratios are kernel / naive for the same length and mode, measured in the same run.
Memory: each case runs in a fresh subprocess with glibc's mmap threshold fixed at 128 KiB from
its start (every large allocation is its own mapping, returned on free, so the resident size
follows the live tensors, not where freed temporaries were left in the heap; see
``bench/sparse_nsa_mosa.py``); the resident-set high-water mark (``VmHWM``) is reset through
``/proc/self/clear_refs`` after the inputs exist, one tiny warm-up ran and the heap was trimmed,
and the peak is ``VmHWM`` after one full run minus the resident size at the reset: every byte
the case allocates (tensors, the ops' scratch buffers, the gradients), nothing torch held
before. Time: median over ``--repeats`` runs after that first run, with the threshold at 32 MiB
(where glibc's adaptive one settles: temporaries reuse heap memory instead of page-faulting),
of the process CPU time (``time.process_time``) and of the wall time; ratios use CPU time.
Threads: ``--threads`` (default 1). The benchmark machine is shared (2 cores, other jobs
running): a one-thread case's CPU time is its compute time on one core whatever the load, while
its wall time grows with the load; with two threads OpenMP stalls at every parallel region
whenever another process holds a core, which inflates kernels made of many small ops (chunked:
x10-x30 measured) far more than one-call kernels. ``--threads 2 --repeats 3`` on an idle machine
measures the two-core speed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from longctx.attention.kernels import block_attention
from longctx.bench.measure import (
    MEMORY_METHOD,
    MEMORY_RUN_THRESHOLD,
    TIME_METHOD,
    TIMED_RUN_THRESHOLD,
    GiB,
    attention_inputs,
    fix_mmap_threshold,
    measured_or_extrapolated,
    peak_and_median_times,
    release_free_heap,
    run_worker,
    write_report,
)

RESULTS = Path(__file__).resolve().parent / "results" / "attention.json"
KERNELS = ("cpu_flash", "chunked", "flex")
BASELINE = "naive"


# ----------------------------------------------------------------------------- one case
def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention with the [B, H, T, T] probabilities materialised (autograd keeps them)."""
    length = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, T, T]
    hidden = torch.ones(length, length, dtype=torch.bool).triu_(1)
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # [B, H, T, D]


def _step(backend: str, backward: bool, q, k, v, dout) -> None:
    if backend == BASELINE:
        out = naive_attention(q, k, v)
    else:
        out, _ = block_attention(q, k, v, backend=backend)
    if backward:
        out.backward(dout)


def run_case(
    backend: str, length: int, heads: int, dim: int, backward: bool, repeats: int, threads: int
) -> dict:
    """Measure one case in this process (called in a fresh subprocess by ``measure``)."""
    torch.set_num_threads(threads)
    fix_mmap_threshold(MEMORY_RUN_THRESHOLD)  # before the inputs: see the module docstring
    gen = torch.Generator().manual_seed(0)
    warm_up = attention_inputs(gen, heads, 128, dim, requires_grad=backward)
    _step(backend, backward, *warm_up)  # lazy initialisation of ops and threads
    q, k, v, dout = attention_inputs(gen, heads, length, dim, requires_grad=backward)

    def step() -> None:
        q.grad = k.grad = v.grad = None
        _step(backend, backward, q, k, v, dout)

    release_free_heap()
    return peak_and_median_times(step, repeats, timed_threshold=TIMED_RUN_THRESHOLD)


def measure(backend: str, length: int, args: argparse.Namespace, backward: bool) -> dict:
    """Run one case in a fresh Python process and return its measurements."""
    command = [
        sys.executable, "-m", "longctx.bench.attention", "--worker", backend,
        "--lengths", str(length), "--heads", str(args.heads), "--dim", str(args.dim),
        "--repeats", str(args.repeats), "--threads", str(args.threads),
        *([] if backward else ["--forward-only"]),
    ]  # fmt: skip
    result = run_worker(command, f"case {backend} T={length}")
    print(
        f"{backend:>9} {'fwd+bwd' if backward else 'fwd':>7} T={length:>6} "
        f"{result['time_s']:8.2f} s cpu {result['wall_s']:8.2f} s wall "
        f"{result['peak_bytes'] / GiB:8.3f} GiB",
        flush=True,
    )
    return result


# ----------------------------------------------------------------------------- the sweep
def _rows_of(backend: str, lengths: list[int], args: argparse.Namespace, backward: bool) -> dict:
    """Per length: measured while the T^2-scaled estimate of its peak fits, else that estimate."""

    def measure_length(length: int) -> dict:
        return measure(backend, length, args, backward)

    return measured_or_extrapolated(lengths, measure_length, args.memory_fraction, backend)


def sweep(args: argparse.Namespace) -> list[dict]:
    """Every backend and length, each row with its ratios against naive in the same mode."""
    rows = []
    for backward in (True, False):
        kernels = [b for b in args.backends if (b == "flex") != backward]
        if not kernels:
            continue
        mode = "fwd+bwd" if backward else "fwd"
        naive = _rows_of(BASELINE, args.lengths, args, backward)
        results = {backend: _rows_of(backend, args.lengths, args, backward) for backend in kernels}
        for length in args.lengths:
            rows.append({"backend": BASELINE, "mode": mode, "length": length, **naive[length]})
            for backend in kernels:
                result = results[backend][length]
                rows.append({
                    "backend": backend, "mode": mode, "length": length, **result,
                    "time_ratio_vs_naive": result["time_s"] / naive[length]["time_s"],
                    "memory_ratio_vs_naive": result["peak_bytes"] / naive[length]["peak_bytes"],
                    "naive_measured": naive[length]["measured"],
                })  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = "Causal attention, B=1, fp32, CPU; ratios: kernel / naive (CPU time, peak), same run"
    table = Table(title=title)
    columns = ("backend", "mode", "T", "cpu s", "wall s", "peak GiB", "time ratio", "mem ratio")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        mark = "" if row["measured"] else " (est.)"
        ratios = ("", "")
        if "time_ratio_vs_naive" in row:
            naive_mark = "" if row["naive_measured"] else " vs est."
            ratios = (
                f"{row['time_ratio_vs_naive']:.2f}{naive_mark}",
                f"{row['memory_ratio_vs_naive']:.4f}{naive_mark}",
            )
        table.add_row(
            row["backend"], row["mode"], str(row["length"]), f"{row['time_s']:.2f}{mark}",
            f"{row['wall_s']:.2f}{mark}", f"{row['peak_bytes'] / GiB:.3f}{mark}", *ratios,
        )  # fmt: skip
    Console(width=120).print(table)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--backends", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the memory run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case")
    parser.add_argument(
        "--memory-fraction", type=float, default=0.6,
        help="run naive only while its estimated peak is below this share of available memory",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="T = 512, 1024 and one timed run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=(*KERNELS, BASELINE), help=argparse.SUPPRESS)
    parser.add_argument("--forward-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = run_case(
            args.worker,
            args.lengths[0],
            args.heads,
            args.dim,
            not args.forward_only,
            args.repeats,
            args.threads,
        )
        print(json.dumps(result))
        return [result]
    if args.quick:
        args.lengths, args.repeats = [512, 1024], 1
    rows = sweep(args)
    print_table(rows)
    report = {
        "config": {
            "batch": 1, "heads": args.heads, "head_dim": args.dim, "dtype": "float32",
            "causal": True, "threads": args.threads, "repeats": args.repeats,
        },
        "memory_method": MEMORY_METHOD,
        "time_method": TIME_METHOD,
        "results": rows,
    }  # fmt: skip
    write_report(args.out, report)
    return rows


if __name__ == "__main__":
    main()
