"""Blockwise attention (SPECS.md 1.2): cut a masked attention call into tile pieces a kernel can do.

A plan lists, per query tile, the key ranges ("pieces") it must visit: EMPTY tile pairs are
skipped, FULL ones need no mask, a causal diagonal needs only the kernel's own ``is_causal``,
and the remaining PARTIAL pairs get a small bool mask built on demand from the ``MaskSpec``.
The executor runs a ``TileKernel`` on each piece and merges the partial (out, lse) of a query
tile with ``merge_partials``; its backward gives each piece the FINAL out/lse of its query
tile (SPECS 1.1), so no piece result is kept. Memory: one query tile's pieces at a time.

Kernels that tile internally (``fused``: the CPU flash op, flash-attn) get whole runs of FULL
tiles as one piece and, when the entire call is FULL or one causal diagonal, a single piece.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from longctx.attention.mask import MaskSpec, TileClass
from longctx.attention.merge import merge_partials


class PieceKind(Enum):
    """How the keys of one piece are masked for its query tile."""

    FULL = "full"  # every key visible
    CAUSAL = "causal"  # aligned diagonal: query i sees key j iff j <= i
    MASKED = "masked"  # an explicit bool mask [Bm, tq, tk]


@dataclass(frozen=True)
class Piece:
    keys: slice  # key index range
    kind: PieceKind


@dataclass(frozen=True)
class QueryTile:
    queries: slice  # query index range
    pieces: tuple[Piece, ...]


class TileKernel(Protocol):
    """Attention of one query tile against one key piece; tensors are [B, H, t, D] views.

    ``fused``: computes large pieces without materialising their scores. ``takes_delta``: its
    backward uses the given ``delta = rowsum(dout * out) - dlse`` (so it can honour a gradient
    on lse); kernels that recompute delta from ``out`` themselves cannot.
    """

    fused: bool
    takes_delta: bool

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, kind: PieceKind, visible: Tensor | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        """-> out [B, Hq, tq, D], lse [B, Hq, tq] (-inf where no key is visible, out 0 there)."""
        ...

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
        """-> dq [B, Hq, tq, D], dk, dv [B, Hkv, tk, D]; ``lse`` is final, with -inf set to 0."""
        ...


class TileBias(Protocol):
    """An additive term on the scaled scores, made per (query tile, key piece) on the fly and
    handed its gradient per piece (``attention/biased.py``: BAM's prior, SSMax's factor).
    Only kernels that ``takes_bias`` (the plain-torch one) run with one."""

    def write_to(
        self, out: Tensor, queries: slice, keys: slice, row_shift: Tensor | None = None
    ) -> None:
        """Write the bias of queries ``queries`` against keys ``keys``, plus
        ``row_shift[..., None]`` ([B, Hq, tq]) unless None, into ``out`` [B, Hq, tq, tk]
        (compute dtype); the kernel's score GEMM then adds the scaled scores onto it."""
        ...

    def accumulate(self, queries: slice, keys: slice, grad: Tensor) -> None:
        """Take the gradient [B, Hq, tq, tk] of that tile's bias."""
        ...


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def plan_tiles(mask: MaskSpec, tile: int, fused: bool) -> list[QueryTile]:
    """The pieces each query tile visits under a bound ``mask``; tiles of ``tile`` tokens."""
    tq, tk = mask.q_positions.shape[0], mask.k_positions.shape[0]
    if tq == 0 or tk == 0:
        return []
    if fused:
        whole, diagonal = mask.classify_tiles(tq, tk)
        if whole[0, 0] == TileClass.FULL or diagonal[0, 0]:
            kind = PieceKind.CAUSAL if diagonal[0, 0] else PieceKind.FULL
            return [QueryTile(slice(0, tq), (Piece(slice(0, tk), kind),))]
        if whole[0, 0] == TileClass.EMPTY:
            return []
    classes, diagonal = mask.classify_tiles(tile, tile)
    plan = []
    for i, (row, diag_row) in enumerate(zip(classes.tolist(), diagonal.tolist())):
        pieces: list[Piece] = []
        run_start = None  # first key tile of an open run of FULL tiles (fused kernels only)
        for j, (cls, diag) in enumerate(zip(row, diag_row)):
            if cls == TileClass.FULL and fused:
                run_start = j if run_start is None else run_start
                continue
            if run_start is not None:
                pieces.append(Piece(slice(run_start * tile, j * tile), PieceKind.FULL))
                run_start = None
            keys = slice(j * tile, min((j + 1) * tile, tk))
            if cls == TileClass.FULL:
                pieces.append(Piece(keys, PieceKind.FULL))
            elif cls == TileClass.PARTIAL:
                pieces.append(Piece(keys, PieceKind.CAUSAL if diag else PieceKind.MASKED))
        if run_start is not None:
            pieces.append(Piece(slice(run_start * tile, tk), PieceKind.FULL))
        if pieces:
            plan.append(QueryTile(slice(i * tile, min((i + 1) * tile, tq)), tuple(pieces)))
    return plan


def piece_mask(mask: MaskSpec, queries: slice, piece: Piece) -> Tensor | None:
    """The bool visibility [Bm, tq, tk] of a MASKED piece for the query tile ``queries`` (None
    for FULL and causal pieces, which need no mask)."""
    if piece.kind is not PieceKind.MASKED:
        return None
    return mask.slice(queries, piece.keys).dense_mask()  # [Bm, tq, tk]


def _covers_everything(plan: list[QueryTile], tq: int, tk: int) -> bool:
    if len(plan) != 1 or len(plan[0].pieces) != 1:
        return False
    queries, keys = plan[0].queries, plan[0].pieces[0].keys
    return (queries.start, queries.stop, keys.start, keys.stop) == (0, tq, 0, tk)


def _bias_args(bias: TileBias | None, queries: slice, keys: slice) -> dict[str, Callable]:
    """The ``write_bias=`` keyword of one piece's kernel call (none without a bias)."""
    if bias is None:
        return {}
    return {"write_bias": partial(bias.write_to, queries=queries, keys=keys)}


def tiled_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    mask: MaskSpec,
    kernel: TileKernel,
    tile: int,
    bias: TileBias | None = None,
) -> tuple[Tensor, Tensor]:
    """Blockwise attention: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], bound ``mask``, optional
    additive ``bias`` on the scores (a kernel that ``takes_bias``).

    Returns out [B, Hq, Tq, D] in q's dtype and lse [B, Hq, Tq] (float32; float64 inputs keep
    float64). Query rows that no piece reaches keep out 0 and lse -inf.
    """
    batch, heads, tq, _ = q.shape
    lse_dtype = compute_dtype(q.dtype)
    plan = plan_tiles(mask, tile, kernel.fused)
    if _covers_everything(plan, tq, k.shape[2]):
        piece = plan[0].pieces[0]
        visible = piece_mask(mask, slice(None), piece)
        extra = _bias_args(bias, slice(None), slice(None))
        out, lse = kernel.forward(q, k, v, piece.kind, visible, scale, **extra)
        return out.to(q.dtype), lse.to(lse_dtype)
    out = torch.zeros_like(q)
    lse = torch.full((batch, heads, tq), float("-inf"), dtype=lse_dtype, device=q.device)
    for query_tile in plan:
        rows = query_tile.queries
        q_tile = q[:, :, rows]
        merged = None
        for piece in query_tile.pieces:
            visible = piece_mask(mask, rows, piece)
            part = kernel.forward(
                q_tile, k[:, :, piece.keys], v[:, :, piece.keys], piece.kind, visible, scale,
                **_bias_args(bias, rows, piece.keys),
            )  # fmt: skip
            merged = part if merged is None else merge_partials(*merged, *part)
        out[:, :, rows] = merged[0].to(q.dtype)
        lse[:, :, rows] = merged[1].to(lse_dtype)
    return out, lse


def tiled_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    scale: float,
    mask: MaskSpec,
    kernel: TileKernel,
    tile: int,
    bias: TileBias | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the block (q, k, v) given the FINAL ``out``/``lse`` and their gradients.

    ``dlse`` (gradient reaching lse, or None) is honoured only by kernels with ``takes_delta``
    (callers route it there). Returns dq [B, Hq, Tq, D], dk, dv [B, Hkv, Tk, D] in the input
    dtypes; accumulation in float32. A ``bias`` (as in the forward) is recomputed per piece
    and receives its gradient through ``bias.accumulate``.
    """
    acc_dtype = compute_dtype(q.dtype)
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # rows seeing nothing
    delta = (dout.to(acc_dtype) * out.to(acc_dtype)).sum(-1)  # [B, Hq, Tq]
    if dlse is not None:
        delta = delta - dlse.to(acc_dtype)  # d lse / d s_j = p_j folds into the softmax term
    plan = plan_tiles(mask, tile, kernel.fused)
    if _covers_everything(plan, q.shape[2], k.shape[2]):
        piece = plan[0].pieces[0]
        visible = piece_mask(mask, slice(None), piece)
        extra = _bias_args(bias, slice(None), slice(None))
        grads = kernel.backward(
            dout, q, k, v, out, safe_lse, delta, piece.kind, visible, scale, **extra
        )
        if bias is not None:
            bias.accumulate(slice(None), slice(None), grads[3])
        return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
    for query_tile in plan:
        rows = query_tile.queries
        tile_args = (dout[:, :, rows], q[:, :, rows])
        tile_out, tile_lse, tile_delta = out[:, :, rows], safe_lse[:, :, rows], delta[:, :, rows]
        for piece in query_tile.pieces:
            keys = piece.keys
            visible = piece_mask(mask, rows, piece)
            grads = kernel.backward(
                *tile_args, k[:, :, keys], v[:, :, keys], tile_out, tile_lse, tile_delta,
                piece.kind, visible, scale, **_bias_args(bias, rows, keys),
            )  # fmt: skip
            dq_p, dk_p, dv_p = grads[:3]
            if bias is not None:
                bias.accumulate(rows, keys, grads[3])
            dq[:, :, rows] += dq_p
            dk[:, :, keys] += dk_p
            dv[:, :, keys] += dv_p
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def visible_key_counts(mask: MaskSpec, tile: int) -> Tensor:
    """How many keys each query sees under a bound ``mask``: [Bm, Tq] int64 (Bm = B with doc
    ids, else 1), counted tile by tile from the plan (FULL pieces by their length, causal
    diagonals by row index, the rest from their small masks), never a Tq x Tk matrix."""
    tq = mask.q_positions.shape[0]
    rows = 1 if mask.q_doc_ids is None else mask.q_doc_ids.shape[0]
    counts = torch.zeros(rows, tq, dtype=torch.long, device=mask.q_positions.device)
    for query_tile in plan_tiles(mask, tile, fused=False):
        queries = query_tile.queries
        for piece in query_tile.pieces:
            if piece.kind is PieceKind.FULL:
                counts[:, queries] += piece.keys.stop - piece.keys.start
            elif piece.kind is PieceKind.CAUSAL:
                counts[:, queries] += torch.arange(
                    1, queries.stop - queries.start + 1, device=counts.device
                )
            else:
                counts[:, queries] += piece_mask(mask, queries, piece).sum(-1)
    return counts
