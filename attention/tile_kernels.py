"""Tile kernels: exact attention of one (query tile, key piece), the unit ``tiling.py`` runs.

Three implementations of the ``TileKernel`` protocol:

``TorchTileKernel`` (plain torch, float32 accumulation) serves the ``chunked`` backend on any
device and mask with memory O(tile^2) per head, takes the PARTIAL pieces flash-attn cannot
mask, and computes every backward that must honour a gradient on lse. GQA never expands K,V:
the ``G = Hq / Hkv`` query heads sharing a kv head are stacked along the row dimension, so one
matmul serves them all and the K,V gradients sum over them for free.

``CpuFlashTileKernel`` runs torch's fused CPU op
``aten._scaled_dot_product_flash_attention_for_cpu``, which returns ``(out, logsumexp)``, and
its ``_backward``, which takes them back: exactly the (out, lse) contract of SPECS 1.1 that the
public ``scaled_dot_product_attention`` hides. What the ops do, checked on torch 2.13 (and
pinned by tests/test_kernels.py):

- ``is_causal`` is top-left aligned (query i sees key j <= i); we only use it on causal
  diagonal pieces, where top-left and bottom-right alignment agree.
- ``attn_mask`` must be a float mask in q's dtype (additive; bool is rejected), broadcast over
  heads: we pass ``[Bm, 1, tq, tk]`` with 0 / -inf.
- A row whose mask hides every key comes back with out 0 but lse 0 (not -inf): we set its lse
  to -inf. In the backward such rows are given lse 0, so ``exp(-inf - 0) = 0`` and no NaN.
- GQA (Hkv < Hq) is native in forward and backward (dk/dv come back per kv head).
- With bf16 inputs the op rounds the scaled queries to bf16, moving lse by ~1e-4.
- The backward recomputes delta from ``out``, so it cannot take a gradient on lse; the
  autograd wrapper routes that rare case to ``TorchTileKernel``.
- The backward parallelises over (batch x kv head) only; unmasked pieces go through
  ``cpu_flash_backward.balanced_flash_backward``, which spreads the remainder over the threads.

``FlashTileKernel`` runs flash-attn 2 on CUDA (imported lazily, never on CPU) through
``flash_attn.flash_attn_interface._flash_attn_forward`` / ``_flash_attn_backward`` in their
flash-attn >= 2.7 signatures (window_size_left/right, four outputs): the public
``flash_attn_func`` cannot take the FINAL merged lse a block's backward needs. Layout there is [B, T, H, D]; GQA is native; inputs must be fp16/bf16
with a head dim that is a multiple of 8 (at most 256). flash-attn masks only by ``causal``, so
FULL and causal-diagonal pieces run on it and other PARTIAL pieces on ``TorchTileKernel``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from longctx.attention.cpu_flash_backward import balanced_flash_backward, fused_backward
from longctx.attention.tiling import PieceKind, compute_dtype
from longctx.errors import LongctxError


def _grouped(x: Tensor, kv_heads: int, dtype: torch.dtype) -> Tensor:
    """[B, Hq, t, D] -> [B, Hkv, G * t, D]: query head h = j * G + g goes to kv head j."""
    batch, heads, length, dim = x.shape
    return x.to(dtype).reshape(batch, kv_heads, heads // kv_heads * length, dim)


def _masked_scores(
    q: Tensor,
    k: Tensor,
    kind: PieceKind,
    visible: Tensor | None,
    scale: float,
    write_bias: Callable[..., None] | None = None,
    row_shift: Tensor | None = None,
) -> Tensor:
    """``row_shift_i + bias_ij + scale q_i . k_j`` with hidden entries at -inf:
    [B, Hkv, G, tq, tk] in the compute dtype.

    ``row_shift`` [B, Hq, tq] (or None) and the bias, which ``write_bias(out, row_shift=)``
    writes into the [B, Hq, tq, tk] buffer together with the shift, are the GEMM's initial
    value (``baddbmm`` with beta 1, alpha ``scale``): the product lands on them in one pass
    instead of a scaling pass, a bias pass and a shift pass over the tile afterwards."""
    batch, heads, tq, _ = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    dtype = compute_dtype(q.dtype)
    query_rows = _grouped(q, kv_heads, dtype).flatten(0, 1)  # [B*Hkv, G*tq, D]
    keys_t = k.to(dtype).flatten(0, 1).transpose(-1, -2)  # [B*Hkv, D, tk]
    scores = torch.empty(batch * kv_heads, query_rows.shape[1], tk, dtype=dtype, device=q.device)
    initial = write_bias is not None or row_shift is not None
    if write_bias is not None:
        write_bias(scores.view(batch, heads, tq, tk), row_shift=row_shift)
    elif row_shift is not None:
        scores.view(batch, heads, tq, tk).copy_(row_shift[..., None].expand(-1, -1, -1, tk))
    scores.baddbmm_(query_rows, keys_t, beta=1.0 if initial else 0.0, alpha=scale)
    scores = scores.view(batch, kv_heads, heads // kv_heads, tq, tk)
    if kind is PieceKind.CAUSAL:
        hidden = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu_(1)  # j > i
        scores.masked_fill_(hidden, float("-inf"))
    elif kind is PieceKind.MASKED:
        scores.masked_fill_(~visible[:, None, None], float("-inf"))  # visible [Bm, tq, tk]
    return scores


def _exp(x: Tensor, floored: bool) -> Tensor:
    """exp(x) in place; ``floored`` clamps x at ``log(smallest normal) + 1`` first.

    torch's CPU exp leaves its vector path for inputs whose result underflows (or is
    subnormal) or that are -inf: a tile of such inputs takes 30-60x longer (measured 9 ms
    instead of 0.15 ms on 2 x 512 x 512 floats). A bias such as BAM's prior makes most of a
    far tile's scores that small, so with a bias they are floored: a probability below
    ~4e-38 (float32) becomes ~4e-38, which no sum of T < 2^100 such terms can see against a
    row maximum of 1; rows that see no key at all are set to 0 / -inf by the caller."""
    if floored:
        x.clamp_(min=math.log(torch.finfo(x.dtype).tiny) + 1.0)
    return x.exp_()


class TorchTileKernel:
    """``TileKernel`` in plain torch; see the module docstring.

    It alone ``takes_bias``: both methods accept ``write_bias(out, row_shift=)``, which writes
    a bias on the scaled scores, plus ``row_shift[..., None]`` when that is not None, into the
    [B, Hq, tq, tk] buffer ``out``; the backward then also returns the scores' gradient
    [B, Hq, tq, tk], which is the bias's (``attention/biased.py`` reduces it per tile)."""

    fused = False
    takes_delta = True
    takes_bias = True

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kind: PieceKind,
        visible: Tensor | None,
        scale: float,
        write_bias: Callable[..., None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        batch, heads, tq, dim = q.shape
        kv_heads = k.shape[1]
        dtype = compute_dtype(q.dtype)
        scores = _masked_scores(q, k, kind, visible, scale, write_bias)  # [B, Hkv, G, tq, tk]
        row_max = scores.amax(-1)  # [B, Hkv, G, tq]; -inf on rows that see nothing
        sees_nothing = torch.isneginf(row_max)
        row_max = torch.where(sees_nothing, torch.zeros_like(row_max), row_max)
        weights = _exp(scores.sub_(row_max[..., None]), write_bias is not None)  # hidden: 0
        total = weights.sum(-1)  # [B, Hkv, G, tq]
        out = weights.view(batch, kv_heads, -1, k.shape[2]) @ v.to(dtype)  # [B, Hkv, G*tq, D]
        out = out.view(*total.shape, dim) / torch.where(total > 0, total, 1.0)[..., None]
        lse = row_max + torch.log(total)  # log(0) = -inf: rows that see nothing
        if write_bias is not None:  # floored exponentials: those rows are not 0 by themselves
            out = out.masked_fill_(sees_nothing[..., None], 0.0)
            lse = lse.masked_fill_(sees_nothing, float("-inf"))
        return out.reshape(batch, heads, tq, dim), lse.reshape(batch, heads, tq)

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        delta: Tensor,
        kind: PieceKind,
        visible: Tensor | None,
        scale: float,
        write_bias: Callable[..., None] | None = None,
    ) -> tuple[Tensor, ...]:
        """-> dq, dk, dv, and with ``write_bias`` also dbias [B, Hq, tq, tk] (the scores' grad).

        The probabilities are ``exp(s - lse)`` with ``-lse`` as the score GEMM's initial value,
        and ``dP - delta`` is the dP GEMM's, so neither costs a pass of its own."""
        batch, heads, tq, dim = q.shape
        kv_heads, tk = k.shape[1], k.shape[2]
        dtype = compute_dtype(q.dtype)
        shifted = _masked_scores(q, k, kind, visible, scale, write_bias, row_shift=-lse)
        probs = _exp(shifted, write_bias is not None)  # p = exp(s - lse_final)
        probs_rows = probs.view(batch * kv_heads, -1, tk)  # [B*Hkv, G*tq, tk]
        dout_rows = _grouped(dout, kv_heads, dtype).flatten(0, 1)  # [B*Hkv, G*tq, D]
        dv = probs_rows.transpose(-1, -2) @ dout_rows  # [B*Hkv, tk, D], summed over groups
        minus_delta = -delta.reshape(batch * kv_heads, -1, 1).to(dtype)
        values_t = v.to(dtype).flatten(0, 1).transpose(-1, -2)  # [B*Hkv, D, tk]
        dprobs = torch.baddbmm(minus_delta.expand(-1, -1, tk), dout_rows, values_t)  # dP - delta
        dscores = probs_rows.mul_(dprobs)  # [B*Hkv, G*tq, tk]
        dq = torch.bmm(dscores, k.to(dtype).flatten(0, 1)).mul_(scale)  # [B*Hkv, G*tq, D]
        dk = torch.bmm(dscores.transpose(-1, -2), _grouped(q, kv_heads, dtype).flatten(0, 1))
        grads = (
            dq.view(batch, heads, tq, dim),
            dk.mul_(scale).view(batch, kv_heads, tk, dim),  # [B*Hkv, tk, D], summed over groups
            dv.view(batch, kv_heads, tk, dim),
        )
        return grads if write_bias is None else (*grads, dscores.view(batch, heads, tq, tk))


# ---------------------------------------------------------------------- fused CPU op

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _additive_mask(visible: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """bool [Bm, tq, tk] -> additive [Bm, 1, tq, tk]: 0 where visible, -inf where hidden."""
    if visible is None:
        return None
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill_(~visible, float("-inf"))[:, None]


class CpuFlashTileKernel:
    """``TileKernel`` on torch's fused CPU flash op; see the module docstring."""

    fused = True
    takes_delta = False

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, kind: PieceKind, visible: Tensor | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        out, lse = _FLASH_CPU(
            q,
            k,
            v,
            0.0,
            kind is PieceKind.CAUSAL,
            attn_mask=_additive_mask(visible, q.dtype),
            scale=scale,
        )  # out [B, Hq, tq, D], lse [B, Hq, tq]
        if visible is not None:
            sees_nothing = ~visible.any(-1)[:, None]  # [Bm, 1, tq]
            lse = lse.masked_fill(sees_nothing, float("-inf"))
        return out, lse

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        delta: Tensor,
        kind: PieceKind,
        visible: Tensor | None,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # ``delta`` is unused: the op derives it from (dout, out) itself.
        causal = kind is PieceKind.CAUSAL
        if visible is None:
            return balanced_flash_backward(dout, q, k, v, out, lse, causal, scale)
        mask = _additive_mask(visible, q.dtype)
        return fused_backward(dout, q, k, v, out, lse, causal, scale, mask)


# ---------------------------------------------------------------------- flash-attn (CUDA)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_installed() -> bool:
    """Whether flash-attn can be imported (checked without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


def flash_attn_supports(q: Tensor) -> bool:
    """Whether flash-attn can run attention on tensors like ``q`` [B, H, T, D]."""
    dim = q.shape[-1]
    return q.is_cuda and q.dtype in SUPPORTED_DTYPES and dim % 8 == 0 and dim <= 256


def _interface() -> ModuleType:
    if not flash_attn_installed():
        raise LongctxError(
            "attention backend 'flash' needs the flash-attn package, which is not installed; "
            "pip install 'longctx[cuda]' or set attention.backend to auto"
        )
    from flash_attn import flash_attn_interface

    return flash_attn_interface


def _time_major(x: Tensor) -> Tensor:
    """[B, H, T, D] -> contiguous [B, T, H, D], the layout flash-attn reads."""
    return x.transpose(1, 2).contiguous()


def _flash_options(kind: PieceKind, scale: float) -> dict[str, object]:
    """The keyword options forward and backward must pass alike: no dropout, no local window,
    no softcap, no ALiBi, causal only on a causal diagonal piece."""
    return {
        "dropout_p": 0.0,
        "softmax_scale": scale,
        "causal": kind is PieceKind.CAUSAL,
        "window_size_left": -1,
        "window_size_right": -1,
        "softcap": 0.0,
        "alibi_slopes": None,
    }


class FlashTileKernel:
    """``TileKernel`` on flash-attn (CUDA); see the module docstring."""

    fused = True
    takes_delta = False

    def __init__(self) -> None:
        self._torch_kernel = TorchTileKernel()

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, kind: PieceKind, visible: Tensor | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        if kind is PieceKind.MASKED:
            return self._torch_kernel.forward(q, k, v, kind, visible, scale)
        out, lse, _, _ = _interface()._flash_attn_forward(
            _time_major(q),
            _time_major(k),
            _time_major(v),
            **_flash_options(kind, scale),
            return_softmax=False,
        )  # out [B, tq, Hq, D], lse [B, Hq, tq]
        return out.transpose(1, 2), lse[..., : q.shape[2]]

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        delta: Tensor,
        kind: PieceKind,
        visible: Tensor | None,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if kind is PieceKind.MASKED:
            return self._torch_kernel.backward(dout, q, k, v, out, lse, delta, kind, visible, scale)
        q_t, k_t, v_t = _time_major(q), _time_major(k), _time_major(v)
        dq, dk, dv = torch.empty_like(q_t), torch.empty_like(k_t), torch.empty_like(v_t)
        _interface()._flash_attn_backward(
            _time_major(dout),
            q_t,
            k_t,
            v_t,
            _time_major(out),
            lse.float().contiguous(),
            dq,
            dk,
            dv,
            **_flash_options(kind, scale),
            deterministic=False,
            rng_state=None,
        )  # writes dq [B, tq, Hq, D], dk/dv [B, tk, Hkv, D]
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
