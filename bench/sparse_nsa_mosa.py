"""NSA and MoSA cores against the dense core: forward+backward time and peak memory at long T.

Run: ``python -m longctx.bench.sparse_nsa_mosa`` (``--lengths 8192 16384 32768``,
``--inputs random``; ``--inputs random coherent`` adds the coherent kind). Prints a table and
writes ``bench/results/sparse_nsa_mosa.json``.

Cases (B=1, Hq=8, Hkv=2, D=64, d_model=512, fp32, CPU, one thread), each in a fresh
subprocess, for every length T and input kind:

- ``dense``: ``DenseAttention`` (the cpu_flash kernel, causal);
- ``nsa``: ``NSAAttention`` with the SPECS defaults (l=32, d=16, l'=64, n=16, w=512);
- ``mosa``: ``MoSAAttention`` with every head routed and rho=16 (k = T/16).

These are the attention cores alone (q, k, v given); ``bench/mosa_layer.py`` times the whole
MoSA layer with the projections that its routed heads compute at their chosen tokens only.

Input kinds: ``random`` draws q, k, v iid N(0, 1); ``coherent`` mixes a component that varies
slowly along the sequence (linear interpolation of N(0, 1) knots every 256 tokens) with iid
noise, rescaled to unit variance, so that neighbouring queries look alike as in a trained model.
NSA's selection branch is block-major (``attention/nsa_selection.py``): its cost follows the
number of (query, selected block) pairs, not how alike neighbouring queries' picks are, so both
kinds time alike (an earlier kernel gathered the union of a query chunk's blocks and was 2x
slower on ``random``). Both ran by default until 2026-12-06; at T = 8k / 16k / 32k on an AVX2
core NSA took 6.98 / 14.56 / 36.58 s on random inputs and 6.38 / 14.75 / 34.14 s on coherent
ones (peaks within 0.2%), so ``make bench`` now runs ``random`` only, which saves its ~2 minutes
of NSA runs; ``--inputs random coherent`` measures both again.
NSA runs as one autograd function (``attention/nsa_gated.py``): its peak memory is the output
and the saved selection output at the end of its forward, and its compressed and window
branches take their gradients from their probabilities, re-formed from the saved lse
(``attention/nsa_branches.py``), so no branch output is recomputed or kept.

Inputs and the output gradient are token-major views ([1, T, H, D] in memory), the layout
the model hands its core (q, k, v are views of the projections' outputs, dout of o_proj's input
gradient); the output gradient is random (N(0, 1)), as in training, and reaches the core's
backward without the output being kept alive (``_GradientOf``), as in a model, where o_proj's
backward has released it. (Until 2026-12-05 the gradient of ``out.sum()`` was used: an expanded
scalar that dense attention's backward copies into a contiguous 64 MiB tensor at T=32768, which
put dense's peak at ~228 MiB instead of ~170 and NSA's ratio at 0.81x instead of ~1.0x.)

Each case process runs, after a warm-up, a memory run and then (but for dense) a timed run. Memory: the
resident high-water mark of the memory run minus the resident size once the inputs exist
(``/proc/self/clear_refs``), with glibc's mmap threshold fixed at 128 KiB from the start of the
process (before the inputs are drawn) and the heap trimmed before the run, so that the peak
follows the live tensors and not where freed temporaries were left (with the default adaptive
threshold dense attention's peak varied from 143 to 174 MiB between runs). Until 2026-12-05 the
threshold was fixed only after the inputs existed: their set-up's freed temporaries, ~50 MiB,
stayed in the heap as trimmed free chunks, and the measured run's small allocations faulted
some of them back in at places that changed between identical runs: NSA's peak at 32k moved
between 154 and 181 MiB; with the threshold fixed first it is 156.9-157.3 MiB in three runs,
and dense's 164.0-164.1.
Time: process CPU time of the timed run (the machine is shared; CPU time on one thread is the
compute time whatever the load), with the threshold at 32 MiB, where glibc's adaptive
one settles: a 128 KiB threshold turns every large temporary into fresh pages, and the page
faults cost NSA, which allocates many temporaries, 31% more CPU time at 32k (14.8 vs 11.3 s),
and not dense (30.9 vs 31.9 s), whose few large buffers are their own mappings under either
threshold: so dense is timed on its memory run, which saves the suite ~50 s (its 32k run takes
~35 s) and, if anything, makes dense's time lower and the variants' ratios smaller. Ratios are dense / variant at the same length; dense is
measured once per length (its cost does not depend on the values; ``measured_with`` names the
input kind of that run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longctx.attention import AttentionConfig, AttentionContext, build_attention_core
from longctx.attention.config import MoSAConfig
from longctx.bench.measure import (
    MEMORY_RUN_THRESHOLD,
    TIMED_RUN_THRESHOLD,
    fix_mmap_threshold,
    peak_memory_since,
    release_free_heap,
    reset_peak_memory,
    run_worker,
    write_report,
)
from longctx.model.config import ModelConfig
from longctx.positional.config import PositionalConfig

RESULTS = Path(__file__).resolve().parent / "results" / "sparse_nsa_mosa.json"
CASES = ("dense", "nsa", "mosa")
HEADS, KV_HEADS, DIM, HIDDEN = 8, 2, 64, 512
KNOT_SPACING = 256  # tokens between the knots of the slowly varying component


def _heads(heads: int, length: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """[1, heads, T, D] unit-variance inputs of the given kind, token-major ([1, T, heads, D]
    in memory) as the model hands q, k, v to its core (a view of the projection's output)."""
    noise = torch.randn(1, length, heads, DIM, generator=gen).transpose(1, 2)
    if kind == "random":
        return noise
    knots = torch.randn(1, heads * DIM, length // KNOT_SPACING + 2, generator=gen)
    slow = F.interpolate(knots, size=length, mode="linear", align_corners=True)
    slow = slow.view(1, heads, DIM, length).transpose(-1, -2)  # [1, heads, T, D]
    mixed = 2.0 * slow + 0.5 * noise
    return (mixed / mixed.std()).transpose(1, 2).contiguous().transpose(1, 2)


def _core(case: str) -> torch.nn.Module:
    config = ModelConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM,
    )  # fmt: skip
    attention = {
        "dense": AttentionConfig(),
        "nsa": AttentionConfig(variant="nsa"),
        "mosa": AttentionConfig(variant="mosa", mosa=MoSAConfig(dense_heads=0, sparsity=16)),
    }[case]
    return build_attention_core(config.attention_shape(0), attention, PositionalConfig())


class _GradientOf(torch.autograd.Function):
    """``(out, dout) -> 0``, whose backward hands ``dout`` to ``out``'s graph as its gradient:
    ``out`` is not kept through the backward (in a model, o_proj's backward has used and
    released it before the attention's backward runs), which ``out.backward(dout)`` would."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
        ctx.dout = dout
        return out.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.dout, None


def run_case(case: str, length: int, kind: str) -> dict:
    """One forward+backward of ``case`` at T = ``length``: CPU seconds and peak bytes."""
    torch.set_num_threads(1)
    fix_mmap_threshold(MEMORY_RUN_THRESHOLD)  # before the inputs: see the module docstring
    gen = torch.Generator().manual_seed(0)
    q = _heads(HEADS, length, kind, gen).requires_grad_()
    k = _heads(KV_HEADS, length, kind, gen).requires_grad_()
    v = _heads(KV_HEADS, length, kind, gen).requires_grad_()
    dout = _heads(HEADS, length, "random", gen)  # the output gradient o_proj's backward gives
    hidden = torch.randn(1, length, HIDDEN, generator=gen)
    positions = torch.arange(length)
    ctx = AttentionContext(position_ids=positions[None], seq_positions=positions, hidden=hidden)
    core = _core(case)
    core(q[:, :, :256], k[:, :, :256], v[:, :, :256], _prefix(ctx, 256)).sum().backward()
    for tensor in (q, k, v):
        tensor.grad = None
    release_free_heap()
    baseline = reset_peak_memory()
    start = time.process_time()
    _GradientOf.apply(core(q, k, v, ctx), dout).backward()
    seconds = time.process_time() - start
    peak = peak_memory_since(baseline)
    if case != "dense":  # dense's time is its memory run's (see the module docstring)
        for tensor in (q, k, v):
            tensor.grad = None
        fix_mmap_threshold(TIMED_RUN_THRESHOLD)  # temporaries reuse heap memory, as by default
        start = time.process_time()
        _GradientOf.apply(core(q, k, v, ctx), dout).backward()
        seconds = time.process_time() - start
    return {"case": case, "length": length, "inputs": kind, "seconds": seconds, "peak_bytes": peak}


def _prefix(ctx: AttentionContext, length: int) -> AttentionContext:
    return AttentionContext(
        position_ids=ctx.position_ids[:, :length], seq_positions=ctx.seq_positions[:length],
        hidden=ctx.hidden[:, :length],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--inputs", nargs="+", default=["random"], choices=("random", "coherent"))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file to write")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "LENGTH", "INPUTS"))
    args = parser.parse_args()
    if args.child:
        case, length, kind = args.child
        print(json.dumps(run_case(case, int(length), kind)))
        return
    rows = []
    for kind in args.inputs:
        for length in args.lengths:
            for case in args.cases:
                measured = _dense_row(rows, length) if case == "dense" else None
                if measured is not None:  # dense attention's cost does not depend on the values
                    rows.append({**measured, "inputs": kind, "measured_with": measured["inputs"]})
                    print(_format(rows[-1], rows), flush=True)
                    continue
                command = [sys.executable, "-m", "longctx.bench.sparse_nsa_mosa", "--child",
                           case, str(length), kind]  # fmt: skip
                rows.append(run_worker(command, f"{case} T={length} {kind}"))
                print(_format(rows[-1], rows), flush=True)
    write_report(args.out, rows)


def _dense_row(rows: list[dict], length: int) -> dict | None:
    """The dense case already measured at ``length`` (with another input kind), if any."""
    return next((r for r in rows if r["case"] == "dense" and r["length"] == length), None)


def _format(row: dict, rows: list[dict]) -> str:
    dense = next(
        (r for r in rows if r["case"] == "dense" and r["length"] == row["length"]
         and r["inputs"] == row["inputs"]),
        None,
    )  # fmt: skip
    speedup = "" if dense is None else f"  dense/this time {dense['seconds'] / row['seconds']:.2f}x"
    memory = (
        "" if dense is None else f"  mem {row['peak_bytes'] / max(dense['peak_bytes'], 1):.2f}x"
    )
    return (
        f"{row['inputs']:>8}  T={row['length']:>6}  {row['case']:>5}  "
        f"{row['seconds']:8.2f} s  {row['peak_bytes'] / 2**20:8.1f} MiB{speedup}{memory}"
    )


if __name__ == "__main__":
    main()
