"""NSA's compressed branch, on materialised probabilities a chunk of queries at a time (SPECS 3.1).

Query t sees compressed block i (summarising tokens ``[i d, i d + l - 1]``) when
``t >= i d + l - 1`` and, with packed documents, when the block lies inside t's document. There
are only ``T / d`` compressed keys, and selection needs the branch's probabilities whole (summed
over each GQA group they are the selection's importance), so both passes form them explicitly
for a chunk of query rows against the blocks the chunk can see:

- forward (``forward``): scores, softmax, the importance, the output (one more GEMM on the
  probabilities) and lse [B, Hq, c];
- backward (``backward``): ``P = exp(S - lse)`` from the saved lse, ``dP = dout cv^T``, the
  gate's gradient ``rowsum(dout * o) = rowsum(P * dP)`` and ``dS = g P (dP - rowsum(P dP))``;
  five GEMMs per chunk (S, dP, dq, dck, dcv). The tiled flash path it replaces recomputed the
  output for that row sum first (seven GEMMs) and built a [tq, tk] additive mask per piece.

Chunks (``chunks``) hold at most ``STEP_ROWS`` rows and, per (sequence, head),
``STEP_ELEMENTS`` elements of [rows, blocks seen]: the temporaries stay in cache whatever T is, and early queries,
which see few blocks, go many at a time (at T=32768, ~300 chunks instead of 512 of 64 rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.nsa_selection import QueryKeySides

# Elements (rows x compressed blocks x heads x sequences) of one chunk: bounds its probability
# temporaries (2 MiB in float32, so the chunk's elementwise passes stay in cache) whatever T is.
# At T=32768 2**19 timed like 2**20 (NSA fwd+bwd 11.2 s) with a 7 MiB lower resident peak; at
# T=16384: 0.88/0.77/0.75 s for 2**18/2**20/2**22.
STEP_ELEMENTS = 2**19
# Most query rows in one chunk: bounds the chunk's copy of their q rows and the selection's
# top-n temporaries when the queries see few blocks.
STEP_ROWS = 512


@dataclass(frozen=True)
class CompressedChunk:
    """Query rows ``rows`` and the ``visible`` compressed blocks ending at or before their last
    query (so each row's softmax is whole here); ``seen`` [c, visible] causal visibility, whose
    first ``seen_by_all`` columns are all True; ``docs`` (block docs [B, visible], query docs
    [B, c]) with packed documents."""

    rows: slice
    visible: int
    seen: Tensor | None
    seen_by_all: int
    docs: tuple[Tensor, Tensor] | None


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
    queries' side, the block length ``block`` and stride, and the softmax scale."""

    sides: QueryKeySides
    block_ends: Tensor  # [nc] global position of each block's last token
    block_docs: Tensor | None
    block: int
    stride: int
    scale: float

    def chunks(self, sequences_heads: int) -> Iterator[CompressedChunk]:
        """Every query row, in chunks for ``sequences_heads`` (B x Hq) rows per query, with
        the compressed blocks each chunk sees (made one at a time: the visibility masks of all
        chunks together would be [Tq, nc / 2] bools, 32 MiB at T=32768)."""
        sides, count = self.sides, self.block_ends.shape[0]
        seen = (sides.q_positions - self.block + 1) // self.stride  # last block seen, per query
        widths = (seen + 1).clamp(0, count).tolist()
        for rows in _chunk_rows(widths, STEP_ELEMENTS // sequences_heads):
            query_pos, query_docs = sides.rows(rows)  # [c], [B, c]
            visible = max(widths[rows.start : rows.stop])
            ends = self.block_ends[:visible]
            docs = None
            if query_docs is not None:
                docs = (self.block_docs[:, :visible], query_docs)
            yield CompressedChunk(
                rows, visible, ends <= query_pos[:, None],
                int((ends <= query_pos.min()).sum()), docs,
            )  # fmt: skip

    def _scores(self, queries: Tensor, ck: Tensor, chunk: CompressedChunk) -> Tensor:
        """Masked scaled scores [B, Hkv, G, c, visible] (-inf where hidden) of queries
        [B, Hkv, G c, D] against ck [B, Hkv, nc, D] (pre-scaled, accumulation dtype)."""
        batch, kv_heads = queries.shape[:2]
        count = chunk.rows.stop - chunk.rows.start
        scores = queries @ ck[:, :, : chunk.visible].transpose(-1, -2)  # [B, Hkv, G c, nv]
        scores = scores.view(batch, kv_heads, -1, count, chunk.visible)
        if chunk.docs is None:  # only the columns after the ones every query sees can hide
            cut = chunk.seen_by_all
            scores[..., cut:].masked_fill_(~chunk.seen[:, cut:], float("-inf"))
        else:  # [B, c, nv]
            block_docs, query_docs = chunk.docs
            seen = chunk.seen & (block_docs[:, None, :] == query_docs[:, :, None])
            scores.masked_fill_(~seen[:, None, None], float("-inf"))
        return scores

    def scaled_keys(self, ck: Tensor) -> Tensor:
        """ck [B, Hkv, nc, D] in the accumulation dtype (float32 at least), times the scale."""
        return ck.to(torch.promote_types(ck.dtype, torch.float32)) * self.scale

    def forward(
        self, q: Tensor, ck: Tensor, cv: Tensor, chunk: CompressedChunk
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The branch on ``chunk`` (which sees a block): q [B, Hq, Tq, D]; ck from
        ``scaled_keys``, cv [B, Hkv, nc, D] in ck's dtype. Returns the probabilities summed
        over each GQA group [B, Hkv, c, visible] (the importance), the output [B, Hq, c, D]
        and lse [B, Hq, c] (0 and -inf for a query that sees no block)."""
        batch, heads, _, dim = q.shape
        kv_heads = ck.shape[1]
        rows = chunk.rows
        queries = q[:, :, rows].reshape(batch, kv_heads, -1, dim).to(ck.dtype)  # [B,Hkv,Gc,D]
        scores = self._scores(queries, ck, chunk)
        row_max = scores.amax(-1, keepdim=True)  # [B, Hkv, G, c, 1]
        row_max = torch.where(torch.isneginf(row_max), 0.0, row_max)  # sees no block
        probs = scores.sub_(row_max).exp_()
        total = probs.sum(-1, keepdim=True)
        probs = probs.div_(torch.where(total > 0, total, 1.0))
        out = probs.view(batch, kv_heads, -1, chunk.visible) @ cv[:, :, : chunk.visible]
        lse = (row_max + total.log()).view(batch, heads, -1)  # log 0 = -inf: sees nothing
        return probs.sum(2), out.view(batch, heads, -1, dim), lse

    def backward(
        self,
        q: Tensor,
        ck: Tensor,
        cv: Tensor,
        dout: Tensor,
        gate: Tensor,
        lse: Tensor,
        grads: tuple[Tensor, Tensor, Tensor],
    ) -> Tensor:
        """Add the branch's gradients into ``grads`` = (dq [B, Hq, Tq, D], dck, dcv
        [B, Hkv, nc, D], accumulation dtype) in place, for out += gate * o_cmp: q, ck, cv as
        in forward (ck unscaled), dout [B, Hq, Tq, D], gate [B, Hq, Tq, 1], lse [B, Hq, Tq]
        as forward returned it. Returns the gate's gradient ``rowsum(dout * o_cmp)``
        [B, Hq, Tq] (0 where no block is seen)."""
        batch, heads, length, dim = q.shape
        kv_heads = ck.shape[1]
        dq = grads[0]
        dck, dcv = (x.flatten(0, 1) for x in grads[1:])  # [B Hkv, nc, D] views
        keys, values = self.scaled_keys(ck), cv.to(dq.dtype)
        gate_sums = torch.zeros(batch, heads, length, dtype=dq.dtype, device=q.device)
        for chunk in self.chunks(batch * heads):
            if not chunk.visible:
                continue
            rows, shown = chunk.rows, slice(0, chunk.visible)
            queries, douts, gates = (  # [B, Hq, Tq, *] -> the rows' [B, Hkv, G c, *]
                x[:, :, rows].reshape(batch, kv_heads, -1, x.shape[-1]).to(dq.dtype)
                for x in (q, dout, gate)
            )
            count = rows.stop - rows.start
            safe_lse = lse[:, :, rows].reshape(batch, kv_heads, -1, count, 1)
            safe_lse = torch.where(torch.isneginf(safe_lse), 0.0, safe_lse)  # exp(-inf) = 0
            probs = self._scores(queries, keys, chunk).sub_(safe_lse).exp_()  # [B,Hkv,G,c,nv]
            probs = probs.view(batch, kv_heads, -1, chunk.visible)  # [B, Hkv, G c, nv]
            dprobs = douts @ values[:, :, shown].transpose(-1, -2)  # ungated
            flat_probs = probs.flatten(0, 1)  # [B Hkv, G c, nv]
            dcv[:, shown].baddbmm_(flat_probs.transpose(1, 2), (douts * gates).flatten(0, 1))
            dscores = dprobs.mul_(probs)
            sums = dscores.sum(-1, keepdim=True)  # rowsum(dout * o_cmp) [B, Hkv, G c, 1]
            dscores = dscores.addcmul_(probs, sums, value=-1.0)  # P (dP - rowsum(P dP)), ungated
            dq[:, :, rows] += ((dscores @ keys[:, :, shown]) * gates).view(batch, heads, -1, dim)
            dck[:, shown].baddbmm_(
                dscores.flatten(0, 1).transpose(1, 2), (queries * gates).flatten(0, 1),
                alpha=self.scale,
            )  # fmt: skip
            gate_sums[:, :, rows] = sums.view(batch, heads, -1)
        return gate_sums
