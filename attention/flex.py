"""The FlexAttention backend: the ``MaskSpec`` as a ``mask_mod``, one call, lse returned.

What torch 2.13 does on CPU (bench/results/design_measurements.md):

- Eager ``flex_attention`` runs, returns lse, and gives fully masked rows out 0, lse -inf; but
  it warns that it "materializes the full scores matrix": O(Tq * Tk) memory, like naive.
- ``torch.compile(flex_attention)`` on CPU compiles, but its CPU lowering "only supports
  inference and return_lse is not supported yet", so it cannot serve the (out, lse) contract.
  We therefore run eager on CPU.
- The backward raises "FlexAttention does not support backward on CPU": we refuse inputs that
  require grad on CPU with a ``LongctxError`` before starting.

On CUDA the compiled kernel (cached by torch per shape) is used and is trainable through its
own autograd. ``block_attention_backward`` for this backend runs the plain-torch tile kernel:
flex has no entry point that takes a final lse.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from longctx.attention.mask import MaskSpec
from longctx.errors import LongctxError


@cache
def _compiled_flex() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


def mask_mod_for(mask: MaskSpec) -> Callable | None:
    """A flex ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for a bound spec; None if all visible."""
    rules: list[Callable] = []
    q_pos, k_pos = mask.q_positions, mask.k_positions
    if mask.causal:
        rules.append(lambda b, qi, ki: k_pos[ki] <= q_pos[qi])
    if mask.window is not None:
        window = mask.window
        rules.append(lambda b, qi, ki: q_pos[qi] - k_pos[ki] < window)
    if mask.block_sparse is not None:
        pattern = mask.block_sparse
        size = pattern.block_size
        rules.append(lambda b, qi, ki: pattern.visible(q_pos[qi] // size, k_pos[ki] // size))
    if mask.q_doc_ids is not None:
        q_docs, k_docs = mask.q_doc_ids, mask.k_doc_ids
        rules.append(lambda b, qi, ki: q_docs[b, qi] == k_docs[b, ki])
    if not rules:
        return None

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        visible = rules[0](b, q_idx, kv_idx)
        for rule in rules[1:]:
            visible = visible & rule(b, q_idx, kv_idx)
        return visible

    return mask_mod


def flex_block_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: MaskSpec
) -> tuple[Tensor, Tensor]:
    """Attention through FlexAttention: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], bound ``mask``.

    Returns out [B, Hq, Tq, D] and lse [B, Hq, Tq] float32. Forward-only on CPU.
    """
    if not q.is_cuda and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise LongctxError(
            "attention backend 'flex' cannot compute gradients on CPU (torch's FlexAttention has "
            "no CPU backward); use backend cpu_flash or chunked for training, or run flex under "
            "torch.no_grad()"
        )
    if not q.is_cuda:
        # Flex rejects CPU inputs that merely carry requires_grad, even under no_grad.
        q, k, v = q.detach(), k.detach(), v.detach()
    batch, _, tq, _ = q.shape
    mask_mod = mask_mod_for(mask)
    block_mask = None
    if mask_mod is not None:
        mask_batch = batch if mask.q_doc_ids is not None else None
        block_mask = create_block_mask(mask_mod, mask_batch, None, tq, k.shape[2], device=q.device)
    call = _compiled_flex() if q.is_cuda else flex_attention
    with warnings.catch_warnings():
        # Eager CPU flex warns that it is unfused; that is the documented trade-off above.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out, aux = call(
            q,
            k,
            v,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
            return_aux=AuxRequest(lse=True),
        )
    return out, aux.lse.float()
