"""The CUDA path: the flash-attn backend (forward and backward, with lse), bf16 kernels and a
bf16 training step on a GPU, ring attention over NCCL; and the CPU path's independence from
flash-attn.

Every GPU test is skipped cleanly without CUDA (and without flash-attn, or with one GPU, where
it needs them); ``bench/gpu_check.sh`` installs the ``cuda`` extra and runs this file on a GPU.
References: float64 attention on the CPU (``backend="reference"``) on the same bf16-rounded
inputs, and for the NCCL ring the dense attention of the full sequence; tolerances are bf16's
(8 mantissa bits: rtol/atol 2e-2 on values, 5e-2 on gradients). The CPU-path test runs
everywhere: it puts a stand-in ``flash_attn`` package on the path, imports every longctx
module, runs a training step, and checks that nothing imported the stand-in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import free_port

from longctx.attention.kernels import block_attention
from longctx.attention.mask import MaskSpec
from longctx.attention.tile_kernels import flash_attn_installed

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_flash = pytest.mark.skipif(
    not (CUDA and flash_attn_installed()), reason="needs CUDA and flash-attn (longctx[cuda])"
)
needs_two_gpus = pytest.mark.skipif(
    not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for NCCL"
)
VALUE_TOL = dict(rtol=2e-2, atol=2e-2)
GRAD_TOL = dict(rtol=5e-2, atol=5e-2)
HEADS, KV_HEADS, LENGTH, DIM = 4, 2, 512, 64


def _inputs(seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """q [1, 4, T, 64], k, v [1, 2, T, 64] and dout [1, 4, T, 64], rounded to ``dtype``, kept
    in float64 on the CPU (the reference's copy)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, HEADS, LENGTH, DIM), *[(1, KV_HEADS, LENGTH, DIM)] * 2, (1, HEADS, LENGTH, DIM)]
    return [torch.randn(shape, generator=gen).to(dtype).double() for shape in shapes]


def _masks() -> dict[str, MaskSpec]:
    docs = torch.tensor([[0] * 200 + [1] * 312])
    return {
        "causal": MaskSpec(causal=True),
        "documents": MaskSpec(causal=True, q_doc_ids=docs, k_doc_ids=docs),
        "window": MaskSpec(causal=True, window=100),
    }


def _attention_and_grads(backend, device, dtype, mask, inputs, dlse=None):
    """out, lse and dq, dk, dv of ``block_attention`` on copies of ``inputs`` (CPU float64)."""
    q, k, v, dout = (x.to(device, dtype) for x in inputs)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = block_attention(q, k, v, mask=mask, backend=backend)
    loss = (out.float() * dout.float()).sum()
    if dlse is not None:
        loss = loss + (lse.float() * dlse.to(device).float()).sum()
    loss.backward()
    return [t.detach().double().cpu() for t in (out, lse, q.grad, k.grad, v.grad)]


def _check(got, want):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        tol = VALUE_TOL if name in ("out", "lse") else GRAD_TOL
        torch.testing.assert_close(a, b, **tol, msg=name)


@needs_flash
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask_name", list(_masks()))
def test_flash_backend_matches_float64_reference(dtype, mask_name):
    mask = _masks()[mask_name]
    inputs = _inputs(0, dtype)
    got = _attention_and_grads("flash", "cuda", dtype, mask, inputs)
    want = _attention_and_grads("reference", "cpu", torch.float64, mask, inputs)
    _check(got, want)


@needs_flash
def test_flash_backend_gradient_through_lse():
    inputs = _inputs(1, torch.bfloat16)
    dlse = torch.randn(1, HEADS, LENGTH, generator=torch.Generator().manual_seed(2))
    mask = MaskSpec(causal=True)
    got = _attention_and_grads("flash", "cuda", torch.bfloat16, mask, inputs, dlse)
    want = _attention_and_grads("reference", "cpu", torch.float64, mask, inputs, dlse)
    _check(got, want)


@needs_cuda
@pytest.mark.parametrize("mask_name", list(_masks()))
def test_chunked_bf16_on_cuda_matches_float64_reference(mask_name):
    mask = _masks()[mask_name]
    inputs = _inputs(3, torch.bfloat16)
    got = _attention_and_grads("chunked", "cuda", torch.bfloat16, mask, inputs)
    want = _attention_and_grads("reference", "cpu", torch.float64, mask, inputs)
    _check(got, want)


@needs_cuda
def test_auto_backend_on_cuda_picks_flash_when_installed():
    from longctx.attention.kernels import resolve_backend

    q = torch.zeros(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", q) == ("flash" if flash_attn_installed() else "chunked")
    assert resolve_backend("auto", q.float()) == "chunked"


@needs_cuda
def test_bf16_training_step_on_cuda_matches_fp32_cpu_loss():
    from longctx.model import ModelConfig, Transformer
    from longctx.parallel.apply import TransformPlan, apply_transforms
    from longctx.parallel.loss import tiled_cross_entropy

    config = ModelConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(config)
    ids = torch.randint(0, 256, (2, 1025), generator=torch.Generator().manual_seed(4))
    losses = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        twin = Transformer(config).to(device, dtype)
        twin.load_state_dict(model.state_dict())
        apply_transforms(twin, TransformPlan(tiled_mlp_chunk=256))
        hidden = twin.forward_hidden(ids[:, :-1].to(device))
        loss = tiled_cross_entropy(hidden, twin.lm_head.weight, ids[:, 1:].to(device))
        loss.backward()
        grads = [p.grad for p in twin.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)


def _nccl_ring_rank(rank: int, world: int, port: int, inputs: list, queue) -> None:
    from longctx.parallel.layout import zigzag_positions
    from longctx.parallel.ring import ring_attention

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        positions = zigzag_positions(LENGTH, rank, world)
        q, k, v, dout = (x[:, :, positions].to("cuda", torch.bfloat16) for x in inputs)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out, lse = ring_attention(
            q, k, v, group=dist.group.WORLD, seq_positions=positions.cuda(), return_lse=True
        )
        out.backward(dout)
        # numpy arrays travel by value: this process may exit before the parent reads them
        result = [t.detach().double().cpu().numpy() for t in (out, lse, q.grad, k.grad, v.grad)]
        queue.put((rank, positions.numpy(), result))
    finally:
        dist.destroy_process_group()


@needs_two_gpus
def test_ring_attention_over_nccl_matches_dense_reference():
    inputs = _inputs(5, torch.bfloat16)
    want = _attention_and_grads("reference", "cpu", torch.float64, MaskSpec(causal=True), inputs)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_nccl_ring_rank, args=(rank, 2, port, inputs, queue))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    shards = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    for _, positions, got in shards:
        index = torch.from_numpy(positions)
        _check([torch.from_numpy(x) for x in got], [x[:, :, index] for x in want])


# ------------------------------------------------------------------------------ CPU path
CPU_STEP = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    import torch
    import longctx
    from longctx.model import ModelConfig, Transformer
    from longctx.parallel.loss import tiled_cross_entropy

    imported = []
    for module in pkgutil.walk_packages(longctx.__path__, "longctx."):
        if module.name.endswith(".__main__"):  # runs the command line when imported
            continue
        importlib.import_module(module.name)
        imported.append(module.name)
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    model = Transformer(config)
    ids = torch.randint(0, 64, (1, 33))
    hidden = model.forward_hidden(ids[:, :-1])
    tiled_cross_entropy(hidden, model.lm_head.weight, ids[:, 1:]).backward()
    print(json.dumps({"flash_attn_imported": "flash_attn" in sys.modules,
                      "imported": imported}))
    """
)


def test_cpu_path_never_imports_flash_attn(tmp_path: Path):
    stand_in = tmp_path / "flash_attn"
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text('"""Stand-in: importing it is the failure."""\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    env.update(DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0", CUDA_VISIBLE_DEVICES="")
    # the stand-in is importable: any import of flash_attn would succeed and be seen
    check = subprocess.run(
        [sys.executable, "-c", "import flash_attn; print(flash_attn.__file__)"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert str(stand_in) in check.stdout
    done = subprocess.run(
        [sys.executable, "-c", CPU_STEP], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {
        "longctx.attention.tile_kernels",
        "longctx.launch.cli",
        "longctx.trainer.engine",
    } <= set(result["imported"])
    assert result["flash_attn_imported"] is False
