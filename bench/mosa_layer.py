"""The whole MoSA attention layer against a dense one: fwd+bwd time, peak memory, FLOPs per token.

Run: ``python -m longctx.bench.mosa_layer`` (``--lengths 8192 16384 32768``). Prints a table and
writes ``bench/results/mosa_layer.json``.

The layer is the model's ``SelfAttention`` (q/k/v projections, RoPE, the attention core, o_proj):
B=1, d=512, 8 heads of D=64 with 8 kv heads (multi-head, the paper's setting), fp32, CPU, one
thread, the cpu_flash kernel. Cases, each in a fresh subprocess per length:

- ``dense``: ``attention.variant: dense``, every head projects and attends over every token;
- ``mosa``: 4 dense heads and 4 routed heads at rho = 8 (k = T/8 tokens per routed head); a
  routed head projects q, k, v and its share of o_proj only at its chosen tokens
  (``MoSAAttention.forward_layer``).

Time: process CPU time of one forward+backward (loss: the output dotted with a fixed random
tensor) after a warm-up at 256 tokens. Memory: the resident high-water mark of that run minus
the resident size before it (``bench/measure.py``). Ratios are dense / mosa time and mosa /
dense memory at the same length.

FLOPs per token, ``layer_flops`` (a multiply-add counts 2 FLOPs; forward only; matmuls only:
softmax, RoPE, norms and the top-k are left out, as in the paper's count). With T tokens, d the
model width, D the head width, g = Hq / Hkv query heads per kv head and k = max(2, T // rho):

    dense head:   2 T d D (1 + 2/g + 1)        q, k, v (a kv head's share), o projections
                  + 4 T^2 D                    q k^T and p v over the full T x T square
    routed head:  2 T d                        router score x W_r
                  + 8 k d D                    q, k, v, o projections of its k chosen tokens
                  + 4 k^2 D                    attention among them

For g = 1 these are the MoSA paper's per-head costs (dense 8 T d D + 4 T^2 D; MoSA
8 k d D + 4 k^2 D + 2 T d). A routed head projects its own k, v at its tokens even under GQA.
Assumption: attention counted over the full square, as the paper counts it (a causal kernel
skips about half of it). The JSON keeps the projection and attention terms apart and adds what
``torch.utils.flop_counter`` counts in one forward of the layer as run here: the counter has no
formula for torch's fused CPU flash attention op, so on CPU it sees the projections and routers
only, which checks the projection term (with the float64 ``reference`` backend the count equals
both terms exactly, tests/test_mosa.py). The counted forward runs at min(T, 2048) tokens
(``counted_at_tokens``, with the formula's projection term at that length beside it): the
projection FLOPs per token do not depend on T (k = T / rho), and a counted forward at full
length would add a whole forward to every case (~1.5 minutes of the benchmark on an AVX2 core).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from longctx.attention import AttentionConfig, AttentionContext
from longctx.attention.config import MoSAConfig
from longctx.attention.mosa import routed_token_count
from longctx.bench.measure import peak_and_median_times, run_worker, write_report
from longctx.model.config import ModelConfig
from longctx.model.transformer import SelfAttention
from longctx.positional.config import PositionalConfig
from longctx.positional.rope import RotaryEmbedding

RESULTS = Path(__file__).resolve().parent / "results" / "mosa_layer.json"
CASES = ("dense", "mosa")
HIDDEN, HEADS, KV_HEADS, DIM = 512, 8, 8, 64
DENSE_HEADS, SPARSITY = 4, 8  # half the heads routed, k = T / 8
WARMUP = 256
FLOP_COUNT_TOKENS = 2048  # length of the counted forward (projection FLOPs per token are flat in T)


def layer_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM,
        max_position_embeddings=32768,
    )  # fmt: skip


def attention_config(case: str) -> AttentionConfig:
    if case == "dense":
        return AttentionConfig()
    return AttentionConfig(
        variant="mosa", mosa=MoSAConfig(dense_heads=DENSE_HEADS, sparsity=SPARSITY)
    )


def layer_flops(config: ModelConfig, attention: AttentionConfig, length: int) -> dict[str, int]:
    """Forward matmul FLOPs of one attention layer over ``length`` tokens (module docstring):
    ``projections`` (q, k, v, o and the routers) and ``attention`` (the T x T or k x k squares)."""
    d, dim = config.hidden_size, config.dim_per_head
    heads, group = config.num_attention_heads, config.num_attention_heads // config.kv_heads
    dense = attention.mosa.dense_heads if attention.variant == "mosa" else heads
    routed = heads - dense
    count = routed_token_count(length, attention.mosa.sparsity)
    projections = dense * 2 * length * d * dim * (2 + 2 / group)
    projections += routed * (2 * length * d + 8 * count * d * dim)
    attention_flops = 4 * dim * (dense * length**2 + routed * count**2)
    return {"projections": round(projections), "attention": attention_flops}


def _layer_and_inputs(case: str, length: int):
    """The seeded layer and its inputs at ``length`` tokens: (layer, x, rotary, ctx, dout)."""
    config, attention = layer_config(), attention_config(case)
    torch.manual_seed(0)
    layer = SelfAttention(config, attention, PositionalConfig(), layer_index=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, length, HIDDEN, generator=gen).requires_grad_()
    dout = torch.randn(1, length, HIDDEN, generator=gen)
    positions = torch.arange(length)
    rotary = RotaryEmbedding.from_config(config)(positions[None])
    ctx = AttentionContext(position_ids=positions[None], seq_positions=positions)
    return layer, x, rotary, ctx, dout


def run_case(case: str, length: int) -> dict:
    """One forward+backward of ``case`` at ``length`` tokens: CPU seconds, peak bytes, FLOPs."""
    torch.set_num_threads(1)
    layer, x, rotary, ctx, dout = _layer_and_inputs(case, WARMUP)
    layer(x, rotary, ctx).backward(dout)
    _, x, rotary, ctx, dout = _layer_and_inputs(case, length)
    layer.zero_grad()
    measured = peak_and_median_times(lambda: layer(x, rotary, ctx).backward(dout), repeats=0)
    counted_at = min(length, FLOP_COUNT_TOKENS)
    _, x, rotary, ctx, _ = _layer_and_inputs(case, counted_at)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        layer(x, rotary, ctx)
    formula = layer_flops(layer_config(), attention_config(case), length)
    counted_formula = layer_flops(layer_config(), attention_config(case), counted_at)
    return {
        "case": case,
        "length": length,
        "seconds": measured["time_s"],
        "peak_bytes": measured["peak_bytes"],
        "formula_projection_flops_per_token": formula["projections"] / length,
        "formula_attention_flops_per_token": formula["attention"] / length,
        "counted_at_tokens": counted_at,
        "counted_flops_per_token": counter.get_total_flops() / counted_at,
        "counted_formula_projection_flops_per_token": counted_formula["projections"] / counted_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file to write")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "LENGTH"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child[0], int(args.child[1]))))
        return
    rows = []
    print(
        f"{'T':>6}  {'case':>5}  {'CPU s':>8}  {'peak MiB':>8}  MFLOP/token: formula "
        "(projections + attention), counted by torch (projections)"
    )
    for length in args.lengths:
        for case in CASES:
            command = [sys.executable, "-m", "longctx.bench.mosa_layer", "--child", case,
                       str(length)]  # fmt: skip
            rows.append(run_worker(command, f"{case} T={length}"))
            print(_format(rows[-1], rows), flush=True)
    write_report(args.out, rows)


def _format(row: dict, rows: list[dict]) -> str:
    dense = next(r for r in rows if r["case"] == "dense" and r["length"] == row["length"])
    ratios = ""
    if row is not dense:
        ratios = (
            f"  dense/mosa time {dense['seconds'] / row['seconds']:.2f}x"
            f"  mem {row['peak_bytes'] / max(dense['peak_bytes'], 1):.2f}x"
        )
    return (
        f"{row['length']:>6}  {row['case']:>5}  {row['seconds']:8.2f}  "
        f"{row['peak_bytes'] / 2**20:8.1f}  {row['formula_projection_flops_per_token'] / 1e6:.2f}"
        f" + {row['formula_attention_flops_per_token'] / 1e6:.1f}, "
        f"{row['counted_flops_per_token'] / 1e6:.2f}{ratios}"
    )


if __name__ == "__main__":
    main()
