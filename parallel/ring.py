"""Ring attention (SPECS 1.4): exact attention over a sequence spread across a process group.

Every rank of the ring keeps its query shard and passes its key/value shard around: at step t
rank r attends with the K,V block that started on rank (r - t) mod P, using the block's true
global positions (and doc ids) for the mask, and merges the partial result in float32 with the
log-sum-exp rule (``merge_partials``). The next block travels (``batch_isend_irecv`` into a
receive buffer, two alternating ones for rings larger than 2) while the current one is computed
on, so communication overlaps compute.

The backward needs only the FINAL merged ``out``/``lse`` (SPECS 1.1): K,V go round again, each
rank adds its query shard's share of dK,dV to an accumulator that travels with the block, and
after P steps every accumulator is back on the rank that owns the block. The accumulator is
exchanged in place between two steps, not under the next step's compute, so one accumulator is
alive instead of two (see ``_RingAttention.backward`` and the memory account below).

Work that the mask hides is skipped. The local query and key shards are each cut into two
halves (under the zigzag layout: the two chunks a rank holds) and every (query half, key half)
pair is classified from positions alone (``MaskSpec.classify``); EMPTY pairs are never computed.
Under zigzag causal attention this leaves, at every step after the first, two of the four
pairs (all queries against the first key half, or the second query half against all keys):
half the work of a full block, the same on every rank. Sliding windows and block-sparse patterns skip the same way.
The backward cuts each side finer (``BACKWARD_PARTS``) to keep one call's temporaries small.
GQA rotates only the Hkv key/value heads.

Memory per rank, in blocks (one [B, H, T_local, D] tensor; P=2, fp32, measured in bench/sp.py):
the caller's q, k, v and dout (4), out (1), the results dq (1) and dK,dV (2): 8 blocks, plus
one kernel call's temporaries (``BACKWARD_PARTS``), the 1/``PASS_PIECES`` staging buffer of the
accumulator exchange, and the last step's key segments. The backward's last step receives its
visiting K,V one key segment at a time (``_rotate_segments``: every query piece of a segment is
computed before the next segment is used), because nobody passes that block on; earlier steps
(P > 2) receive whole blocks, which the next rank needs whole one step later. Measured at
T=16k, P=2, H=4, D=64: 87.7 MiB per rank with a whole visiting block, 77.0 MiB in segments.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from longctx.attention.context import AttentionContext
from longctx.attention.dense import DenseAttention
from longctx.attention.kernels import block_attention, block_attention_backward
from longctx.attention.mask import BlockSparsePattern, MaskSpec, TileClass
from longctx.attention.merge import merge_partials


class RingExchange:
    """Send tensors to the next rank of a ring and receive the previous rank's, asynchronously.

    ``start(tensors, into)`` posts one isend per tensor to rank r+1 and one irecv per buffer of
    ``into`` from rank r-1 (group ranks, wrapped); ``wait()`` blocks until all have completed.
    Tensor i of an exchange uses tag ``tag + i``, so two exchanges in flight at once (K,V and
    the dK,dV accumulators of the backward) never match each other's messages.
    """

    def __init__(self, group: dist.ProcessGroup, tag: int = 0):
        self.group = group
        self.tag = tag
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next_rank = (self.rank + 1) % self.size
        self.prev_rank = (self.rank - 1) % self.size
        self._pending: list = []

    def start(self, tensors: list[Tensor], into: list[Tensor]) -> None:
        ops = [
            dist.P2POp(dist.isend, t, group=self.group, tag=self.tag + i, group_peer=self.next_rank)
            for i, t in enumerate(tensors)
        ]
        ops += [
            dist.P2POp(dist.irecv, t, group=self.group, tag=self.tag + i, group_peer=self.prev_rank)
            for i, t in enumerate(into)
        ]
        self._pending = dist.batch_isend_irecv(ops)

    def wait(self) -> None:
        for work in self._pending:
            work.wait()
        self._pending = []


# Segments per shard side in the backward. A call's dq, dk, dv (and delta) temporaries are
# 1/parts^2 of a block; more, smaller calls cost CPU. Measured per rank at T=16k, P=2, H=4,
# D=64, fp32, one thread (peak over the inputs, backward CPU time): 2: 98.9 MiB, 1.92 s;
# 4: 90.7 MiB, 1.97 s; 8: 87.0 MiB, 2.11 s; 16: 84.1 MiB, 2.59 s.
BACKWARD_PARTS = 8


def _segments(length: int, parts: int) -> list[slice]:
    """``parts`` near-equal consecutive slices of ``range(length)`` (fewer if it is tiny)."""
    parts = max(1, min(parts, length))
    bounds = [length * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def visible_pieces(
    mask: MaskSpec, length_q: int, length_k: int, *, parts: int = 2
) -> list[tuple[slice, slice]]:
    """The (query segment, key segment) pairs of a bound ``mask`` that hold any visible pair.

    Each side is cut into ``parts`` equal segments (2: the zigzag layout's two chunks). Each
    pair is one kernel call. Calling per segment pair rather than merging neighbours keeps
    every call's temporaries (its partial out, or its dq, dk, dv) at 1/parts^2 of a block, and
    under zigzag most pairs are then fully visible or a plain causal diagonal, which the fused
    kernels take in one piece.
    """
    return [
        (qs, ks)
        for qs in _segments(length_q, parts)
        for ks in _segments(length_k, parts)
        if mask.classify(qs, ks) != TileClass.EMPTY
    ]


def _pack_meta(positions: Tensor, doc_ids: Tensor | None) -> Tensor:
    """Positions [T] and doc ids [B, T] as one int64 tensor [1 (+ B), T] that travels with K,V."""
    rows = [positions.long().unsqueeze(0)]
    if doc_ids is not None:
        rows.append(doc_ids.long())
    return torch.cat(rows).contiguous()


def _unpack_meta(meta: Tensor, has_docs: bool) -> tuple[Tensor, Tensor | None]:
    return meta[0], (meta[1:] if has_docs else None)


def _rotate(group: dist.ProcessGroup, local: list[Tensor], steps: int | None = None):
    """Yield ``(step, tensors)``: this rank's ``local`` tensors at step 0, then the blocks of
    ranks r-1, r-2, ... for ``steps`` steps (default: the ring size). Each next block is
    received while the consumer works on the current one (double buffering); ``local`` itself
    is never written. Receive buffers are allocated once: one set for two steps, two
    alternating sets for more."""
    exchange = RingExchange(group)
    steps = exchange.size if steps is None else steps
    buffers: list[list[Tensor] | None] = [None, None]
    current = local
    for step in range(steps):
        last = step + 1 == steps
        if not last:
            slot = step % 2
            if buffers[slot] is None:
                buffers[slot] = [torch.empty_like(t) for t in local]
            exchange.start(current, buffers[slot])
        yield step, current
        if not last:
            exchange.wait()
            current = buffers[slot]


def _rotate_segments(group: dist.ProcessGroup, held: list[Tensor], segments: list[slice]):
    """Yield ``(segment, tensors)``: the previous rank's ``held`` block, one key segment
    (dim 2) at a time, for a ring's last step, whose block nobody passes on.

    This rank sends its own ``held`` block's segments in the same order, so no whole visiting
    block is ever received: segment i+1 travels while segment i is used, through fresh
    [B, H, len(segment), D] buffers (the one in use, and the next one's send and receive
    copies: 3/len(segments) of a block per tensor). Each of the two exchanges in flight has
    its own tags.
    """
    exchanges = [RingExchange(group, tag=16), RingExchange(group, tag=16 + len(held))]

    def post(index: int) -> list[Tensor]:
        sending = [t[:, :, segments[index]].contiguous() for t in held]
        receiving = [torch.empty_like(t) for t in sending]
        exchanges[index % 2].start(sending, receiving)
        return receiving

    incoming = post(0)
    for index, segment in enumerate(segments):
        exchanges[index % 2].wait()
        received = incoming
        if index + 1 < len(segments):
            incoming = post(index + 1)
        yield segment, received
        del received


def _step_mask(
    positions: Tensor,
    doc_ids: Tensor | None,
    block_meta: Tensor,
    rules: tuple[bool, int | None, BlockSparsePattern | None],
) -> MaskSpec:
    """The mask of the local queries against one visiting key block, bound to its shape."""
    causal, window, block_sparse = rules
    k_positions, k_doc_ids = _unpack_meta(block_meta, doc_ids is not None)
    return MaskSpec(
        causal=causal,
        q_positions=positions,
        k_positions=k_positions,
        q_doc_ids=doc_ids,
        k_doc_ids=k_doc_ids,
        window=window,
        block_sparse=block_sparse,
    ).bind(positions.shape[0], k_positions.shape[0])


class _RingAttention(torch.autograd.Function):
    """out, lse = ring attention of the local queries over every rank's keys (see module doc)."""

    @staticmethod
    def forward(
        ctx,
        q: Tensor,  # [B, Hq, T, D] local query shard
        k: Tensor,  # [B, Hkv, T, D] local key shard
        v: Tensor,  # [B, Hkv, T, D]
        group: dist.ProcessGroup,
        positions: Tensor,  # [T] global sequence index of each local token
        doc_ids: Tensor | None,  # [B, T]
        rules: tuple[bool, int | None, BlockSparsePattern | None],  # causal, window, sparse
        kernel: tuple[float, str, int | None],  # scale, backend, chunk_size
    ) -> tuple[Tensor, Tensor]:
        scale, backend, chunk_size = kernel
        length = q.shape[2]
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)  # [B, Hq, T, D]
        lse = torch.full(q.shape[:3], -math.inf, dtype=acc_dtype, device=q.device)  # [B, Hq, T]
        written = torch.zeros(length, dtype=torch.bool)  # query rows holding a partial already
        visiting_meta = []  # the key metadata of every step, for the backward
        local = [k.contiguous(), v.contiguous(), _pack_meta(positions, doc_ids)]
        for _, (block_k, block_v, block_meta) in _rotate(group, local):
            visiting_meta.append(block_meta.clone())  # the buffer is reused two steps later
            mask = _step_mask(positions, doc_ids, block_meta, rules)
            for qs, ks in visible_pieces(mask, length, block_k.shape[2]):
                part_out, part_lse = block_attention(
                    q[:, :, qs],
                    block_k[:, :, ks],
                    block_v[:, :, ks],
                    scale=scale,
                    mask=mask.slice(qs, ks),
                    backend=backend,
                    chunk_size=chunk_size,
                )
                _merge_into(out, lse, written, qs, part_out, part_lse)
        out = out.to(q.dtype)
        lse = lse.float() if q.dtype != torch.float64 else lse
        ctx.save_for_backward(q, k, v, out, lse, positions, doc_ids)
        ctx.visiting_meta = visiting_meta
        ctx.settings = (group, rules, kernel)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor | None):
        q, k, v, out, lse, positions, doc_ids = ctx.saved_tensors
        group, rules, kernel = ctx.settings
        grads_ring = RingExchange(group, tag=8)
        world = grads_ring.size
        length = q.shape[2]
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        saved = (dout.contiguous(), q, out, lse)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)  # [B, Hq, T, D]
        # The dK,dV accumulator of the visiting block, float32 [2, B, Hkv, T, D]: at step 0 this
        # rank's own block's. Between two steps it is exchanged in place (``_pass_on``): sent
        # on to the next rank and overwritten with the previous rank's, which holds the
        # next visiting block's. Overlapping that exchange with a step's compute would keep a
        # second accumulator alive next to the visiting K,V block: 2 more block-sized tensors
        # at the peak (measured: 97.6 against 90.7 MiB per rank at T=16k, P=2, H=4, D=64).
        dkv = torch.zeros((2, *k.shape), dtype=acc_dtype, device=k.device)
        # Every step but the last receives whole blocks (the next rank needs them whole one
        # step later); the last step's block goes nowhere, so it arrives in key segments.
        held = [k.contiguous(), v.contiguous()]  # the block of the step just computed
        for step, block in _rotate(group, held, steps=max(world - 1, 1)):
            held = block
            if step > 0:
                _pass_on(grads_ring, dkv)
            mask = _step_mask(positions, doc_ids, ctx.visiting_meta[step], rules)
            for qs, ks in visible_pieces(mask, length, held[0].shape[2], parts=BACKWARD_PARTS):
                _backward_piece(saved, held, qs, ks, ks, mask, kernel, dq, dkv)
        if world > 1:
            _pass_on(grads_ring, dkv)
            mask = _step_mask(positions, doc_ids, ctx.visiting_meta[world - 1], rules)
            query_segments = _segments(length, BACKWARD_PARTS)
            key_segments = _balanced_order(_segments(held[0].shape[2], BACKWARD_PARTS))
            for ks, block in _rotate_segments(group, held, key_segments):
                for qs in query_segments:
                    if mask.classify(qs, ks) != TileClass.EMPTY:
                        _backward_piece(saved, block, qs, ks, slice(None), mask, kernel, dq, dkv)
                del block  # freed before the segment after the next one is posted
            _pass_on(grads_ring, dkv)  # the last one goes home; this rank's own block's returns
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def _balanced_order(segments: list[slice]) -> list[slice]:
    """``segments`` alternating from the front and the back half: ``[0, n-1, 1, n-2, ...]``.

    The last backward step consumes key segments in lock-step with the neighbouring ranks (one
    segment of slack). Under zigzag a block's two halves are far apart in the sequence, so a
    rank's causal work per key segment is often all in one half (one rank: 2 units per
    segment of the first half, 0 in the second; its neighbour 1 unit everywhere). Taken in
    order, the ranks wait on each other and the step costs ~1.5x; alternating the halves keeps
    every rank's running total of work within one segment of the others'."""
    order = []
    front, back = 0, len(segments) - 1
    while front <= back:
        order.append(segments[front])
        if back != front:
            order.append(segments[back])
        front, back = front + 1, back - 1
    return order


def _backward_piece(
    saved: tuple[Tensor, Tensor, Tensor, Tensor],
    block: list[Tensor],
    qs: slice,
    ks: slice,
    block_keys: slice,
    mask: MaskSpec,
    kernel: tuple[float, str, int | None],
    dq: Tensor,
    dkv: Tensor,
) -> None:
    """Add one (query segment ``qs``, key segment ``ks``) pair's dq and dK,dV into ``dq`` [B,
    Hq, T, D] and the accumulator ``dkv`` [2, B, Hkv, T, D], in place.

    ``saved`` is (dout, q, out, lse) of the local queries; ``block`` the visiting K,V, a whole
    block or just segment ``ks`` of it; ``block_keys`` the part of ``block`` holding ``ks``
    (``ks`` itself for a whole block, ``slice(None)`` for a segment).
    """
    dout, q, out, lse = saved
    scale, backend, chunk_size = kernel
    dq_part, dk_part, dv_part = block_attention_backward(
        dout[:, :, qs],
        q[:, :, qs],
        block[0][:, :, block_keys],
        block[1][:, :, block_keys],
        out[:, :, qs],
        lse[:, :, qs],
        scale=scale,
        mask=mask.slice(qs, ks),
        backend=backend,
        chunk_size=chunk_size,
    )
    dq[:, :, qs] += dq_part
    dkv[0][:, :, ks] += dk_part
    dkv[1][:, :, ks] += dv_part


# Pieces of an in-place accumulator exchange: the staging buffer is 1/PASS_PIECES of it.
PASS_PIECES = 16


def _pass_on(exchange: RingExchange, accumulator: Tensor) -> None:
    """Send ``accumulator`` (contiguous) to the next rank and overwrite it, in place, with the
    previous rank's, piece by piece through one staging buffer of 1/``PASS_PIECES`` its size:
    a second whole accumulator is never allocated."""
    pieces = accumulator.view(-1).chunk(PASS_PIECES)  # contiguous views, the first the largest
    staging = torch.empty_like(pieces[0])
    for piece in pieces:
        incoming = staging[: piece.numel()]
        exchange.start([piece], [incoming])
        exchange.wait()
        piece.copy_(incoming)


def _merge_into(
    out: Tensor, lse: Tensor, written: Tensor, rows: slice, part_out: Tensor, part_lse: Tensor
) -> None:
    """Merge one partial result into the running ``out``/``lse`` rows (float32, in place).

    The first partial of a row is copied, later ones merged (SPECS 1.1: never start from
    zeros and -inf arithmetic). ``written`` [T] marks rows that already hold a partial.
    """
    seen = written[rows]
    if not seen.any():
        out[:, :, rows] = part_out
        lse[:, :, rows] = part_lse
    else:
        merged_out, merged_lse = merge_partials(
            out[:, :, rows], lse[:, :, rows], part_out, part_lse
        )
        out[:, :, rows] = merged_out
        lse[:, :, rows] = merged_lse
    written[rows] = True


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup,
    seq_positions: Tensor,
    doc_ids: Tensor | None = None,
    causal: bool = True,
    window: int | None = None,
    block_sparse: BlockSparsePattern | None = None,
    scale: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention of the local queries over the keys of every rank of ``group``.

    q [B, Hq, T, D], k, v [B, Hkv, T, D]: this rank's shard (every rank the same T).
    ``seq_positions`` [T]: the GLOBAL sequence index of each local token (under the zigzag layout
    ``zigzag_positions``; not the model's position ids, which a position encoding may offset); ``doc_ids`` [B, T] keeps packed documents apart; ``window`` is a
    Mistral-style sliding window; ``block_sparse`` a static block pattern. ``scale`` defaults to
    1/sqrt(D); ``backend`` and ``chunk_size`` pick the block kernel (``block_attention``). Returns out [B, Hq, T, D] (q's dtype), and with ``return_lse`` also
    lse [B, Hq, T] (float32; no gradient flows through it). Differentiable in q, k and v.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = _RingAttention.apply(
        q,
        k,
        v,
        group,
        seq_positions,
        doc_ids,
        (causal, window, block_sparse),
        (scale, backend, chunk_size),
    )
    return (out, lse) if return_lse else out


class RingAttention(nn.Module):
    """Attention core running ``local``'s mask rules as ring attention over ``group``.

    ``forward(q [B, Hq, T, D], k, v [B, Hkv, T, D], ctx) -> out [B, Hq, T, D]``, the signature of
    the dense core it replaces: ``ctx.seq_positions`` are the global positions of the local
    tokens and ``ctx.doc_ids`` their documents. Causality, window and kernel backend come from
    ``local`` (a ``DenseAttention``), so single-device and ring runs mask identically.
    """

    applies_rope_itself = False  # the ring streams rotated K blocks (the ``AttentionCore`` flag)
    projects_itself = False  # the layer projects every token for its shard (``AttentionCore``)

    def __init__(self, local: DenseAttention, group: dist.ProcessGroup):
        super().__init__()
        self.local = local
        self.group = group

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        rules = self.local.mask_for(ctx)
        return ring_attention(
            q,
            k,
            v,
            group=self.group,
            seq_positions=ctx.seq_positions,
            doc_ids=ctx.doc_ids,
            causal=rules.causal,
            window=rules.window,
            block_sparse=rules.block_sparse,
            backend=self.local.config.backend,
            chunk_size=self.local.config.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"ring={dist.get_world_size(self.group)}"
