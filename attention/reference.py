"""The float64 reference backend: attention with a materialised mask, for tests only.

Everything is computed in float64 with plain autograd-differentiable torch ops, so tests compare
every fast backend (and ring attention) against it, including through ``torch.autograd``.
Memory is O(Tq * Tk): never use it on long sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.attention.mask import MaskSpec


def _expand_kv_heads(x: Tensor, groups: int) -> Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * groups, T, D]: query head h uses kv head h // groups."""
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def _result_dtypes(q: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(out dtype, lse dtype): out in q's dtype; lse float32, float64 for float64 inputs."""
    return q.dtype, torch.float64 if q.dtype == torch.float64 else torch.float32


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: MaskSpec
) -> tuple[Tensor, Tensor]:
    """Masked softmax attention in float64; ``mask`` must be bound to (Tq, Tk).

    q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D] -> out [B, Hq, Tq, D] (q's dtype), lse [B, Hq, Tq].
    Rows with no visible key give out 0 and lse -inf; gradients stay finite because those rows
    go through ``where`` with finite stand-ins.
    """
    out_dtype, lse_dtype = _result_dtypes(q)
    groups = q.shape[1] // k.shape[1]
    q64 = q.double()
    k64 = _expand_kv_heads(k.double(), groups)  # [B, Hq, Tk, D]
    v64 = _expand_kv_heads(v.double(), groups)
    visible = mask.dense_mask()[:, None]  # [Bm, 1, Tq, Tk]
    scores = torch.einsum("bhqd,bhkd->bhqk", q64, k64) * scale  # [B, Hq, Tq, Tk]
    scores = scores.masked_fill(~visible, float("-inf"))
    has_key = visible.any(-1)  # [Bm, 1, Tq]
    # The row max only stabilises exp(); detaching it leaves values and gradients exact.
    row_max = torch.where(has_key, scores.amax(-1), 0.0).detach()  # [B, Hq, Tq]
    weights = torch.exp(scores - row_max[..., None])  # masked entries: exp(-inf) = 0
    total = torch.where(has_key, weights.sum(-1), 1.0)  # [B, Hq, Tq]
    out = torch.einsum("bhqk,bhkd->bhqd", weights / total[..., None], v64)
    lse = torch.where(has_key, row_max + torch.log(total), float("-inf"))
    return out.to(out_dtype), lse.to(lse_dtype)


def reference_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    mask: MaskSpec,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of the block (q, k, v) given the FINAL merged ``out``/``lse`` (SPECS 1.1), float64.

    ``p = exp(s - lse)``, ``delta = rowsum(dout * out)``, ``ds = p (dp - delta)``: the block's
    share of the gradient of the full attention whose result is (out, lse). Returns dq
    [B, Hq, Tq, D], dk, dv [B, Hkv, Tk, D] in the input dtypes.
    """
    groups = q.shape[1] // k.shape[1]
    q64, dout64, out64 = q.double(), dout.double(), out.double()
    k64 = _expand_kv_heads(k.double(), groups)
    v64 = _expand_kv_heads(v.double(), groups)
    lse64 = lse.double()
    lse64 = torch.where(torch.isneginf(lse64), 0.0, lse64)  # such rows have no visible key
    visible = mask.dense_mask()[:, None]  # [Bm, 1, Tq, Tk]
    scores = torch.einsum("bhqd,bhkd->bhqk", q64, k64) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.exp(scores - lse64[..., None])  # [B, Hq, Tq, Tk]
    delta = (dout64 * out64).sum(-1, keepdim=True)  # [B, Hq, Tq, 1]
    dprobs = torch.einsum("bhqd,bhkd->bhqk", dout64, v64)
    dscores = probs * (dprobs - delta)
    dq = torch.einsum("bhqk,bhkd->bhqd", dscores, k64) * scale
    dk = torch.einsum("bhqk,bhqd->bhkd", dscores, q64) * scale  # [B, Hq, Tk, D]
    dv = torch.einsum("bhqk,bhqd->bhkd", probs, dout64)
    dk = dk.unflatten(1, (k.shape[1], groups)).sum(2)  # sum the query heads sharing a kv head
    dv = dv.unflatten(1, (k.shape[1], groups)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
