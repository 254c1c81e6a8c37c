"""GPU checks (issues 10 and 21), run by ``bench/gpu_check.sh`` on a lent CUDA GPU.

Run: ``python -m longctx.bench.gpu`` (writes ``bench/results/gpu.json``, which
``bench/report.py`` turns into rows); ``--dry-run`` (automatic without CUDA) runs every check's
code on a tiny CPU problem in float32, so CI proves the script imports and runs, or skips a check
with its reason (flash-attn, transformers' flash-attn 2). Each check runs on its own: a failure is
recorded (``status`` "failed" and the error) and the next check runs; the JSON is rewritten after
each check, so a run cut short keeps what finished. Checks (about 5 min on one H100/H200):

- ``parity``: ``block_attention`` (backend ``auto``: flash-attn on a GPU with it installed)
  against the float64 reference on the same bf16-rounded inputs, causal, T=4096, GQA; outputs
  and q, k, v gradients. Tolerance (bf16 has 8 mantissa bits): max |error| <= 2e-2 on outputs,
  5e-2 on gradients, relative to the reference's max |value| (float32 on the dry run: 1e-4).
- ``packed``: packed documents (doc ids, the path a data loader's packed batches take) through
  ``block_attention`` against the reference, with the same tolerances; with flash-attn also
  ``flash_attn_varlen_func`` on the concatenated documents (cu_seqlens) as a second reference
  and a time comparison of the two paths.
- ``attention``: causal ``block_attention`` forward+backward TFLOP/s at T = 8k..64k (B=1, 32
  heads, D=128, bf16) against the measured bf16 GEMM rate (8192^3 matmuls). Causal FLOPs:
  forward 2 T^2 H D, backward 2.5x forward: 7 T^2 H D in all.
- ``model``: a ~1B Llama (Llama-3.2-1B shape: hidden 2048, 16 layers, 32 heads, 8 kv heads,
  MLP 8192, vocab 128256), bf16, activation checkpointing, tiled loss: one forward+backward
  step at T = 16k, 32k, 64k; tokens/s and MFU = model FLOPs (6 N per token for the N
  parameters outside the embedding, plus causal attention 6 L T H D) / step time / the measured
  bf16 GEMM rate.
- ``peer``: the same step in transformers' LlamaForCausalLM with ``flash_attention_2`` and
  gradient checkpointing (skipped without flash-attn); the ratio longctx / transformers.
- ``longest`` (opt-in, ``--checks ... longest``; minutes of ZeRO-3 setup): a Llama-3-8B-shaped
  decoder with ZeRO-3 parameter and optimizer offload, from 128k tokens x1.5 while steps fit.
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch

from longctx.attention.kernels import block_attention, resolve_backend
from longctx.attention.mask import MaskSpec
from longctx.attention.tile_kernels import flash_attn_installed
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
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
)  # fmt: skip
TINY_LLAMA = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500000.0,
)  # fmt: skip
# max |error| / max |reference| allowed: bf16 on the GPU, float32 on the dry run
TOLERANCE = {
    torch.bfloat16: {"out": 2e-2, "grad": 5e-2},
    torch.float32: {"out": 1e-4, "grad": 1e-4},
}
DEFAULT_CHECKS = ("parity", "packed", "attention", "model", "peer")


class Skip(Exception):  # noqa: N818 (a check's clean skip, not an error)
    """A check that cannot run here; the message says why."""


class Setup:
    """Device, dtype and sizes of a run: the real one on a GPU, a tiny float32 one on the CPU."""

    def __init__(self, dry: bool, args: argparse.Namespace):
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.dtype = torch.float32 if dry else torch.bfloat16
        self.parity_len = 64 if dry else 4096
        self.heads, self.head_dim = (4, 16) if dry else (32, 128)
        self.attention_lengths = [64, 128] if dry else args.lengths
        self.model_lengths = [64] if dry else args.model_lengths
        self.model_shape = TINY_LLAMA if dry else LLAMA_1B
        self.gemm_size = 128 if dry else 8192
        self.repeats = 1 if dry else 3
        self.gemm_tflops: float | None = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def seconds(self, fn: Callable[[], object], repeats: int | None = None) -> float:
        """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
        fn()
        times = []
        for _ in range(repeats or self.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def randn(self, *shape: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(self.device, self.dtype)

    def gemm(self) -> float:
        """The measured bf16 (dry: float32) GEMM rate in TFLOP/s, measured once."""
        if self.gemm_tflops is None:
            gen = torch.Generator().manual_seed(0)
            a, b = (self.randn(self.gemm_size, self.gemm_size, gen=gen) for _ in range(2))
            self.gemm_tflops = 2 * self.gemm_size**3 / self.seconds(lambda: a @ b, 10) / 1e12
        return self.gemm_tflops


def _relative_errors(fast: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    return [
        float((f.detach().double() - r).abs().max() / r.abs().max().clamp(min=1e-30))
        for f, r in zip(fast, ref)
    ]


def _against_reference(setup: Setup, mask: MaskSpec, length: int) -> dict:
    """``block_attention`` (auto backend) vs the float64 reference on the same rounded inputs:
    relative max errors of out, dq, dk, dv and whether they meet ``TOLERANCE``."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = setup.heads, setup.heads // 4, setup.head_dim
    q = setup.randn(1, heads, length, dim, gen=gen)
    k, v = (setup.randn(1, kv_heads, length, dim, gen=gen) for _ in range(2))
    dout = setup.randn(1, heads, length, dim, gen=gen)
    fast_inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = block_attention(*fast_inputs, mask=mask)
    out.backward(dout)
    ref_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, _ = block_attention(*ref_inputs, mask=mask, backend="reference")
    ref_out.backward(dout.double())
    errors = _relative_errors(
        [out] + [x.grad for x in fast_inputs], [ref_out.detach()] + [x.grad for x in ref_inputs]
    )
    limits = TOLERANCE[setup.dtype]
    ok = errors[0] <= limits["out"] and max(errors[1:]) <= limits["grad"]
    return {
        "backend": resolve_backend("auto", q),
        "dtype": str(setup.dtype),
        "seq_len": length,
        "relative_max_error": dict(zip(("out", "dq", "dk", "dv"), errors)),
        "tolerance": limits,
        "status": "ok" if ok else "failed",
    }


def check_parity(setup: Setup) -> dict:
    return _against_reference(setup, MaskSpec(), setup.parity_len)


def _document_ids(length: int, device: torch.device) -> torch.Tensor:
    """[1, T] three documents of unequal lengths (a quarter, a half, the rest)."""
    bounds = [length // 4, length // 4 + length // 2, length]
    sizes = [bounds[0], bounds[1] - bounds[0], bounds[2] - bounds[1]]
    return torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))[None].to(device)


def check_packed(setup: Setup) -> dict:
    length = setup.parity_len
    docs = _document_ids(length, setup.device)
    result = _against_reference(setup, MaskSpec(q_doc_ids=docs, k_doc_ids=docs), length)
    if setup.dry or not flash_attn_installed():
        result["varlen"] = "skipped: needs CUDA and flash-attn (longctx[cuda])"
        return result
    from flash_attn import flash_attn_varlen_func

    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim = setup.heads, setup.heads // 4, setup.head_dim
    q = setup.randn(1, heads, length, dim, gen=gen)
    k, v = (setup.randn(1, kv_heads, length, dim, gen=gen) for _ in range(2))
    counts = torch.bincount(docs[0]).to(torch.int32)
    cu_seqlens = torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(counts.max())

    def varlen() -> torch.Tensor:  # [T, H, D] time-major, documents concatenated
        packed = [x[0].transpose(0, 1).contiguous() for x in (q, k, v)]
        return flash_attn_varlen_func(
            *packed, cu_seqlens, cu_seqlens, longest, longest, causal=True
        ).transpose(0, 1)[None]

    mask = MaskSpec(q_doc_ids=docs, k_doc_ids=docs)
    ours, _ = block_attention(q, k, v, mask=mask)
    theirs = varlen()
    result["varlen"] = {
        "relative_max_error_vs_flash_attn_varlen": _relative_errors([ours], [theirs.double()])[0],
        "longctx_seconds": setup.seconds(lambda: block_attention(q, k, v, mask=mask)),
        "flash_attn_varlen_seconds": setup.seconds(varlen),
    }
    return result


def check_attention(setup: Setup) -> dict:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length in setup.attention_lengths:
        shape = (1, setup.heads, length, setup.head_dim)
        q, k, v, dout = (setup.randn(*shape, gen=gen) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))

        def step(q=q, k=k, v=v, dout=dout) -> None:
            out, _ = block_attention(q, k, v)
            out.backward(dout)

        seconds = setup.seconds(step)
        tflops = 7 * length**2 * setup.heads * setup.head_dim / seconds / 1e12
        rows.append({"seq_len": length, "seconds": seconds, "tflops": tflops})
        print(f"attention T={length}: {tflops:.1f} TFLOP/s", flush=True)
    backend = resolve_backend("auto", torch.empty(0, device=setup.device, dtype=setup.dtype))
    return {"backend": backend, "gemm_tflops": setup.gemm(), "lengths": rows}


def _model_flops_per_token(config: ModelConfig, length: int) -> float:
    """6 N (N: parameters outside the embedding, lm_head included) + causal attention's
    6 L T H D (half of full attention's 12 L T H D)."""
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    per_layer = (
        config.hidden_size * (q_width + 2 * kv_width)
        + q_width * config.hidden_size
        + 3 * config.hidden_size * config.intermediate_size
    )
    params = config.num_hidden_layers * per_layer + config.hidden_size * config.vocab_size
    return 6 * params + 6 * config.num_hidden_layers * length * q_width


def _step_row(setup: Setup, config: ModelConfig, length: int, step: Callable[[], None]) -> dict:
    """Tokens/s and MFU of ``step``; a length that fails (out of memory) is recorded with its
    error, and the next length still runs."""
    try:
        seconds = setup.seconds(step, 1)
    except Exception as error:
        print(f"  T={length}: {type(error).__name__}: {error}", flush=True)
        return {"seq_len": length, "error": f"{type(error).__name__}: {error}"[:300]}
    flops = _model_flops_per_token(config, length) * length
    row = {"seq_len": length, "seconds": seconds, "tokens_per_second": length / seconds}
    row["mfu"] = flops / seconds / 1e12 / setup.gemm()
    print(f"  T={length}: {row['tokens_per_second']:.0f} tokens/s, MFU {row['mfu']:.2f}")
    return row


def _token_batch(setup: Setup, vocab: int, length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, length + 1), generator=gen).to(setup.device)


def check_model(setup: Setup) -> dict:
    config = ModelConfig(**setup.model_shape, max_position_embeddings=max(setup.model_lengths))
    with torch.device(setup.device):
        model = Transformer(config).to(setup.dtype)
    apply_transforms(model, TransformPlan(activation_checkpointing=True))
    module = ModelWithLoss(model, zero_stage=0)  # tiled loss: no [T, V] logits
    rows = []
    for length in setup.model_lengths:
        ids = _token_batch(setup, config.vocab_size, length)

        def step(ids=ids) -> None:
            module(ids[:, :-1], ids[:, 1:]).backward()
            model.zero_grad(set_to_none=True)

        rows.append(_step_row(setup, config, length, step))
    return {"config": setup.model_shape, "dtype": str(setup.dtype), "lengths": rows}


def check_peer(setup: Setup, ours: dict | None) -> dict:
    """transformers' Llama with flash-attention 2 (sdpa on the dry run), same step."""
    attention = "sdpa" if setup.dry else "flash_attention_2"
    if not setup.dry and not flash_attn_installed():
        raise Skip("transformers' flash_attention_2 needs flash-attn (longctx[cuda])")
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = setup.model_shape
    hf_config = LlamaConfig(
        **shape, max_position_embeddings=max(setup.model_lengths), tie_word_embeddings=False,
        attn_implementation=attention, use_cache=False,
    )  # fmt: skip
    with torch.device(setup.device):
        model = LlamaForCausalLM(hf_config).to(setup.dtype)
    model.gradient_checkpointing_enable()  # the peer's activation checkpointing
    model.train()
    config = ModelConfig(**shape)
    rows = []
    for length in setup.model_lengths:
        ids = _token_batch(setup, config.vocab_size, length)

        def step(ids=ids) -> None:
            model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()
            model.zero_grad(set_to_none=True)

        row = _step_row(setup, config, length, step)
        mine = next((r for r in (ours or {}).get("lengths", []) if r["seq_len"] == length), None)
        if mine is not None and "seconds" in mine and "seconds" in row:
            row["longctx_time_ratio"] = mine["seconds"] / row["seconds"]
        rows.append(row)
    return {"attn_implementation": attention, "lengths": rows}


def check_longest(setup: Setup, args: argparse.Namespace) -> dict:
    """Longest Llama-3-8B-shaped training sequence with ZeRO-3 parameter/optimizer offload."""
    if setup.dry:
        raise Skip("the ZeRO-3 offload sweep needs CUDA and NCCL")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    torch.distributed.init_process_group(
        "nccl", rank=0, world_size=1, timeout=timedelta(minutes=30)
    )
    deepspeed = import_deepspeed()
    layers = args.layers
    config = ModelConfig(
        **{**LLAMA3_8B, "num_hidden_layers": layers, "max_position_embeddings": 4 * 2**20}
    )
    with deepspeed.zero.Init(remote_device="cpu", pin_memory=True, dtype=torch.bfloat16):
        model = Transformer(config)
    plan = TransformPlan(tiled_mlp_chunk=args.tiled_mlp_chunk, activation_checkpointing=True)
    apply_transforms(model, plan)
    offload = {"device": "cpu", "pin_memory": True}
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "offload_param": offload, "offload_optimizer": offload},
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    module = ModelWithLoss(model, zero_stage=3)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-5)  # no state: CPU holds 8B fp32 x2
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)

    def step(length: int) -> float:
        ids = _token_batch(setup, config.vocab_size, length)
        setup.sync()
        start = time.perf_counter()
        engine.backward(engine(ids[:, :-1], ids[:, 1:]))
        engine.step()
        setup.sync()
        return time.perf_counter() - start

    deadline = time.perf_counter() + args.budget_s
    completed, length, limit, last = 0, args.start, "", 0.0
    while True:
        try:
            last = step(length)
        except torch.cuda.OutOfMemoryError:
            limit = f"out of GPU memory at {length:,} tokens"
            break
        completed, length = length, int(length * 1.5)
        print(f"  T={completed}: step in {last:.0f} s", flush=True)
        if time.perf_counter() + last * 2.25 > deadline:  # steps grow ~T^2
            limit = f"time budget ({args.budget_s:.0f} s) reached; next T {length:,} not tried"
            break
    return {
        "layers": layers,
        "max_tokens": completed,
        "seconds_at_max": last,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        "limit": limit,
    }


def _run_check(name: str, setup: Setup, args: argparse.Namespace, checks: dict) -> dict:
    runners = {
        "parity": lambda: check_parity(setup),
        "packed": lambda: check_packed(setup),
        "attention": lambda: check_attention(setup),
        "model": lambda: check_model(setup),
        "peer": lambda: check_peer(setup, checks.get("model")),
        "longest": lambda: check_longest(setup, args),
    }
    start = time.perf_counter()
    print(f"gpu check {name} ...", flush=True)
    try:
        result = {"status": "ok"} | runners[name]()
    except Skip as reason:
        result = {"status": "skipped", "reason": str(reason)}
    except Exception as error:  # recorded; the other checks still run
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - start
    print(f"gpu check {name}: {result['status']} ({result['wall_s']:.1f} s)", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU problems (no CUDA)")
    parser.add_argument("--checks", nargs="+", default=list(DEFAULT_CHECKS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--model-lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--layers", type=int, default=32, help="layers of the 8B (longest)")
    parser.add_argument("--start", type=int, default=131072, help="first T of longest")
    parser.add_argument("--budget-s", type=float, default=300.0, help="time for longest")
    parser.add_argument("--tiled-mlp-chunk", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.checks) - {*DEFAULT_CHECKS, "longest"})
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {[*DEFAULT_CHECKS, 'longest']}")
    dry = args.dry_run or not torch.cuda.is_available()
    if dry and not args.dry_run:
        print("gpu: no CUDA device; dry run on tiny CPU problems", flush=True)
    setup = Setup(dry, args)
    device = "cpu (dry run)" if dry else torch.cuda.get_device_name()
    report = {"device": device, "dry_run": dry, "checks": {}}
    for name in args.checks:
        report["checks"][name] = _run_check(name, setup, args, report["checks"])
        if setup.gemm_tflops is not None:
            report["gemm_tflops"] = setup.gemm_tflops
        write_report(args.out, report)
    failed = [n for n, c in report["checks"].items() if c["status"] == "failed"]
    print(f"gpu: {len(args.checks) - len(failed)} of {len(args.checks)} checks passed or skipped")
    return report


def exit_code(report: dict) -> int:
    """1 when a check failed, else 0."""
    return int(any(c["status"] == "failed" for c in report["checks"].values()))


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
