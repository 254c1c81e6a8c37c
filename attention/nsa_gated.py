"""NSA's gated sum of its three branches as one autograd function that keeps only what backward
needs (SPECS 3.1; ``attention/nsa.py`` builds its inputs).

``out = g_cmp o_cmp + g_slc o_slc + g_win o_win``, q [B, Hq, Tq, D]. Composed from separate
autograd nodes, this retained every branch output (for the gates' gradients) and every branch's
own output (for its flash backward), the three gated products, and a full dq per branch: about
ten [B, Hq, Tq, D] tensors at once, 2.8x dense attention's peak at T=32k. Here:

- forward accumulates the gated branches into one ``out``: the compressed branch inside the
  block selection's importance pass (``nsa_compressed.CompressedBranch.forward``: the
  compression probabilities exist there whole per query chunk, so its output is one more GEMM
  on them),
  the window branch a query tile at a time (tiled kernels, ``attention/tiling.py``), the
  selection branch block-major (``nsa_selection``). No branch output but the selection's
  exists whole.
- saved: q, k, v, the compressed keys/values, the gates, the compressed branch's lse and the
  selection branch's output and lse. Backward first takes the selection output's row sums
  ``rowsum(dout * o_slc)`` (the gate's gradient and the softmax term), then frees its storage
  before dq, dk, dv are allocated (recomputing it would cost a second forward of the dearest
  branch). It stays a saved tensor, so activation checkpointing and offload hooks handle it
  like any other.
- backward re-forms the compressed branch's probabilities from its lse chunk by chunk and takes
  its gradients and its gate's from them (``CompressedBranch.backward``: no output
  recomputed), recomputes the window output per query tile (``o``, ``lse``), reads the gate
  gradient ``rowsum(dout * o)`` off it and runs the tile's flash backward with the branch's
  output gradient ``g dout``; dq, dk, dv (and the compressed keys' gradients) are accumulated
  in place across branches and tiles.

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

from longctx.attention.kernels import DEFAULT_CHUNK, TILE_KERNELS, resolve_backend
from longctx.attention.mask import MaskSpec
from longctx.attention.merge import merge_partials
from longctx.attention.nsa_compressed import CompressedBranch
from longctx.attention.nsa_selection import (
    QueryKeySides,
    output_row_sums,
    selection_backward,
    selection_forward,
    selection_plans,
    token_major_zeros,
)
from longctx.attention.tiling import TileKernel, compute_dtype, piece_mask, plan_tiles
from longctx.errors import LongctxError

# The tiled kernels NSA's tile loops can drive; reference and flex (no tile entry point) run
# the branches on the plain-torch chunked tiles.
TILED_BACKENDS = ("chunked", "cpu_flash", "flash")


@dataclass(frozen=True)
class NSAProblem:
    """Everything but the tensors: where queries and keys sit, the window branch's kernel, tile
    and mask (bound to (Tq, Tk)), the compressed branch (None: the sequence is shorter than one
    compressed block) and the block selection (``select(q, ck, cv, take_compressed) ->
    selected [B, Hkv, Tq, n]``, which also computes the compressed branch and hands it over
    chunk by chunk as ``take_compressed(rows, o_cmp [B, Hq, c, D], lse [B, Hq, c])``)."""

    sides: QueryKeySides
    scale: float
    kernel: TileKernel
    tile: int
    compressed: CompressedBranch | None
    window: MaskSpec
    select: Callable[..., Tensor]
    select_block: int


def tiled_kernel(backend: str, q: Tensor, chunk_size: int | None) -> tuple[TileKernel, int]:
    """The tile kernel for ``backend`` on tensors like ``q`` and its tile size."""
    backend = resolve_backend(backend, q)
    backend = backend if backend in TILED_BACKENDS else "chunked"
    return TILE_KERNELS[backend], chunk_size or DEFAULT_CHUNK[backend]


def _window_forward(problem, q, k, v, query_tile) -> tuple[Tensor, Tensor]:
    """One query tile of the window branch: out [B, Hq, t, D], lse [B, Hq, t] over its pieces."""
    rows = query_tile.queries
    q_tile = q[:, :, rows]
    merged = None
    for piece in query_tile.pieces:
        part = problem.kernel.forward(
            q_tile, k[:, :, piece.keys], v[:, :, piece.keys], piece.kind,
            piece_mask(problem.window, rows, piece), problem.scale,
        )  # fmt: skip
        merged = part if merged is None else merge_partials(*merged, *part)
    return merged[0].to(q.dtype), merged[1]


class GatedBranchAttention(torch.autograd.Function):
    """``(q, k, v, ck, cv, gates, problem) -> out`` [B, Hq, Tq, D]; see the module.

    k, v [B, Hkv, Tk, D] the whole sequence; ck, cv [B, Hkv, nc, D] the compressed blocks (None
    when the sequence is shorter than one block); gates [3, B, Hq, Tq, 1] (compression,
    selection, window). Differentiable in q, k, v, ck, cv and gates.
    """

    @staticmethod
    def forward(ctx, q, k, v, ck, cv, gates, problem):
        out = torch.zeros_like(q)
        lse_cmp = torch.full(
            q.shape[:3], float("-inf"), dtype=compute_dtype(q.dtype), device=q.device
        )

        def take_compressed(rows: slice, o_cmp: Tensor, lse: Tensor) -> None:
            out[:, :, rows].addcmul_(gates[0, :, :, rows], o_cmp)
            lse_cmp[:, :, rows] = lse

        selected = problem.select(q, ck, cv, take_compressed)
        for query_tile in plan_tiles(problem.window, problem.tile, problem.kernel.fused):
            rows = query_tile.queries
            o_tile, _ = _window_forward(problem, q, k, v, query_tile)
            out[:, :, rows].addcmul_(gates[2, :, :, rows], o_tile)
        plans = selection_plans(selected, problem.select_block, k.shape[2], problem.sides)
        o_slc, lse_slc = selection_forward(q, k, v, plans, problem.sides, problem.scale)
        out.addcmul_(gates[1], o_slc)
        # Saved (not held on ctx) so that activation checkpointing and offload hooks see it;
        # backward frees its storage once it has taken its row sums, before dq, dk, dv exist.
        ctx.save_for_backward(q, k, v, ck, cv, gates, o_slc, lse_slc, lse_cmp)
        ctx.problem, ctx.plans, ctx.selection_freed = problem, plans, False
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.selection_freed:
            raise LongctxError(
                "NSA's fused attention frees its selection output during backward, so it cannot "
                "be differentiated twice (retain_graph=True); recompute the forward instead"
            )
        q, k, v, ck, cv, gates, o_slc, lse_slc, lse_cmp = ctx.saved_tensors
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
        if problem.compressed is not None:
            dgates[0] = problem.compressed.backward(
                q, ck, cv, dout, gates[0], lse_cmp, (grads[0], grads[3], grads[4])
            )[..., None]
        gate = gates[2]
        for query_tile in plan_tiles(problem.window, problem.tile, problem.kernel.fused):
            rows = query_tile.queries
            o_tile, lse_tile = _window_forward(problem, q, k, v, query_tile)
            dout_tile = dout[:, :, rows]
            row_sums = (dout_tile.to(acc) * o_tile.to(acc)).sum(-1, keepdim=True)
            dgates[2, :, :, rows] = row_sums
            gate_tile = gate[:, :, rows]
            branch_dout = (dout_tile * gate_tile).to(q.dtype)  # d out_window
            safe_lse = torch.where(torch.isneginf(lse_tile), 0.0, lse_tile)
            delta = (row_sums * gate_tile.to(acc))[..., 0]  # rowsum(d o_window * o_window)
            q_tile = q[:, :, rows]
            for piece in query_tile.pieces:
                dq_p, dk_p, dv_p = problem.kernel.backward(
                    branch_dout, q_tile, k[:, :, piece.keys], v[:, :, piece.keys],
                    o_tile, safe_lse, delta, piece.kind,
                    piece_mask(problem.window, rows, piece), problem.scale,
                )  # fmt: skip
                grads[0][:, :, rows] += dq_p
                grads[1][:, :, piece.keys] += dk_p
                grads[2][:, :, piece.keys] += dv_p
        dgates[1] = slc_sums[..., None]
        selection_backward(
            dout, q, k, v, slc_sums, lse_slc, ctx.plans, problem.sides, problem.scale,
            grads[:3], gate=gates[1],
        )  # fmt: skip
        dq, dk, dv, dck, dcv = (
            None if g is None else g.to(x.dtype) for g, x in zip(grads, tensors)
        )
        return dq, dk, dv, dck, dcv, dgates.to(gates.dtype), None
