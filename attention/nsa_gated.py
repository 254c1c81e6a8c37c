"""NSA's gated sum of its three branches as one autograd function that keeps only what backward
needs (SPECS 3.1; ``attention/nsa.py`` builds its inputs).

``out = g_cmp o_cmp + g_slc o_slc + g_win o_win``, q [B, Hq, Tq, D]. Composed from separate
autograd nodes, this retained every branch output (for the gates' gradients) and every branch's
own output (for its flash backward), the three gated products, and a full dq per branch: about
ten [B, Hq, Tq, D] tensors at once, 2.8x dense attention's peak at T=32k. Here:

- forward accumulates the gated branches into one ``out``: the compressed branch inside the
  block selection's importance pass (``nsa_branches.attend`` there: the compression
  probabilities exist whole per query chunk, so its output is one more GEMM on them), the
  window branch a query tile at a time (``attend`` again), the selection branch block-major
  (``nsa_selection``). No branch output but the selection's exists whole.
- saved: q, k, v, the compressed keys/values, the gates, each branch's lse and the selection
  branch's output. Backward first takes the selection output's row sums
  ``rowsum(dout * o_slc)`` (the gate's gradient and the softmax term), then frees its storage
  before dq, dk, dv are allocated (recomputing it would cost a second forward of the dearest
  branch). It stays a saved tensor, so activation checkpointing and offload hooks handle it
  like any other.
- backward re-forms the compressed and window branches' probabilities from their lse chunk by
  chunk and takes their gradients and their gates' from them (``nsa_branches.branch_backward``:
  the gate's gradient ``rowsum(dout * o) = rowsum(P * dP)``, so no output is recomputed);
  dq, dk, dv (and the compressed keys' gradients) are accumulated in place across branches.

Peak beyond the inputs (B=1, Hq=8, D=64, fp32; ``bench/sparse_nsa_mosa.py``'s memory run, live
tensors): forward: out and the selection output (128 MiB at T=32768) and the selection plan;
backward: dq, dk, dv (96 MiB; the selection gathers dout's rows in place and gates them per
step). At T=32768 (random inputs): 162-171 MiB against dense attention's 166-174 MiB (dense
keeps out through its backward); with the selection output kept through backward, per-kv-head
[Tq, G, D] copies of q and dout and phi's conv1d buffers it was 1.42x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.nsa_branches import (
    CompressedBranch,
    WindowBranch,
    attend,
    branch_backward,
    transposed,
)
from longctx.attention.nsa_selection import (
    QueryKeySides,
    output_row_sums,
    selection_backward,
    selection_forward,
    selection_plans,
    token_major_zeros,
)
from longctx.attention.tiling import compute_dtype
from longctx.errors import LongctxError


@dataclass(frozen=True)
class NSAProblem:
    """Everything but the tensors: where queries and keys sit, the softmax scale, the
    compressed branch (None: the sequence is shorter than one compressed block), the window
    branch and the block selection (``select(q, ck, cv, take_compressed) -> selected
    [B, Hkv, Tq, n]``, which also computes the compressed branch and hands it over chunk by
    chunk as ``take_compressed(rows, o_cmp [B, Hq, c, D], lse [B, Hq, c])``)."""

    sides: QueryKeySides
    scale: float
    compressed: CompressedBranch | None
    window: WindowBranch
    select: Callable[..., Tensor]
    select_block: int


class GatedBranchAttention(torch.autograd.Function):
    """``(q, k, v, ck, cv, gates, problem) -> out`` [B, Hq, Tq, D]; see the module.

    k, v [B, Hkv, Tk, D] the whole sequence; ck, cv [B, Hkv, nc, D] the compressed blocks (None
    when the sequence is shorter than one block); gates [3, B, Hq, Tq, 1] (compression,
    selection, window). Differentiable in q, k, v, ck, cv and gates.
    """

    @staticmethod
    def forward(ctx, q, k, v, ck, cv, gates, problem):
        out = torch.zeros_like(q)
        lse_cmp, lse_win = (
            torch.full(q.shape[:3], float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
            for _ in range(2)
        )  # [B, Hq, Tq] each

        def take_compressed(rows: slice, o_cmp: Tensor, lse: Tensor) -> None:
            out[:, :, rows].addcmul_(gates[0, :, :, rows], o_cmp)
            lse_cmp[:, :, rows] = lse

        selected = problem.select(q, ck, cv, take_compressed)  # [B, Hkv, Tq, n]
        plans = selection_plans(selected, problem.select_block, k.shape[2], problem.sides)
        del selected  # the plans hold its pairs block-major
        for chunk in problem.window.chunks(q.shape[0] * q.shape[1]):
            rows = chunk.rows
            _, o_win, lse = attend(q, k, v, chunk, problem.scale)
            out[:, :, rows].addcmul_(gates[2, :, :, rows], o_win)
            lse_win[:, :, rows] = lse
        o_slc, lse_slc = selection_forward(q, k, v, plans, problem.sides, problem.scale)
        out.addcmul_(gates[1], o_slc)
        # Saved (not held on ctx) so that activation checkpointing and offload hooks see it;
        # backward frees its storage once it has taken its row sums, before dq, dk, dv exist.
        ctx.save_for_backward(q, k, v, ck, cv, gates, o_slc, lse_slc, lse_cmp, lse_win)
        ctx.problem, ctx.plans, ctx.selection_freed = problem, plans, False
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.selection_freed:
            raise LongctxError(
                "NSA's fused attention frees its selection output during backward, so it cannot "
                "be differentiated twice (retain_graph=True); recompute the forward instead"
            )
        q, k, v, ck, cv, gates, o_slc, lse_slc, lse_cmp, lse_win = ctx.saved_tensors
        problem = ctx.problem
        acc = compute_dtype(q.dtype)
        slc_sums = output_row_sums(dout, o_slc)  # [B, Hq, Tq]
        o_slc.untyped_storage().resize_(0)  # freed now (FSDP's idiom): only its row sums are used
        ctx.selection_freed = True
        del o_slc
        tensors = (q, k, v, ck, cv)
        grads = [token_major_zeros(q.shape, acc, q.device)] + [
            None if x is None else torch.zeros_like(x, dtype=acc) for x in tensors[1:]
        ]  # dq (token-major, as the selection scatters rows), dk, dv, dck, dcv (each in its
        # input's layout), accumulated in place by every branch
        dgates = torch.zeros(gates.shape, dtype=acc, device=q.device)
        sequences_heads = q.shape[0] * q.shape[1]
        if problem.compressed is not None:
            dgates[0, ..., 0] = branch_backward(
                problem.compressed.chunks(sequences_heads), q, ck, cv, dout, gates[0], lse_cmp,
                problem.scale, (grads[0], grads[3], grads[4]), transposed(ck), transposed(cv),
            )  # fmt: skip
        dgates[2, ..., 0] = branch_backward(
            problem.window.chunks(sequences_heads), q, k, v, dout, gates[2], lse_win,
            problem.scale, grads[:3],
        )  # fmt: skip
        dgates[1, ..., 0] = slc_sums
        selection_backward(
            dout, q, k, v, slc_sums, lse_slc, ctx.plans, problem.sides, problem.scale,
            grads[:3], gate=gates[1],
        )  # fmt: skip
        dq, dk, dv, dck, dcv = (
            None if g is None else g.to(x.dtype) for g, x in zip(grads, tensors)
        )
        return dq, dk, dv, dck, dcv, dgates.to(gates.dtype), None
