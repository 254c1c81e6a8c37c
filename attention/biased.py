"""Flash-style tiled attention with a relative-position bias: BAM's prior and SSMax per tile.

``relative_bias_attention`` computes, exactly,

    logits_ij = m_i * (q_i . k_j * scale + table_h[d_ij]),   d_ij = q_pos[i] - k_pos[j]

with a per-head value per integer distance (``table`` [H, N], entry n for distance
``min_distance + n``) and an optional per-row multiplier ``m`` [Bm, H, Tq] (SSMax's
``s_h ln n_i``; None means 1). It runs in the blockwise executor of ``tiling.py`` with the
plain-torch tile kernel: every (query tile, key tile) pair builds its [H, tq, tk] bias on the
fly from the table (a Toeplitz view of it when both tiles are runs of consecutive positions, a
gather otherwise) and writes it, times ``m``, as the initial value of the tile's score GEMM
(which adds q . k onto it in the same pass), then merges the tile by online softmax; the
backward writes ``bias - lse`` there instead, recomputes the tile's probabilities from the
FINAL out/lse (SPECS 1.1) and folds the tile's score gradient back onto the table (summed
along the tile's diagonals, which share a distance) and onto ``m`` (row sums). Nothing larger
than a tile pair is ever built, so memory is O(T) beyond the inputs: q, k, v, out, lse, the
O(T x H) table and ``m``.

Why a table: a position-only prior such as BAM's ``-exp(a_h) |d - mu_h|^b_h`` takes one ``pow``
per entry, T^2 of them per head, whereas the table needs one per distance (at most
Tq + Tk - 1 per head); its gradient reaches the prior's parameters by ordinary autograd through
the table. SSMax enters as ``q_i * m_i`` (autograd, outside) plus the bias scaled by ``m_i``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from longctx.attention.mask import MaskSpec
from longctx.attention.tile_kernels import TorchTileKernel
from longctx.attention.tiling import compute_dtype, tiled_backward, tiled_forward

DEFAULT_TILE = 512  # tokens per query and key tile (the plain-torch kernel's fastest fwd+bwd)
_KERNEL = TorchTileKernel()


def _steps(positions: Tensor, step: int) -> Tensor:
    """[T] bool: entry t is True when ``positions[t] == positions[t - 1] + step`` (t >= 1)."""
    steps = torch.zeros_like(positions, dtype=torch.bool)
    steps[1:] = positions[1:] - positions[:-1] == step
    return steps


class RelativePositionBias:
    """The ``TileBias`` of one call: bias ``m_i * table_h[q_pos[i] - k_pos[j]]`` per tile.

    ``table`` [H, N] (compute dtype), ``row_scale`` [Bm, H, Tq] or None, positions from the
    bound ``mask``, whose keys come in DECREASING order (``relative_bias_attention`` reverses
    them): then a query tile of consecutive positions against a key tile of consecutive
    positions has distance ``i0 + r + c`` at row r, column c, and its bias is a strided view of
    the table (no copy; with increasing keys it would need a negative stride). Other tiles
    gather from the table. With ``track_grad`` the tiles' gradients accumulate into
    ``table_grad`` [H, N] and ``row_scale_grad`` [Bm, H, Tq].
    """

    def __init__(
        self,
        table: Tensor,
        min_distance: int,
        row_scale: Tensor | None,
        mask: MaskSpec,
        track_grad: bool = False,
    ):
        self.table = table.contiguous()
        self.min_distance = min_distance
        self.row_scale = row_scale
        self.q_positions, self.k_positions = mask.q_positions, mask.k_positions
        self._q_steps, self._k_steps = _steps(self.q_positions, 1), _steps(self.k_positions, -1)
        # per tile, asked by every tile pair in forward and backward: host-side answers
        self._q_list, self._k_list = self.q_positions.tolist(), self.k_positions.tolist()
        self._is_run: dict[tuple[str, int, int], bool] = {}
        # float64 sums: each entry gathers O(T) tile sums whose terms mostly cancel (a softmax
        # gradient sums to 0 along its row), and the buffers are only O(T x H)
        wide = torch.float64
        self.table_grad = torch.zeros_like(self.table, dtype=wide) if track_grad else None
        self.row_scale_grad = (
            torch.zeros_like(row_scale, dtype=wide)
            if track_grad and row_scale is not None
            else None
        )
        self._skew_buffers: dict[tuple[int, ...], Tensor] = {}

    def _runs(self, queries: slice, keys: slice) -> bool:
        """Whether the query tile counts up and the key tile counts down by 1."""
        return self._run("q", self._q_steps, queries) and self._run("k", self._k_steps, keys)

    def _run(self, side: str, steps: Tensor, tile: slice) -> bool:
        start, stop, _ = tile.indices(len(steps))
        known = self._is_run.get((side, start, stop))
        if known is None:
            known = self._is_run[side, start, stop] = bool(steps[start + 1 : stop].all())
        return known

    def _first_index(self, queries: slice, keys: slice) -> int:
        """Table index of the distance between the tile's first query and first key."""
        first_query = self._q_list[queries.indices(len(self._q_list))[0]]
        first_key = self._k_list[keys.indices(len(self._k_list))[0]]
        return first_query - first_key - self.min_distance

    def _distance_index(self, queries: slice, keys: slice) -> Tensor:
        """[tq, tk] table index of every pair of the tile."""
        distance = self.q_positions[queries][:, None] - self.k_positions[keys][None, :]
        return distance - self.min_distance

    def _prior(self, queries: slice, keys: slice) -> Tensor:
        """The table's values on the tile: [H, tq, tk] (a view when both tiles are runs)."""
        if not self._runs(queries, keys):
            return self.table[:, self._distance_index(queries, keys)]
        heads, width = self.table.shape
        tq, tk = len(self._q_list[queries]), len(self._k_list[keys])
        start = self.table.storage_offset() + self._first_index(queries, keys)
        return self.table.as_strided((heads, tq, tk), (width, 1, 1), start)

    def write_to(
        self, out: Tensor, queries: slice, keys: slice, row_shift: Tensor | None = None
    ) -> None:
        """out [B, H, tq, tk] = the tile's bias (+ ``row_shift[..., None]``), in one pass."""
        prior = self._prior(queries, keys).expand_as(out)  # [B, H, tq, tk], stride 0 on B
        if self.row_scale is not None:
            row_scale = self.row_scale[:, :, queries, None]  # m_i: the bias is m_i * prior
            if row_shift is None:
                torch.mul(prior, row_scale, out=out)
            else:
                torch.addcmul(row_shift[..., None], prior, row_scale, out=out)
        elif row_shift is None:
            out.copy_(prior)
        else:
            torch.add(row_shift[..., None], prior, out=out)

    def accumulate(self, queries: slice, keys: slice, grad: Tensor) -> None:
        """grad [B, H, tq, tk] of the tile's bias -> ``table_grad`` and ``row_scale_grad``."""
        scale = None if self.row_scale is None else self.row_scale[:, :, queries]  # [Bm, H, tq]
        if self._runs(queries, keys):
            self._accumulate_diagonals(queries, keys, grad, scale)
            return
        prior = self._prior(queries, keys)  # [H, tq, tk]
        if scale is not None:
            self._add_row_grad(queries, (grad * prior).sum(-1))
        weighted = grad if scale is None else grad * scale[..., None]
        index = self._distance_index(queries, keys).flatten()
        self.table_grad.index_add_(1, index, weighted.sum(0).flatten(1).to(torch.float64))

    def _add_row_grad(self, queries: slice, row_grad: Tensor) -> None:
        """row_grad [B, H, tq] (summed over the batch when ``row_scale`` has one row)."""
        if self.row_scale_grad.shape[0] == 1:
            row_grad = row_grad.sum(0, keepdim=True)
        self.row_scale_grad[:, :, queries] += row_grad

    def _skew_buffer(self, grad: Tensor) -> Tensor:
        """A zeroed [B, H, tq, tq + tk - 1] buffer for ``grad``'s shape, kept between tiles:
        every tile of one shape writes the same band of it, so the rest stays zero."""
        batch, heads, tq, tk = grad.shape
        shape = (batch, heads, tq, tq + tk - 1)
        buffer = self._skew_buffers.get(shape)
        if buffer is None or buffer.dtype != grad.dtype:
            buffer = self._skew_buffers[shape] = grad.new_zeros(shape)
        return buffer

    def _accumulate_diagonals(
        self, queries: slice, keys: slice, grad: Tensor, scale: Tensor | None
    ) -> None:
        """The gradients of a tile of runs, whose entry (r, c) has table index i0 + r + c.

        Skewing: row r of grad [B, H, tq, tk], times ``scale`` (SSMax's m_r; 1 without), is
        written shifted by r into a [B, H, tq, tq + tk - 1] buffer, whose column t then holds
        index i0 + t: the table's gradient is the buffer's column sums. The row gradient of
        ``m`` is each row of grad against the tile's prior (a view of the table). Against two
        matrix-vector products over the half-empty buffer, 0.68 instead of 0.82 ms per
        2 x 512 x 512 tile."""
        batch, heads, tq, tk = grad.shape
        width = tq + tk - 1
        skewed = self._skew_buffer(grad)
        view = skewed.as_strided(
            (batch, heads, tq, tk), (heads * tq * width, tq * width, width + 1, 1)
        )
        if scale is None:
            view.copy_(grad)
        else:
            torch.mul(grad, scale[..., None], out=view)
            self._add_row_grad(queries, torch.linalg.vecdot(grad, self._prior(queries, keys)))
        first = self._first_index(queries, keys)
        self.table_grad[:, first : first + width] += skewed.sum((0, 2)).to(torch.float64)


def _flushes_denormals() -> bool:
    """Whether this thread's CPU flushes subnormal floats to zero (torch has no getter)."""
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


@contextmanager
def _denormals_flushed(device: torch.device) -> Iterator[None]:
    """Flush subnormals to zero on CPU while the kernel runs, then restore the setting.

    A strong prior makes many probabilities exp(-90..-104), subnormal in float32; CPUs compute
    with those tens of times slower (measured: a 512 x 512 tile's P @ V 8 ms instead of 0.3 ms).
    Flushing them changes each such probability by less than 1.2e-38."""
    if device.type != "cpu" or _flushes_denormals():
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class _RelativeBiasAttention(torch.autograd.Function):
    """out = tiled attention with the bias; backward recomputes tiles (nothing T x T saved).

    Forward and backward run the same plain-torch kernel on purpose: the backward's
    ``delta = rowsum(dout * out)`` must agree with the probabilities it recomputes, or the
    prior's gradient picks up ~eps x |dout| x |v| per row wherever one key takes all the
    weight (measured: torch's fused CPU op as the forward was 1.15x faster but put 10x that
    noise on a near-zero BAM shape gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, table, row_scale, min_distance, scale, mask, tile):
        bias = RelativePositionBias(table, min_distance, row_scale, mask)
        with _denormals_flushed(q.device):
            out, lse = tiled_forward(q, k, v, scale, mask, _KERNEL, tile, bias)
        ctx.save_for_backward(q, k, v, out, lse, table, row_scale)
        ctx.min_distance, ctx.scale, ctx.mask, ctx.tile = min_distance, scale, mask, tile
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, table, row_scale = ctx.saved_tensors
        bias = RelativePositionBias(table, ctx.min_distance, row_scale, ctx.mask, track_grad=True)
        with _denormals_flushed(q.device):
            dq, dk, dv = tiled_backward(
                dout, q, k, v, out, lse, None, ctx.scale, ctx.mask, _KERNEL, ctx.tile, bias
            )
        row_scale_grad = None if row_scale is None else bias.row_scale_grad.to(row_scale.dtype)
        table_grad = bias.table_grad.to(table.dtype)
        return dq, dk, dv, table_grad, row_scale_grad, None, None, None, None


def distance_range(mask: MaskSpec) -> tuple[int, int]:
    """(smallest, largest) ``q_pos - k_pos`` over a bound mask's pairs: the table's span."""
    q_pos, k_pos = mask.q_positions, mask.k_positions
    return int(q_pos.min() - k_pos.max()), int(q_pos.max() - k_pos.min())


def relative_bias_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    min_distance: int,
    *,
    mask: MaskSpec,
    row_scale: Tensor | None = None,
    scale: float | None = None,
    tile: int | None = None,
) -> Tensor:
    """Masked softmax attention with logits ``m_i (q_i . k_j scale + table[d_ij])``.

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (GQA), ``mask`` bound to (Tq, Tk) (positions global),
    ``table`` [Hq, N] with entry n for distance ``min_distance + n`` covering
    ``distance_range(mask)``, ``row_scale`` [Bm, Hq, Tq] or None, ``scale`` 1/sqrt(D) by
    default, ``tile`` tokens per tile (``DEFAULT_TILE``). -> out [B, Hq, Tq, D] in q's dtype,
    computed in float32 (float64 stays float64); rows without a visible key give 0.
    Differentiable w.r.t. q, k, v, ``table`` and ``row_scale``.
    """
    dtype = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scaled_q = q.to(dtype) * scale  # the kernel then skips its per-tile scaling pass
    if row_scale is not None:
        row_scale = row_scale.to(dtype)
        scaled_q = scaled_q * row_scale[..., None]  # [B, Hq, Tq, D]: m_i scale q_i . k_j
    # Keys in reverse order (see ``RelativePositionBias``); autograd reverses dk, dv back.
    reversed_keys = dataclasses.replace(
        mask,
        k_positions=mask.k_positions.flip(0),
        k_doc_ids=None if mask.k_doc_ids is None else mask.k_doc_ids.flip(1),
    )
    out = _RelativeBiasAttention.apply(
        scaled_q, k.to(dtype).flip(2), v.to(dtype).flip(2), table.to(dtype), row_scale, min_distance, 1.0,
        reversed_keys, tile or DEFAULT_TILE,
    )  # fmt: skip
    return out.to(q.dtype)
