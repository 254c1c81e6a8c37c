"""NSA's compressed and sliding-window branches, on materialised probabilities a chunk of query
rows at a time (SPECS 3.1).

Both branches see a narrow key range per query chunk: the ``T / d`` compressed blocks ending at
or before the chunk's queries (query t sees block i, summarising tokens ``[i d, i d + l - 1]``,
when ``t >= i d + l - 1``), or the ``w`` raw tokens up to each query (``0 <= t - j < w``); with
packed documents a key must also lie in the query's document (a compressed block spanning two
documents lies in none). So each chunk's probabilities [B, Hkv, G c, n] are formed whole, small
enough to stay in cache:

- forward (``attend``): scores, softmax, the output (``P V``) and lse [B, Hq, c]. Selection
  also reads the compressed branch's probabilities (summed over a GQA group they are its
  importance), so that branch's forward runs inside the selection's importance pass.
- backward (``branch_backward``): ``P = exp(S - lse)`` from the saved lse, ``dP = dout V^T``,
  the gate's gradient ``rowsum(dout * o) = rowsum(P * dP)`` and ``dS = g P (dP - rowsum(P dP))``:
  five GEMMs per chunk (S, dP, dq, dk, dv) and no output. A flash-style backward would first
  recompute the output for that row sum (seven GEMMs), and the output itself cannot be kept
  within NSA's memory bound (one more [B, Hq, T, D] per branch).

Measured at T=32768 (one thread, B=1, Hq=8, Hkv=2, D=64, w=512, fp32): the window branch's
forward + backward 1.9 s with 64-row tiles against ~2.4 s on the fused CPU flash op (forward,
recompute, flash backward, per-piece additive masks); the compressed branch's backward 2.0 s
against ~2.5 s.

Compressed chunks hold at most ``STEP_ROWS`` rows and, per (sequence, head), ``STEP_ELEMENTS``
elements of [rows, blocks seen] on the CPU (``ACCELERATOR_STEP_ELEMENTS`` elsewhere): the
temporaries stay in cache whatever T is, and early queries, which see few blocks, go many at a
time. Window chunks are ``tile`` consecutive positions (``WINDOW_TILE`` on the CPU,
``ACCELERATOR_WINDOW_TILE`` elsewhere, unless attention.chunk_size sets it): tile + w - 1 keys
each.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.nsa_selection import QueryKeySides
from longctx.attention.tiling import compute_dtype

# Elements (rows x compressed blocks x heads x sequences) of one compressed chunk: bounds its
# probability temporaries (2 MiB in float32, so the chunk's elementwise passes stay in cache)
# whatever T is. At T=32768 the compressed backward took 2.04 / 2.03 / 2.27 / 2.75 s at
# 2**18 / 2**19 / 2**20 / 2**21, the forward 1.28 / 1.09 / 1.13 / 1.11 s.
STEP_ELEMENTS = 2**19
# The same bound on an accelerator, where a chunk's cost is kernel launches, not cache misses:
# at T=128k with 4 query heads per rank, 2**19 elements would be ~65k chunks of 2 rows per
# layer; 2**25 (128 MiB per float32 temporary) makes it 256 chunks of 512 rows. Untuned: no GPU
# has run it.
ACCELERATOR_STEP_ELEMENTS = 2**25
# Most query rows in one compressed chunk: bounds the chunk's copy of their q rows and the
# selection's top-n temporaries when the queries see few blocks.
STEP_ROWS = 512
# Query rows per window chunk when the recipe sets no attention.chunk_size. At T=32768,
# w=512 (fwd + bwd, one thread): 1.8 / 1.9 / 2.4 s at 64 / 128 / 256 rows (tile + w - 1 keys
# each, of which w are visible per row).
WINDOW_TILE = 64
# Window tile on an accelerator: fewer, larger chunks (launches, not cache, bound them there;
# 256 rows meet 767 keys for 512 visible per row). Untuned: no GPU has run it.
ACCELERATOR_WINDOW_TILE = 256


@dataclass(frozen=True)
class BranchChunk:
    """Query rows ``rows`` against the branch's keys ``keys`` (a slice of its key tensor):
    ``hidden`` [c, n - cut] or [B, c, n - cut] is True where a query must not see a key of
    columns ``cut ..`` of the range (the first ``cut`` columns every row sees); None: all
    visible."""

    rows: slice
    keys: slice
    hidden: Tensor | None
    cut: int = 0

    @property
    def width(self) -> int:
        return self.keys.stop - self.keys.start

    def hide(self, scores: Tensor) -> None:
        """Set hidden entries of ``scores`` [B, Hkv, G, c, n] to -inf, in place."""
        if self.hidden is None:
            return
        hidden = self.hidden if self.hidden.dim() == 2 else self.hidden[:, None, None]
        scores[..., self.cut :].masked_fill_(hidden, float("-inf"))


def _grouped_rows(x: Tensor, rows: slice, kv_heads: int, dtype: torch.dtype) -> Tensor:
    """A copy of rows ``rows`` of x [B, Hq, T, E] as [B, Hkv, G c, E] in ``dtype`` (query head
    h = j G + g under kv head j, its rows at g c ..)."""
    batch, heads, _, dim = x.shape
    count = rows.stop - rows.start
    grouped = torch.empty(batch, kv_heads, heads // kv_heads * count, dim, dtype=dtype,
                          device=x.device)  # fmt: skip
    grouped.view(batch, heads, count, dim).copy_(x[:, :, rows])
    return grouped


def transposed(x: Tensor) -> Tensor:
    """A contiguous [B, Hkv, D, Tk] copy of keys or values x [B, Hkv, Tk, D]: the score GEMMs
    then read a chunk's columns as a plain row-major slice. Worth it for the compressed keys
    (T / d of them; at T=32768 a [128, 64] x [64, 2047] score GEMM took 0.40 ms against
    0.49 ms on the transposed view), not for the raw ones (a copy of the whole sequence)."""
    return x.transpose(-1, -2).contiguous()


def _columns(x: Tensor, x_t: Tensor | None, chunk: BranchChunk, dtype: torch.dtype) -> Tensor:
    """The chunk's keys (or values) as [B, Hkv, D, n]: from ``x_t`` (``transposed``) when
    given, else a transposed view of x [B, Hkv, Tk, D]."""
    if x_t is not None:
        return x_t[..., chunk.keys].to(dtype)
    return x[:, :, chunk.keys].to(dtype).transpose(-1, -2)


def attend(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    chunk: BranchChunk,
    scale: float,
    keys_t: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact attention of q's rows ``chunk.rows`` (q [B, Hq, Tq, D]) over ``chunk.keys`` of
    keys, values [B, Hkv, Tk, D] (``keys_t``: optionally ``transposed(keys)``): the
    probabilities [B, Hkv, G, c, n], out [B, Hq, c, D] and lse [B, Hq, c] in the accumulation
    dtype (out 0 and lse -inf for a row that sees no key)."""
    batch, heads, _, dim = q.shape
    kv_heads, acc = keys.shape[1], compute_dtype(q.dtype)
    count = chunk.rows.stop - chunk.rows.start
    queries = _grouped_rows(q, chunk.rows, kv_heads, acc).mul_(scale)  # [B, Hkv, G c, D]
    scores = queries @ _columns(keys, keys_t, chunk, acc)  # [B, Hkv, G c, n]
    scores = scores.view(batch, kv_heads, -1, count, chunk.width)
    chunk.hide(scores)
    row_max = scores.amax(-1, keepdim=True)  # [B, Hkv, G, c, 1]
    row_max = torch.where(torch.isneginf(row_max), 0.0, row_max)  # sees no key
    probs = scores.sub_(row_max).exp_()
    total = probs.sum(-1, keepdim=True)
    probs = probs.div_(torch.where(total > 0, total, 1.0))
    out = probs.view(batch, kv_heads, -1, chunk.width) @ values[:, :, chunk.keys].to(acc)
    lse = (row_max + total.log()).view(batch, heads, count)  # log 0 = -inf: sees nothing
    return probs, out.view(batch, heads, count, dim), lse


def branch_backward(
    chunks: Iterator[BranchChunk],
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    dout: Tensor,
    gate: Tensor,
    lse: Tensor,
    scale: float,
    grads: tuple[Tensor, Tensor, Tensor],
    keys_t: Tensor | None = None,
    values_t: Tensor | None = None,
) -> Tensor:
    """Add one branch's gradients into ``grads`` = (dq [B, Hq, Tq, D], dkeys, dvalues
    [B, Hkv, Tk, D], accumulation dtype, any layout) in place, for ``out += gate * o`` with o
    the branch's attention over ``chunks``: q, keys, values as ``attend`` took them (with
    optionally their ``transposed`` copies), dout [B, Hq, Tq, D], gate [B, Hq, Tq, 1], lse
    [B, Hq, Tq] as ``attend`` returned it. Returns the gate's gradient ``rowsum(dout * o)``
    [B, Hq, Tq] (0 where no key is seen)."""
    batch, heads, length, dim = q.shape
    kv_heads = keys.shape[1]
    dq, dkeys, dvalues = grads
    acc = dq.dtype
    gate_sums = torch.zeros(batch, heads, length, dtype=acc, device=q.device)
    finite_lse = torch.where(torch.isneginf(lse), 0.0, lse)  # a row that sees nothing: P = 0
    for chunk in chunks:
        if not chunk.width:
            continue
        rows, count = chunk.rows, chunk.rows.stop - chunk.rows.start
        queries = _grouped_rows(q, rows, kv_heads, acc).mul_(scale)  # [B, Hkv, G c, D]
        douts, gates = (_grouped_rows(x, rows, kv_heads, acc) for x in (dout, gate))
        keys_c = keys[:, :, chunk.keys].to(acc)
        lse_rows = finite_lse[:, :, rows].reshape(batch, kv_heads, -1, count, 1)
        scores = queries @ _columns(keys, keys_t, chunk, acc)
        scores = scores.view(batch, kv_heads, -1, count, chunk.width)
        chunk.hide(scores)
        probs = scores.sub_(lse_rows).exp_().view(batch, kv_heads, -1, chunk.width)
        dprobs = douts @ _columns(values, values_t, chunk, acc)  # [B, Hkv, G c, n], ungated
        gated_douts, gated_queries = douts.mul_(gates), queries.mul_(gates)
        for b in range(batch):  # accumulated inside the GEMM, into any layout of dvalues
            dvalues[b, :, chunk.keys].baddbmm_(probs[b].transpose(1, 2), gated_douts[b])
        dscores = dprobs.mul_(probs)
        sums = dscores.sum(-1, keepdim=True)  # rowsum(dout * o) [B, Hkv, G c, 1]
        dscores = dscores.addcmul_(probs, sums, value=-1.0)  # P (dP - rowsum(P dP)), ungated
        dq[:, :, rows] += (dscores @ keys_c).mul_(gates * scale).view(batch, heads, count, dim)
        for b in range(batch):
            dkeys[b, :, chunk.keys].baddbmm_(dscores[b].transpose(1, 2), gated_queries[b])
        gate_sums[:, :, rows] = sums.view(batch, heads, count)
    return gate_sums


def _chunk_rows(widths: list[int], budget: int) -> list[slice]:
    """Consecutive query rows cut into chunks of at most ``STEP_ROWS`` rows whose rows x widest
    row (compressed blocks seen) stays within ``budget`` (one row at least)."""
    chunks, start, widest = [], 0, 1
    for row, width in enumerate(widths):
        wider = max(widest, width)
        rows = row - start + 1
        if rows > 1 and (rows > STEP_ROWS or rows * wider > budget):
            chunks.append(slice(start, row))
            start, wider = row, max(width, 1)
        widest = wider
    return chunks + [slice(start, len(widths))] if widths else []


@dataclass(frozen=True)
class CompressedBranch:
    """The compressed branch of one NSA call: where its ``len(block_ends)`` blocks end, their
    documents (``block_docs`` [B, nc], -1 for a block spanning two; None unpacked), the
    queries' side, the block length ``block`` and ``stride``."""

    sides: QueryKeySides
    block_ends: Tensor  # [nc] global position of each block's last token
    block_docs: Tensor | None
    block: int
    stride: int

    def chunks(self, sequences_heads: int) -> Iterator[BranchChunk]:
        """Every query row, in chunks for ``sequences_heads`` (B x Hq) rows per query, with
        the compressed blocks each chunk sees: those ending at or before its last query, so
        every row's softmax is whole in its chunk (a chunk that sees none has an empty key
        range). Made one at a time: the masks of all chunks together would be [Tq, nc / 2]
        bools, 32 MiB at T=32768."""
        sides, count = self.sides, self.block_ends.shape[0]
        seen = (sides.q_positions - self.block + 1) // self.stride  # last block seen, per query
        widths = (seen + 1).clamp(0, count).tolist()
        on_cpu = self.block_ends.device.type == "cpu"
        budget = (STEP_ELEMENTS if on_cpu else ACCELERATOR_STEP_ELEMENTS) // sequences_heads
        for rows in _chunk_rows(widths, budget):
            query_pos, query_docs = sides.rows(rows)  # [c], [B, c]
            visible = max(widths[rows.start : rows.stop])
            ends = self.block_ends[:visible]
            seen = ends <= query_pos[:, None]  # [c, visible]
            if query_docs is None:  # only the columns after the ones every query sees can hide
                cut = int((ends <= query_pos.min()).sum())
                yield BranchChunk(rows, slice(0, visible), ~seen[:, cut:], cut)
            else:
                same = self.block_docs[:, None, :visible] == query_docs[:, :, None]
                yield BranchChunk(rows, slice(0, visible), ~(seen & same))


@dataclass(frozen=True)
class WindowBranch:
    """The sliding-window branch of one NSA call: each query sees the ``window`` raw tokens up
    to its own (of its document), in chunks of ``tile`` consecutive query positions."""

    sides: QueryKeySides
    window: int
    tile: int

    def chunks(self, sequences_heads: int) -> Iterator[BranchChunk]:
        """Runs of consecutive query positions (all of them unsharded; a rank's zigzag chunks
        under the ring group) cut into tiles; tile rows at positions p .. p + c - 1 meet keys
        ``p - w + 1 .. p + c - 1``. ``sequences_heads`` is unused: a tile's size is fixed."""
        sides = self.sides
        positions = sides.q_positions.tolist()
        starts = [i for i in range(1, len(positions)) if positions[i] != positions[i - 1] + 1]
        bounds = [0, *starts, len(positions)]
        # A tile's window mask depends only on its shape and on how far its first query is
        # past its first key, the same for every tile past the first window: made once.
        masks: dict[tuple[int, int, int], Tensor] = {}
        for run_start, run_stop in zip(bounds, bounds[1:]):
            for start in range(run_start, run_stop, self.tile):
                rows = slice(start, min(start + self.tile, run_stop))
                first, last = positions[start], positions[rows.stop - 1]
                keys = slice(max(0, first - self.window + 1), last + 1)
                shape = (rows.stop - rows.start, keys.stop - keys.start, first - keys.start)
                if shape not in masks:
                    masks[shape] = self._window_mask(*shape)
                hidden = masks[shape]
                if sides.q_doc_ids is not None:
                    other = sides.k_doc_ids[:, None, keys] != sides.q_doc_ids[:, rows, None]
                    hidden = hidden | other  # [B, c, n]
                yield BranchChunk(rows, keys, hidden)

    def _window_mask(self, count: int, width: int, lead: int) -> Tensor:
        """[count, width] True where query i (``lead + i`` keys past the tile's first key) must
        not see key c: c after the query, or ``window`` or more keys before it."""
        device = self.sides.q_positions.device
        offsets = (
            torch.arange(width, device=device)[None, :]
            - torch.arange(lead, lead + count, device=device)[:, None]
        )  # key position - query position
        return (offsets > 0) | (offsets <= -self.window)
