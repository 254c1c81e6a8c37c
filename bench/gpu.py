"""GPU measurements of issue 10, run by ``bench/gpu_check.sh`` on a lent CUDA GPU.

Run: ``python -m longctx.bench.gpu`` (needs CUDA; writes ``bench/results/gpu.json``, which
``bench/report.py`` turns into rows). Three measurements, each against what the GPU can do:

- **attention TFLOP/s**: causal attention forward+backward at T=32k (B=1, 32 heads, D=128, bf16,
  ``block_attention`` backend ``auto``: flash-attn when installed) against the bf16 GEMM rate
  measured on the same GPU (8192^3 matmuls). Causal attention FLOPs: forward 2 T^2 H D (half of
  the 4 T^2 H D of full attention), backward 2.5x forward: 7 T^2 H D in all (goal >= 60%).
- **longest sequence**: a Llama-3-8B-shaped decoder (hidden 4096, 32 layers, 32 heads, 8 kv
  heads, MLP 14336, vocab 128256; ``--layers`` to shrink it), bf16, DeepSpeed ZeRO-3 with
  parameters and optimizer state offloaded to CPU memory, activation checkpointing, the tiled
  MLP and the tiled loss: one training step at T = 128k, then x1.5 while steps succeed and the
  time budget lasts (goal >= 500k tokens). The optimizer is SGD (no state of its own) so that the
  CPU holds the fp32 master weights and gradients of 8B parameters (~64 GB) and no more.
- **tokens/s**: the same model's training step at T=32k.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta
from pathlib import Path

import torch

from longctx.attention.kernels import block_attention, resolve_backend
from longctx.bench.measure import write_report
from longctx.model import ModelConfig, Transformer
from longctx.parallel.accelerator import import_deepspeed
from longctx.parallel.apply import TransformPlan, apply_transforms
from longctx.trainer.engine import ModelWithLoss

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
)  # fmt: skip


def _seconds(fn, repeats: int) -> float:
    """Median CUDA seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def gemm_tflops(size: int = 8192, repeats: int = 10) -> float:
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * size**3 / _seconds(lambda: a @ b, repeats) / 1e12


def attention_tflops(seq_len: int, heads: int, head_dim: int, repeats: int = 3) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, heads, seq_len, head_dim)
    q, k, v, dout = (
        torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4)
    )
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step() -> None:
        out, _ = block_attention(q, k, v)
        out.backward(dout)

    seconds = _seconds(step, repeats)
    flops = 7 * seq_len**2 * heads * head_dim
    return {
        "seq_len": seq_len,
        "heads": heads,
        "head_dim": head_dim,
        "backend": resolve_backend("auto", q),
        "seconds": seconds,
        "tflops": flops / seconds / 1e12,
    }


def _engine(layers: int, max_tokens: int, tiled_chunk: int):
    deepspeed = import_deepspeed()
    config = ModelConfig(
        **{**LLAMA3_8B, "num_hidden_layers": layers, "max_position_embeddings": max_tokens}
    )
    with deepspeed.zero.Init(remote_device="cpu", pin_memory=True, dtype=torch.bfloat16):
        model = Transformer(config)
    apply_transforms(
        model, TransformPlan(tiled_mlp_chunk=tiled_chunk, activation_checkpointing=True)
    )
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu", "pin_memory": True},
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
        },
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    module = ModelWithLoss(model, zero_stage=3)  # tiled loss; lm_head weight gathered for it
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-5)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine, config


def _train_step(engine, config: ModelConfig, seq_len: int) -> float:
    """Wall seconds of one training step at ``seq_len`` tokens."""
    ids = torch.randint(0, config.vocab_size, (1, seq_len + 1), device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    loss = engine(ids[:, :-1], ids[:, 1:])  # tiled cross-entropy, no [T, V] logits
    engine.backward(loss)
    engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def longest_and_throughput(layers: int, start: int, budget_s: float, tiled_chunk: int) -> dict:
    """Tokens/s at 32k, then steps from ``start`` tokens growing x1.5 until one fails (out of
    memory) or the time budget would be exceeded."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    torch.distributed.init_process_group(
        "nccl", rank=0, world_size=1, timeout=timedelta(minutes=30)
    )
    engine, config = _engine(layers, 4 * 1024 * 1024, tiled_chunk)
    throughput = 32768 / _train_step(engine, config, 32768)
    deadline = time.perf_counter() + budget_s
    completed, seq_len, limit, last_seconds = 0, start, "", 0.0
    while True:
        try:
            last_seconds = _train_step(engine, config, seq_len)
        except torch.cuda.OutOfMemoryError:
            limit = f"out of GPU memory at {seq_len:,} tokens"
            break
        completed = seq_len
        print(f"T={seq_len}: step in {last_seconds:.0f} s", flush=True)
        seq_len = int(seq_len * 1.5)
        # steps grow ~T^2: stop before one would pass the budget
        if time.perf_counter() + last_seconds * 2.25 > deadline:
            limit = f"time budget ({budget_s:.0f} s) reached; next T {seq_len:,} not tried"
            break
    peak = torch.cuda.max_memory_allocated()
    return {
        "tokens_per_second": throughput,
        "longest": {
            "layers": layers,
            "max_tokens": completed,
            "seconds_at_max": last_seconds,
            "peak_gpu_bytes": peak,
            "limit": limit,
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=32768, help="attention TFLOP/s length")
    parser.add_argument("--layers", type=int, default=32, help="layers of the 8B-shaped model")
    parser.add_argument("--start", type=int, default=131072, help="first length of the sweep")
    parser.add_argument("--budget-s", type=float, default=300.0, help="time for the sweep")
    parser.add_argument("--tiled-mlp-chunk", type=int, default=8192)
    parser.add_argument("--skip-model", action="store_true", help="attention and GEMM only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = {
        "device": torch.cuda.get_device_name(),
        "gemm_tflops": gemm_tflops(),
        "attention": attention_tflops(args.seq_len, 32, 128),
    }
    print(
        f"attention {report['attention']['tflops']:.0f} TFLOP/s "
        f"({report['attention']['backend']}) vs bf16 GEMM {report['gemm_tflops']:.0f}",
        flush=True,
    )
    write_report(args.out, report)  # kept even if the model part fails
    if not args.skip_model:
        report |= longest_and_throughput(
            args.layers, args.start, args.budget_s, args.tiled_mlp_chunk
        )
        write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
