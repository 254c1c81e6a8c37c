"""Score-side position encodings (CoPE, BAM, TAPA): the model's kernel against naive, fwd+bwd.

Run: ``python -m longctx.bench.positional`` (``--quick`` for a smoke run). Prints a table and
writes ``bench/results/positional.json``.

Cases: causal attention, B=1, H=``--heads``, D=``--dim``, fp32 on CPU, forward + backward, per
encoding and length T:

- ``chunked`` (CoPE, TAPA): ``scored_attention`` (query chunks of ``--chunk`` tokens under
  activation checkpointing: memory O(chunk x T));
- ``tiled`` (BAM): the model's BAM core (``BAMAttention``, SSMax on): the flash-style tiled
  kernel of ``attention/biased.py`` with the prior added per tile (default tile, 512);
- ``naive``: the same score module on the whole sequence as one chunk with plain autograd, so
  every [B, H, T, T] intermediate (logits, gates, positions, probabilities) is kept for the
  backward, which is how a direct implementation of the SPECS equations behaves;
- ``none / cpu_flash``: the project's dense block kernel (``block_attention``, no position
  term) at the same shape, the floor BAM's tiled kernel is measured against (issue 21: BAM
  <= 2x dense at 16k). Always run when BAM is (``--baseline`` adds it otherwise).

Each case runs in a fresh subprocess on one thread, measured as in ``bench/attention.py``.
Memory: VmHWM of one run after a clear_refs reset, with glibc's mmap threshold fixed at 128 KiB
from the process's start, so the peak follows the live tensors; under glibc's adaptive
threshold it followed where freed temporaries were left (the chunked CoPE kernel at 16k read
1.0 GiB in one version and 3.1-4.1 GiB in the next, whose chunks are smaller). Time: median
process CPU time of ``--repeats`` more runs with the threshold at 32 MiB, where the adaptive one
settles. A naive case whose T^2-scaled estimate does not fit in ``--memory-fraction`` of the
available memory is estimated from the largest length measured (exact for naive: its big
buffers are all [B, H, T, T]) and marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.core import AttentionShape
from longctx.attention.kernels import block_attention
from longctx.attention.mask import MaskSpec
from longctx.attention.scored import BAMAttention, masked_softmax, scored_attention
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
from longctx.positional.bam import BAMScore
from longctx.positional.config import BAMConfig, CoPEConfig, PositionalConfig, TAPAConfig
from longctx.positional.cope import CoPEScore
from longctx.positional.tapa import TAPAScore

RESULTS = Path(__file__).resolve().parent / "results" / "positional.json"
ENCODINGS = ("cope", "bam", "tapa")
KERNEL = {"cope": "chunked", "bam": "tiled", "tapa": "chunked"}  # the model's path per encoding
BASELINE = ("none", "cpu_flash")  # (encoding, method): dense block kernel, no position term


def make_score(encoding: str, heads: int, dim: int, method: str) -> torch.nn.Module | None:
    """The score module of one layer with trainable parameters (CoPE table random, not 0);
    for ``tiled`` the whole BAM core (its ``score`` is this module); None for ``none``."""
    if encoding == BASELINE[0]:
        return None
    if method == "tiled":
        shape = AttentionShape(
            num_heads=heads, num_kv_heads=heads, head_dim=dim, hidden_size=heads * dim,
            vocab_size=32, max_position_embeddings=4096,
        )  # fmt: skip
        positional = PositionalConfig(kind="bam", bam=BAMConfig(ssmax=True))
        return BAMAttention(shape, AttentionConfig(), positional)
    if encoding == "cope":
        score = CoPEScore(CoPEConfig(), num_heads=heads, head_dim=dim)
        torch.nn.init.normal_(score.pos_emb, std=0.1)
        return score
    if encoding == "bam":
        return BAMScore(
            BAMConfig(ssmax=True), num_heads=heads, head_dim=dim, max_position_embeddings=4096
        )
    return TAPAScore(TAPAConfig(), head_dim=dim)


def naive_scored_attention(score, q, k, v) -> torch.Tensor:
    """The whole [B, H, T, T] row block at once, plain autograd: the baseline."""
    length = q.shape[2]
    positions = torch.arange(length)
    visible = (positions[None, :] <= positions[:, None])[None]  # [1, T, T]
    logits = score.scores(q, k, positions, positions, visible)  # [B, H, T, T]
    return masked_softmax(logits, visible[:, None]) @ v


def _step(method, score, q, k, v, dout, chunk) -> None:
    if method == "naive":
        out = naive_scored_attention(score, q, k, v)
    elif method == "tiled":
        positions = torch.arange(q.shape[2])
        out = score(q, k, v, AttentionContext(positions[None], positions))
    elif method == BASELINE[1]:
        out, _ = block_attention(q, k, v, backend=BASELINE[1])
    else:
        out = scored_attention(q, k, v, score, mask=MaskSpec(), chunk_size=chunk)
    out.backward(dout)


def run_case(encoding, method, length, heads, dim, chunk, repeats) -> dict:
    """Measure one case in this process (a fresh subprocess started by ``measure``)."""
    torch.set_num_threads(1)
    fix_mmap_threshold(MEMORY_RUN_THRESHOLD)  # before the inputs: see the module docstring
    gen = torch.Generator().manual_seed(0)
    score = make_score(encoding, heads, dim, method)
    warm_up = attention_inputs(gen, heads, 64, dim)
    _step(method, score, *warm_up, chunk=32)
    q, k, v, dout = attention_inputs(gen, heads, length, dim)

    def step() -> None:
        q.grad = k.grad = v.grad = None
        _step(method, score, q, k, v, dout, chunk)

    release_free_heap()
    return peak_and_median_times(step, repeats, timed_threshold=TIMED_RUN_THRESHOLD)


def measure(encoding: str, method: str, length: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "longctx.bench.positional", "--worker", encoding, method,
        "--lengths", str(length), "--heads", str(args.heads), "--dim", str(args.dim),
        "--chunk", str(args.chunk), "--repeats", str(args.repeats),
    ]  # fmt: skip
    result = run_worker(command, f"{encoding} {method} T={length}")
    print(
        f"{encoding:>5} {method:>8} T={length:>6} {result['time_s']:8.2f} s cpu "
        f"{result['peak_bytes'] / GiB:8.3f} GiB",
        flush=True,
    )
    return result


def _rows_of(encoding: str, method: str, args: argparse.Namespace) -> dict[int, dict]:
    """Per length: measured, or for naive the T^2-scaled estimate when its peak would not fit."""

    def measure_length(length: int) -> dict:
        return measure(encoding, method, length, args)

    return measured_or_extrapolated(
        args.lengths,
        measure_length,
        args.memory_fraction,
        f"{encoding} {method}",
        extrapolate=method == "naive",
    )


def sweep(args: argparse.Namespace) -> list[dict]:
    rows = []
    baseline = args.baseline or "bam" in args.encodings
    if baseline:
        encoding, method = BASELINE
        dense = _rows_of(encoding, method, args)
        rows += [{"encoding": encoding, "method": method, "length": n, **dense[n]} for n in dense]
    for encoding in args.encodings:
        method = KERNEL[encoding]
        naive = _rows_of(encoding, "naive", args)
        kernel = _rows_of(encoding, method, args)
        for length in sorted(args.lengths):
            rows.append(
                {"encoding": encoding, "method": "naive", "length": length, **naive[length]}
            )
            rows.append({
                "encoding": encoding, "method": method, "length": length, **kernel[length],
                "memory_ratio_vs_naive": kernel[length]["peak_bytes"] / naive[length]["peak_bytes"],
                "time_ratio_vs_naive": kernel[length]["time_s"] / naive[length]["time_s"],
                "naive_measured": naive[length]["measured"],
            })  # fmt: skip
            if baseline:
                rows[-1]["time_ratio_vs_cpu_flash"] = (
                    kernel[length]["time_s"] / dense[length]["time_s"]
                )
                rows[-1]["memory_ratio_vs_cpu_flash"] = (
                    kernel[length]["peak_bytes"] / dense[length]["peak_bytes"]
                )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'enc':>5} {'method':>8} {'T':>6} {'cpu s':>12} {'peak GiB':>14} {'mem ratio':>16}")
    for row in rows:
        mark = "" if row["measured"] else " (est.)"
        ratio = ""
        if "memory_ratio_vs_naive" in row:
            ratio = f"{row['memory_ratio_vs_naive']:.4f}"
            ratio += "" if row["naive_measured"] else " vs est."
        print(
            f"{row['encoding']:>5} {row['method']:>8} {row['length']:>6} "
            f"{row['time_s']:>5.2f}{mark:<7} {row['peak_bytes'] / GiB:>7.3f}{mark:<7} {ratio:>16}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=ENCODINGS)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256, help="queries per chunk")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs after the memory run (0: time it)"
    )
    parser.add_argument("--memory-fraction", type=float, default=0.4)
    parser.add_argument("--quick", action="store_true", help="T = 512, 1024")
    parser.add_argument(
        "--baseline", action="store_true", help="also the dense cpu_flash kernel, no encoding"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, metavar=("ENCODING", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        encoding, method = args.worker
        result = run_case(
            encoding, method, args.lengths[0], args.heads, args.dim, args.chunk, args.repeats
        )
        print(json.dumps(result))
        return [result]
    if args.quick:
        args.lengths = [512, 1024]
    rows = sweep(args)
    print_table(rows)
    report = {
        "config": {
            "batch": 1, "heads": args.heads, "head_dim": args.dim, "dtype": "float32",
            "causal": True, "threads": 1, "chunk": args.chunk, "repeats": args.repeats,
            "mode": "fwd+bwd", "bam_ssmax": True, "kernels": KERNEL,
        },
        "memory_method": MEMORY_METHOD,
        "time_method": TIME_METHOD,
        "results": rows,
    }  # fmt: skip
    write_report(args.out, report)
    return rows


if __name__ == "__main__":
    main()
