"""``block_attention``: the one exact attention primitive (DESIGN.md 4), and its block backward.

Every exact attention path (single device, blockwise, ring, Ulysses) calls
``block_attention(q, k, v, scale=, mask=, backend=) -> (out, lse)``; ring attention also calls
``block_attention_backward`` for each K,V block it visits, with the FINAL merged out and lse.

Backends (``backend=``):

- ``reference``: float64 with a materialised mask, plain autograd. Tests only.
- ``chunked``: plain torch over (query tile, key tile) pairs of ``chunk_size`` tokens, online
  softmax by ``merge_partials``, EMPTY tiles skipped; the backward recomputes tile scores.
  Memory O(T * chunk), never T x T. Any device, any mask, and bf16 with float32 accumulation.
- ``cpu_flash``: torch's fused CPU flash op; one call when the mask is plain causal (or none),
  else tiled over ``chunk_size`` tiles with small additive masks on PARTIAL tiles only.
- ``flex``: FlexAttention with the mask as a ``mask_mod``; forward-only on CPU.
- ``flash``: flash-attn on CUDA (fp16/bf16); PARTIAL tiles it cannot mask run in plain torch.
- ``auto``: flash on CUDA when installed and the dtype allows, else chunked on CUDA;
  cpu_flash on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longctx.attention.flex import flex_block_attention
from longctx.attention.mask import MaskSpec
from longctx.attention.reference import reference_attention, reference_attention_backward
from longctx.attention.tile_kernels import (
    CpuFlashTileKernel,
    FlashTileKernel,
    TorchTileKernel,
    flash_attn_installed,
    flash_attn_supports,
)
from longctx.attention.tiling import TileKernel, tiled_backward, tiled_forward
from longctx.errors import LongctxError

BACKENDS = ("auto", "cpu_flash", "flex", "flash", "chunked", "reference")

# Tile sizes (tokens) when the caller gives no chunk_size: the fastest fwd+bwd tiles measured on
# a 2-core CPU (bench/results/design_measurements.md); the fused CPU op is tiled only for masks
# it cannot express. flash's tiles only bound the plain-torch PARTIAL pieces.
DEFAULT_CHUNK = {"chunked": 256, "cpu_flash": 512, "flash": 1024}
CAUSAL = MaskSpec()  # the default mask: causal on positions arange(Tq), arange(Tk)

TILE_KERNELS: dict[str, TileKernel] = {
    "chunked": TorchTileKernel(),
    "cpu_flash": CpuFlashTileKernel(),
    "flash": FlashTileKernel(),
}


def resolve_backend(backend: str, q: Tensor) -> str:
    """The concrete backend for ``backend`` on tensors like ``q``; errors name the fix."""
    if backend not in BACKENDS:
        raise LongctxError(
            f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    if backend == "auto":
        if not q.is_cuda:
            return "cpu_flash"
        return "flash" if flash_attn_installed() and flash_attn_supports(q) else "chunked"
    if backend == "cpu_flash" and q.device.type != "cpu":
        raise LongctxError(
            f"attention backend 'cpu_flash' runs on CPU tensors only, got device {q.device}; "
            "use backend auto, flash or chunked on GPUs"
        )
    if backend == "flash" and not flash_attn_supports(q):
        raise LongctxError(
            f"attention backend 'flash' needs CUDA tensors in fp16/bf16 with head dim a "
            f"multiple of 8 (<= 256), got device {q.device}, dtype {q.dtype}, head dim "
            f"{q.shape[-1]}; use backend auto (cpu_flash on CPU, chunked otherwise)"
        )
    return backend


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise LongctxError(
            f"block_attention expects q [B, Hq, Tq, D] and k, v [B, Hkv, Tk, D], got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; transpose to heads-first"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise LongctxError(
            f"block_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or "
            "head dim; pass tensors of the same batch and head size"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise LongctxError(
            f"block_attention: query heads {q.shape[1]} are not a multiple of kv heads "
            f"{k.shape[1]}; GQA needs Hq % Hkv == 0"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise LongctxError(
            f"block_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); "
            "cast them to one dtype"
        )


def _bind_mask(mask: MaskSpec, q: Tensor, k: Tensor) -> MaskSpec:
    """``mask`` bound to (Tq, Tk) on q's device, its doc ids checked against the batch."""
    if mask.q_doc_ids is not None and mask.q_doc_ids.shape[0] != q.shape[0]:
        raise LongctxError(
            f"MaskSpec doc ids have batch {mask.q_doc_ids.shape[0]} but q has batch "
            f"{q.shape[0]}; pass one row of doc ids per sequence"
        )
    return mask.bind(q.shape[2], k.shape[2], device=q.device)


def _prepare_call(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None, mask: MaskSpec, backend: str
) -> tuple[float, MaskSpec, str]:
    """The checked inputs of a forward or backward call: (scale, bound mask, concrete backend);
    ``scale`` defaults to 1/sqrt(D)."""
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return scale, _bind_mask(mask, q, k), resolve_backend(backend, q)


def _chunk(backend: str, chunk_size: int | None) -> int:
    if chunk_size is not None and chunk_size < 1:
        raise LongctxError(f"chunk_size must be >= 1, got {chunk_size}; use e.g. 512")
    return chunk_size or DEFAULT_CHUNK[backend]


class _TiledAttention(torch.autograd.Function):
    """out, lse = tiled attention; backward recomputes tile scores (nothing T x T is saved)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, mask, backend, chunk):
        kernel = TILE_KERNELS[backend]
        out, lse = tiled_forward(q, k, v, scale, mask, kernel, chunk)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.mask, ctx.backend, ctx.chunk = scale, mask, backend, chunk
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        kernel, chunk = TILE_KERNELS[ctx.backend], ctx.chunk
        if dlse is not None and not kernel.takes_delta:
            # The fused ops derive delta from out and cannot see dlse: use plain-torch tiles.
            kernel, chunk = TILE_KERNELS["chunked"], DEFAULT_CHUNK["chunked"]
        dq, dk, dv = tiled_backward(
            dout, q, k, v, out, lse, dlse, ctx.scale, ctx.mask, kernel, chunk
        )
        return dq, dk, dv, None, None, None, None


def block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    mask: MaskSpec = CAUSAL,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact masked attention of one (query block, key block) pair.

    q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D] with Hq % Hkv == 0 (GQA: query head h uses kv head
    h // (Hq / Hkv)). ``scale`` defaults to 1/sqrt(D); ``mask`` positions are global (SPECS.md).
    ``chunk_size``: tile of the chunked and tiled cpu_flash/flash paths (None: ``DEFAULT_CHUNK``).
    Returns out [B, Hq, Tq, D] in q's dtype and lse [B, Hq, Tq] float32 (float64 for float64
    inputs): the natural log of the sum of exp of the scaled, masked logits. Differentiable
    w.r.t. q, k, v (and through lse). Rows with no visible key: out 0, lse -inf, finite grads.
    """
    scale, mask, backend = _prepare_call(q, k, v, scale, mask, backend)
    if backend == "reference":
        return reference_attention(q, k, v, scale, mask)
    if backend == "flex":
        return flex_block_attention(q, k, v, scale, mask)
    return _TiledAttention.apply(q, k, v, scale, mask, backend, _chunk(backend, chunk_size))


def block_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    scale: float | None = None,
    mask: MaskSpec = CAUSAL,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of ONE block (q, k, v) of a larger attention, flash style (SPECS.md 1.1).

    ``out`` [B, Hq, Tq, D] and ``lse`` [B, Hq, Tq] are the FINAL results merged over every key
    block, ``dout`` the gradient of ``out``; ``mask`` describes this block's keys. Summing the
    returned dq [B, Hq, Tq, D] over all key blocks, and taking dk, dv [B, Hkv, Tk, D] per block,
    gives the gradient of the full attention. The ``flex`` backend has no such entry point and
    uses the plain-torch ``chunked`` kernel here.
    """
    scale, mask, backend = _prepare_call(q, k, v, scale, mask, backend)
    if backend == "reference":
        return reference_attention_backward(dout, q, k, v, out, lse, scale, mask)
    if backend == "flex":
        backend = "chunked"
    kernel = TILE_KERNELS[backend]
    chunk = _chunk(backend, chunk_size)
    with torch.no_grad():
        return tiled_backward(dout, q, k, v, out, lse, None, scale, mask, kernel, chunk)
