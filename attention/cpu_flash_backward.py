"""Torch's fused CPU flash-attention backward, with its work spread over every thread.

``aten._scaled_dot_product_flash_attention_for_cpu_backward`` parallelises over
(batch x kv head) only: each item owns one kv head's dk/dv and runs its ``G = Hq / Hkv`` query
heads one after another (the forward, by contrast, also splits over query blocks). When the
item count is not a multiple of the thread count, the last round leaves threads idle. With
SmolLM2's 9 query / 3 kv heads on 2 threads that is 2 rounds of 3 heads (6 head-times of wall
clock) for 4.5 head-times of work: one thread waits through the second round.

``balanced_flash_backward`` runs the items that fill whole rounds as one call, and cuts each
remaining item into 4 pieces of equal work that are batched along the batch dimension, so the
threads share them:

- causal (square, top-left aligned): the two diagonal halves ``[0, T/2) x [0, T/2)`` and
  ``[T/2, T) x [T/2, T)`` (causal again, one call), and the block below the diagonal,
  ``[T/2, T) x [0, T/2)``, as two query halves of T/4 rows (no mask, one call);
- no mask: four query quarters against all keys (one call).

Each piece's backward takes the FINAL out and lse of its query rows, so its dq/dk/dv are exact
partial gradients (as in ``tiling.tiled_backward``); dq rows are written back in place and dk/dv
of a kv head sum over its pieces in float32. Only the remainder items are copied into pieces, so
the extra memory is O(pieces x T x D) for those heads. The split is taken only when the cost
model below says the wall time drops; CPU time is the same either way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longctx.attention.tiling import compute_dtype

_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
PIECES = 4  # equal-work pieces per remainder item
MIN_PIECE_ROWS = 256  # below this a piece is mostly call overhead: keep the op whole


def fused_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
    scale: float, mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One call of the fused op: q/dout/out [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], lse [B, Hq, Tq],
    optional additive ``mask`` [Bm, 1, Tq, Tk]; returns dq, dk, dv in the input shapes."""
    return _FLASH_CPU_BACKWARD(dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)


def splits_remainder(items: int, threads: int, causal: bool, tq: int, tk: int) -> bool:
    """Whether ``balanced_flash_backward`` cuts the ``items % threads`` remainder into pieces:
    only when that shortens the wall time, pieces keep ``MIN_PIECE_ROWS`` rows, and a causal
    problem is square.

    Unit: one item's whole backward on one thread. Unsplit, the remainder takes one round (1).
    Split, causal runs two calls of ``2r`` quarter-work pieces, ``2 * ceil(2r / n) / 4``; no mask
    runs one call of ``4r`` quarters, ``ceil(4r / n) / 4``.
    """
    rest = items % threads
    if rest == 0 or tq % PIECES or tq // PIECES < MIN_PIECE_ROWS or (causal and tq != tk):
        return False
    if causal:
        split = 2 * math.ceil(2 * rest / threads) / PIECES
    else:
        split = math.ceil(PIECES * rest / threads) / PIECES
    return split < 1


def balanced_flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The fused op's backward (no mask; ``causal`` = square top-left causal), balanced over
    ``torch.get_num_threads()`` threads. Shapes as ``fused_backward``; same gradients up to
    float32 summation order."""
    batch, q_heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    items, threads = batch * kv_heads, torch.get_num_threads()
    if not splits_remainder(items, threads, causal, tq, tk):
        return fused_backward(dout, q, k, v, out, lse, causal, scale)
    group = q_heads // kv_heads
    # One item per batch row (a view when B == 1): dout/q/out [B*Hkv, G, Tq, D], lse
    # [B*Hkv, G, Tq], k/v [B*Hkv, 1, Tk, D], in fused_backward's argument order.
    args = [
        *(x.reshape(items, group, tq, dim) for x in (dout, q)),
        *(x.reshape(items, 1, tk, dim) for x in (k, v)),
        out.reshape(items, group, tq, dim),
        lse.reshape(items, group, tq),
    ]
    whole = items - items % threads
    grads = []
    if whole:
        grads.append(fused_backward(*(x[:whole] for x in args), causal, scale))
    split = _causal_pieces if causal else _query_quarters
    grads.append(split(*(x[whole:] for x in args), scale))
    dq, dk, dv = (torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*grads))
    return (
        dq.reshape(batch, q_heads, tq, dim),
        dk.reshape(batch, kv_heads, tk, dim),
        dv.reshape(batch, kv_heads, tk, dim),
    )


def _stack_rows(x: Tensor, parts: int) -> Tensor:
    """[R, G, T, ...] -> [R * parts, G, T / parts, ...]: row blocks become batch rows."""
    return x.unflatten(2, (parts, x.shape[2] // parts)).transpose(1, 2).flatten(0, 1)


def _unstack_rows(x: Tensor, parts: int) -> Tensor:
    """Inverse of ``_stack_rows``."""
    return x.unflatten(0, (-1, parts)).transpose(1, 2).flatten(2, 3)


def _repeat_items(x: Tensor, parts: int) -> Tensor:
    """[R, 1, Tk, D] -> [R * parts, 1, Tk, D]: the keys each of an item's pieces sees."""
    return x.unsqueeze(1).expand(-1, parts, -1, -1, -1).flatten(0, 1)


def _sum_items(x: Tensor, parts: int) -> Tensor:
    """[R * parts, 1, Tk, D] -> [R, 1, Tk, D]: a kv head's gradient summed over its pieces."""
    return x.unflatten(0, (-1, parts)).sum(1, dtype=compute_dtype(x.dtype))


def _causal_pieces(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of R causal items [R, G, T, D] as 2 diagonal halves + 2 below-diagonal quarters."""
    half = q.shape[2] // 2
    diagonal = fused_backward(
        *(_stack_rows(x, 2) for x in (dout, q, k, v, out, lse)), True, scale
    )  # dq [2R, G, T/2, D], dk/dv [2R, 1, T/2, D]
    lower_rows = [_stack_rows(x[:, :, half:], 2) for x in (dout, q, out, lse)]
    lower_keys = [_repeat_items(x[:, :, :half], 2) for x in (k, v)]
    below = fused_backward(
        *lower_rows[:2], *lower_keys, *lower_rows[2:], False, scale
    )  # dq [2R, G, T/4, D], dk/dv [2R, 1, T/2, D]
    acc = compute_dtype(q.dtype)
    dq = _unstack_rows(diagonal[0], 2).to(acc)
    dq[:, :, half:] += _unstack_rows(below[0], 2)
    dk, dv = (_unstack_rows(g, 2).to(acc) for g in diagonal[1:])
    dk[:, :, :half] += _sum_items(below[1], 2)
    dv[:, :, :half] += _sum_items(below[2], 2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _query_quarters(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of R unmasked items [R, G, Tq, D] as four query quarters against all keys."""
    rows = [_stack_rows(x, PIECES) for x in (dout, q, out, lse)]
    keys = [_repeat_items(x, PIECES) for x in (k, v)]
    dq, dk, dv = fused_backward(*rows[:2], *keys, *rows[2:], False, scale)
    return (
        _unstack_rows(dq, PIECES),
        _sum_items(dk, PIECES).to(k.dtype),
        _sum_items(dv, PIECES).to(v.dtype),
    )
