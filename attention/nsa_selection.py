"""NSA's selection branch: exact attention of each query over the raw tokens of its selected
blocks, computed block-major (an inverted index from key blocks to the queries that chose them).

Each query picks ``n`` selection blocks of ``l'`` tokens (shared by the ``G`` query heads of its
GQA group). Gathering those keys per query would move ``n l' D`` floats per query; gathering, per
query chunk, the union of the chunk's blocks costs as much as dense attention once neighbouring
queries choose unrelated blocks. Here the (query, block) pairs of every (sequence, kv head) are
sorted by block once; then for each key block the rows of the queries that chose it are gathered
([m, G, D], one contiguous row of G x D per token from a flat view of the token-major q or dout
the model hands over: no re-laid-out copy of either, whose [Tq, G, D] copies per kv head were a
quarter of dense attention's peak memory at 32k) and meet the block's keys in one GEMM against
a ``l' x D`` tile. So the work is ``n l'`` keys per query whatever the selections look like, and
nothing ``T x T`` or ``T x n l'`` is ever held.

Forward: per block, ``exp(S - r) V`` and the row sums ``exp(S - r)`` are added (``index_add_``)
into each chosen query's unnormalised accumulators against a per-row reference score r, raised
(with a rescale of the few rows concerned) only when a block outscores it by more than
``RESCALE_MARGIN``; out and lse are normalised once at the end. Backward needs only ``lse``
[B, Hq, Tq] and the row sums ``rowsum(dO * O)`` (``output_row_sums``; the caller may free
``out`` once it has them).
Backward (FlashAttention style): per block, recompute ``P = exp(S - lse)``, then
``dS = P * (dO V^T - rowsum(dO * O))``; ``dQ`` rows are accumulated with ``index_add_``, the
block's ``dK``, ``dV`` with one GEMM each (a block is a contiguous key slice, so no scatter).

Visibility inside a block: key position <= the query's global position (causal inside the
query's own block, and the tail of a last, shorter block), and, with packed documents, the key's
document equals the query's. A query whose selected keys are all hidden gets out 0, lse -inf.

The steps are plain GEMMs and elementwise ops on any device. Measured at T=16384 (fwd, bwd CPU
s, one thread, SPECS defaults): 0.93, 1.32 this way against 1.11, 1.51 calling torch's fused CPU
flash op per step (its per-call cost outweighs the fusion on 64-key tiles), and 1.4, 2.7 (at
T=8192) for the former union-of-blocks gather. At T=32768 (B=1, Hq=8, Hkv=2, the selections of
``bench/sparse_nsa_mosa.py``'s random inputs, shared machine at load 5-7): forward 1.5-1.7 s
with the reference-score accumulation against 1.9-2.0 s merging every step into normalised
rows; backward 2.5-2.6 s, where the GEMMs are about half and the row gathers and
``index_add_`` of dq most of the rest. With token-major rows (2026-12-05, a random output
gradient): forward 1.6 s (GEMMs 0.53, row gathers 0.23, scatter-adds 0.29), backward 2.7 s
(GEMMs 1.35, row gathers 0.51, scatter-adds 0.29): the gathers and scatter-adds read and write
rows of tokens spread over the sequence, so they are bound by memory, not by the op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.tiling import compute_dtype
from longctx.errors import LongctxError

# Most query rows (per kv head) one block step handles: block 0 is chosen by every query, and
# a step's [m, G, l'] score, probability and gradient temporaries (1 MiB at G=4, l'=64, fp32)
# should stay in cache whatever T is.
ROWS_PER_STEP = 1024
# How far (in score units, natural log) a block's maximum may exceed a query row's reference
# score before the row is rescaled to it (``_head_forward``): terms exp(s - r) stay below
# e**8 ~ 3e3, far from overflow in float32.
RESCALE_MARGIN = 8.0


@dataclass(frozen=True)
class QueryKeySides:
    """Where the queries sit and which documents both sides belong to.

    Keys are the whole sequence in order (key j at global position j); queries are any tokens
    at global positions ``q_positions`` (sequence parallelism, ``sequence_keys``).
    """

    q_positions: Tensor  # [Tq] int64 global position of each query
    q_doc_ids: Tensor | None  # [B, Tq]
    k_doc_ids: Tensor | None  # [B, Tk]: key j is at global position j

    def rows(self, rows: slice) -> tuple[Tensor, Tensor | None]:
        """Positions [c] and doc ids [B, c] of the queries ``rows``."""
        docs = None if self.q_doc_ids is None else self.q_doc_ids[:, rows]
        return self.q_positions[rows], docs


@dataclass(frozen=True)
class _BlockStep:
    """One GEMM step: the keys ``start .. stop - 1`` of one selection block against ``rows``.

    The first ``masked`` rows are the queries for which some key of the block may be hidden
    (queries inside the block, and every query when documents are packed); the others see
    all L keys, so the mask is built and applied on the first rows only.
    """

    start: int
    stop: int
    rows: Tensor  # [m] int32 local query indices that chose the block
    masked: int


def _block_steps(
    selected: Tensor, select_block: int, length: int, sides: QueryKeySides
) -> list[_BlockStep]:
    """The inverted index of one (sequence, kv head): ``selected`` [Tq, n] block ids (-1 none)
    -> per chosen block, the queries that chose it, cut into steps of <= ``ROWS_PER_STEP``."""
    flat = selected.flatten()  # [Tq n] query-major
    blocks, order = torch.sort(flat, stable=True)  # block-major, queries ascending in a block
    unused = int((blocks < 0).sum())  # the -1 entries sort first
    sizes = torch.bincount(blocks[unused:], minlength=1)  # pairs per block id
    rows = order[unused:].div_(selected.shape[1], rounding_mode="floor").to(torch.int32)
    del blocks, order  # the sort's temporaries are the plan's largest: ~6 bytes per pair
    chosen = sizes.nonzero()[:, 0]
    sizes = sizes[chosen]
    packed = sides.q_doc_ids is not None
    steps = []
    for block, block_rows in zip(chosen.tolist(), torch.split(rows, sizes.tolist())):
        start, stop = block * select_block, min(block * select_block + select_block, length)
        if not packed:  # queries that see only part of the block first
            inside = sides.q_positions[block_rows] < stop - 1  # [m]
            block_rows = torch.cat([block_rows[inside], block_rows[~inside]])
            masked = int(inside.sum())
        for first in range(0, len(block_rows), ROWS_PER_STEP):
            piece = block_rows[first : first + ROWS_PER_STEP]
            masked_rows = len(piece) if packed else min(len(piece), max(0, masked - first))
            steps.append(_BlockStep(start, stop, piece, masked_rows))
    return steps


def _hidden_keys(step: _BlockStep, sides: QueryKeySides, batch: int) -> Tensor:
    """[r, L] True where masked query row r must not see key ``start + c``."""
    rows = step.rows[: step.masked]
    q_pos = sides.q_positions[rows]  # [r]
    keys = torch.arange(step.start, step.stop, device=q_pos.device)  # [L]
    hidden = keys[None, :] > q_pos[:, None]  # [r, L]
    if sides.q_doc_ids is not None:
        q_doc = sides.q_doc_ids[batch, rows]  # [r]
        k_doc = sides.k_doc_ids[batch, step.start : step.stop]  # [L]
        hidden |= k_doc[None, :] != q_doc[:, None]
    return hidden


def _scores(
    queries: Tensor, keys: Tensor, step: _BlockStep, sides: QueryKeySides, batch: int
) -> Tensor:
    """queries [m, G, D] against scaled keys [L, D] -> scores [m, G, L], hidden entries -inf."""
    rows, group, dim = queries.shape
    scores = (queries.view(-1, dim) @ keys.T).view(rows, group, -1)  # one [m G, D] x [D, L]
    if step.masked:
        hidden = _hidden_keys(step, sides, batch)  # [r, L]
        scores[: step.masked].masked_fill_(hidden[:, None], float("-inf"))
    return scores


def selection_plans(
    selected: Tensor, select_block: int, length: int, sides: QueryKeySides
) -> list[list[list[_BlockStep]]]:
    """``_block_steps`` for every (sequence, kv head): [B][Hkv] lists of steps."""
    return [
        [
            _block_steps(selected[b, j], select_block, length, sides)
            for j in range(selected.shape[1])
        ]
        for b in range(selected.shape[0])
    ]


def token_major_zeros(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Zeros of ``shape`` [B, H, T, ...] laid out token-major ([B, T, H, ...] in memory): the
    layout of the model's q, k, v and of the selection's accumulators (``_HeadRows``)."""
    tokens = torch.zeros(shape[0], shape[2], shape[1], *shape[3:], dtype=dtype, device=device)
    return tokens.transpose(1, 2)


@dataclass(frozen=True)
class _HeadRows:
    """The G query heads of one (sequence, kv head) of a [B, H, T, ...] tensor as a 2-D table
    whose row ``t * spacing + offset`` holds token t's G heads: one contiguous row per token,
    so a step gathers (``index_select``) and scatter-adds (``index_add_``) whole rows.

    Measured (one thread, 665 of 32768 tokens, G=4, D=64): gather 0.036 ms and scatter-add
    0.028 ms on these rows against 0.050 and 0.114 ms along T of a head-major [G, T, D] slice
    (the former layout), whose scatter-add walks G separate strided planes.
    """

    table: Tensor  # [T * spacing, G * rest]
    spacing: int
    offset: int

    def index(self, rows: Tensor) -> Tensor:
        """Table rows of the tokens ``rows`` [m] (int64)."""
        return rows if self.spacing == 1 else rows * self.spacing + self.offset


def _indexer(rows: Tensor) -> Callable[[_HeadRows], Tensor]:
    """``table -> table.index(rows)``, computed once per layout (spacing, offset): a step reads
    up to six tables, most of them token-major alike, so their indices are one tensor."""
    made: dict[tuple[int, int], Tensor] = {}

    def index(table: _HeadRows) -> Tensor:
        layout = (table.spacing, table.offset)
        if layout not in made:
            made[layout] = table.index(rows)
        return made[layout]

    return index


def _head_rows(x: Tensor, batch: int, kv_head: int, kv_heads: int, writable: bool) -> _HeadRows:
    """``_HeadRows`` of x [B, H, T, ...]: a view when x is token-major (the model's q, and every
    accumulator here), else a contiguous copy of this kv head's heads ([T, G, ...]; refused
    when ``writable``, since writes to a copy would be lost)."""
    tokens = x[batch].transpose(0, 1)  # [T, H, ...]
    if tokens.is_contiguous():
        return _HeadRows(tokens.reshape(tokens.shape[0] * kv_heads, -1), kv_heads, kv_head)
    if writable:
        raise LongctxError(
            "the NSA selection accumulates into token-major tensors only; allocate them with "
            "token_major_zeros"
        )
    group = x.shape[1] // kv_heads
    heads = tokens[:, kv_head * group : (kv_head + 1) * group]
    return _HeadRows(heads.reshape(tokens.shape[0], -1), 1, 0)


def _row_dots(a: Tensor, b: Tensor, rows: int = 512) -> Tensor:
    """``(a * b).sum(-1)`` for [G, T, D] operands (any strides), ``rows`` tokens at a time (no
    [G, T, D] product; at 4096 rows, the 8 MiB products at T=32768 (8 heads) raised the
    resident peak of NSA's backward by ~40 MiB of freed heap): [G, T] in the promoted dtype."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    sums = torch.empty(a.shape[:2], dtype=dtype, device=a.device)
    for start in range(0, a.shape[1], rows):
        part = slice(start, start + rows)
        torch.sum(a[:, part] * b[:, part], dim=-1, out=sums[:, part])
    return sums


def selection_forward(
    q: Tensor, k: Tensor, v: Tensor, plans: list, sides: QueryKeySides, scale: float
) -> tuple[Tensor, Tensor]:
    """The selection branch: out [B, Hq, Tq, D] and lse [B, Hq, Tq], both in the accumulation
    dtype (float32; float64 for float64 inputs) and token-major; out 0 and lse -inf where no
    key is seen.

    ``plans``: ``selection_plans`` of the selected blocks. Online softmax per key block (see
    ``_head_forward``) into ``out``'s rows of each kv head, normalised at the end: besides
    ``out`` only [B, Tq, Hq] running maxima and sums exist (the queries are gathered from q per
    step, from a copy of one kv head's heads only when q is not token-major).
    """
    acc = compute_dtype(q.dtype)
    batch, heads, count, _ = q.shape
    kv_heads = k.shape[1]
    out = token_major_zeros(q.shape, acc, q.device)
    ref = token_major_zeros((batch, heads, count), acc, q.device).fill_(float("-inf"))
    sums = token_major_zeros((batch, heads, count), acc, q.device)
    for b in range(batch):
        for j in range(kv_heads):
            _head_forward(
                _head_rows(q, b, j, kv_heads, writable=False), k[b, j].to(acc),
                v[b, j].to(acc), scale,
                *(_head_rows(x, b, j, kv_heads, writable=True) for x in (out, ref, sums)),
                plans[b][j], sides, b,
            )  # fmt: skip
    seen = sums > 0
    out.div_(torch.where(seen, sums, 1.0)[..., None])
    lse = ref.add_(torch.where(seen, sums, 1.0).log_()).masked_fill_(~seen, float("-inf"))
    return out, lse


def _head_forward(
    queries, keys_j, values_j, scale, out_j, ref_j, sums_j, steps, sides, batch
) -> None:
    """One (sequence, kv head) of ``selection_forward``: ``queries`` the rows of q; keys_j and
    values_j [Tk, D] (keys scaled by ``scale`` per block); accumulates ``sum exp(s - r) v`` into the rows of out_j
    (G x D per token) and ``sum exp(s - r)`` into those of sums_j (G per token) against each
    row's reference score r in ref_j (-inf: nothing seen yet), all in place.

    r is the first seen block's maximum score and is raised (rescaling the row's sums) only
    when a block's maximum exceeds it by more than ``RESCALE_MARGIN``, so terms stay below
    ``e**RESCALE_MARGIN`` (no overflow, same relative precision) and almost every step adds
    its ``P V`` with one ``index_add_``: the online softmax that merged every step into
    normalised rows gathered, rescaled and wrote back all m rows of it (0.1 s more of 1.0 s at
    T=16384, more at T=32768)."""
    group, dim = ref_j.table.shape[1], keys_j.shape[1]
    for step in steps:
        block, rows = slice(step.start, step.stop), step.rows.long()
        at = _indexer(rows)
        index = at(out_j)  # out, ref and sums share one layout
        q_rows = queries.table.index_select(0, at(queries)).view(-1, group, dim)
        keys = keys_j[block] * scale  # [L, D]
        scores = _scores(q_rows.to(keys.dtype), keys, step, sides, batch)  # [m, G, L]
        block_max = scores.amax(-1)  # [m, G], -inf: sees none of the block
        old_ref = ref_j.table.index_select(0, index)
        fresh = torch.isneginf(old_ref)  # nothing accumulated: the block sets the reference
        raised = block_max > old_ref + RESCALE_MARGIN
        ref = torch.where(raised | fresh, block_max, old_ref)
        rescaled = raised & ~fresh
        if rescaled.any():
            some = rescaled.any(1)  # [m] rows with some head's reference raised
            moved = index[some]
            factor = torch.where(rescaled[some], (old_ref - ref)[some].exp(), 1.0)  # [m', G]
            kept = out_j.table.index_select(0, moved).view(-1, group, dim)
            out_j.table.index_copy_(0, moved, kept.mul_(factor[..., None]).view(len(moved), -1))
            sums_j.table.index_copy_(0, moved, sums_j.table.index_select(0, moved).mul_(factor))
        ref_j.table.index_copy_(0, index, ref)
        safe_ref = torch.where(torch.isneginf(ref), 0.0, ref)  # sees nothing yet: p = 0
        weights = scores.sub_(safe_ref[..., None]).exp_()  # [m, G, L]
        sums_j.table.index_add_(0, index, weights.sum(-1))
        values = weights.view(-1, weights.shape[-1]) @ values_j[block]  # [m G, D]
        out_j.table.index_add_(0, index, values.view(len(rows), -1))


def output_row_sums(dout: Tensor, out: Tensor) -> Tensor:
    """``rowsum(dout * out)`` [B, Hq, Tq] in the promoted dtype, one sequence at a time and
    4096 tokens per step (no [B, Hq, Tq, D] product): the softmax term of the selection
    backward, and the gate's gradient in NSA's gated sum."""
    dtype = torch.promote_types(dout.dtype, out.dtype)
    sums = torch.empty(out.shape[:3], dtype=dtype, device=out.device)
    for b in range(out.shape[0]):
        sums[b] = _row_dots(dout[b], out[b])
    return sums


def selection_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    row_sums: Tensor,
    lse: Tensor,
    plans: list,
    sides: QueryKeySides,
    scale: float,
    grads: tuple[Tensor, Tensor, Tensor],
    gate: Tensor | None = None,
) -> None:
    """Accumulate the selection branch's gradients into ``grads`` = (dq, dk, dv) (accumulation
    dtype, shapes of q, k, v; dq token-major, ``token_major_zeros``).

    ``row_sums``: ``output_row_sums(dout, out)`` of ``selection_forward``'s out (so out itself
    need not outlive the start of the backward); ``lse``: its lse. The branch's output gradient
    is ``dout``, or ``gate * dout`` with ``gate`` [B, Hq, Tq, 1] (NSA's gated sum), gated per
    step on the gathered rows: dout reaches the core as a token-major view of the layer's
    [B, T, H, D] gradient, so its rows are gathered in place, and a gated copy of one kv
    head's dout (a quarter of dense attention's peak at T=32768) is never made.
    """
    acc = compute_dtype(q.dtype)
    kv_heads = k.shape[1]
    safe_lse = torch.where(torch.isneginf(lse), 0.0, lse)  # rows seeing nothing: p = 0
    delta = row_sums.to(acc)  # rowsum(branch dout * out)
    if gate is not None:
        delta = delta * gate[..., 0].to(acc)
    dq, dk, dv = grads

    def rows_of(x: Tensor, b: int, j: int) -> _HeadRows:
        return _head_rows(x, b, j, kv_heads, writable=x is dq)

    for b in range(q.shape[0]):
        for j in range(kv_heads):
            gate_j = None if gate is None else rows_of(gate[..., 0], b, j)
            _head_backward(
                rows_of(dout, b, j), gate_j, rows_of(q, b, j), k[b, j].to(acc), v[b, j].to(acc),
                rows_of(safe_lse, b, j), rows_of(delta, b, j), (rows_of(dq, b, j), dk[b, j], dv[b, j]),
                plans[b][j], sides, b, scale,
            )  # fmt: skip


def _head_backward(
    dout_j, gate_j, q_j, k_j, v_j, lse_j, delta_j, grads_j, steps, sides, batch, scale
):
    """One (sequence, kv head) of ``selection_backward``: the rows (``_HeadRows``) of dout_j,
    of the branch's gate gate_j (or None), of q_j, of lse_j (finite) and of delta_j =
    rowsum(branch dout * out); k_j, v_j [Tk, D]; accumulates into grads_j = (the rows of dq,
    dk [Tk, D], dv [Tk, D])."""
    dq_j, dk_j, dv_j = grads_j
    group, dim = lse_j.table.shape[1], k_j.shape[1]
    for step in steps:
        block, rows = slice(step.start, step.stop), step.rows.long()
        at = _indexer(rows)
        keys = k_j[block] * scale  # [L, D]
        q_rows = q_j.table.index_select(0, at(q_j)).view(-1, group, dim).to(k_j.dtype)
        dout_rows = dout_j.table.index_select(0, at(dout_j)).to(k_j.dtype)
        if gate_j is not None:  # the branch's output gradient
            gates = gate_j.table.index_select(0, at(gate_j)).to(k_j.dtype)  # [m, G]
            dout_rows = dout_rows.view(-1, group, dim).mul_(gates[..., None])
        dout_rows = dout_rows.view(-1, dim)  # [m G, D]
        scores = _scores(q_rows, keys, step, sides, batch)  # [m, G, L]
        probs = scores.sub_(lse_j.table.index_select(0, at(lse_j))[..., None]).exp_()
        probs = probs.view(dout_rows.shape[0], -1)  # [m G, L]
        dv_j[block].addmm_(probs.T, dout_rows)
        dprobs = dout_rows @ v_j[block].T  # [m G, L]
        dprobs -= delta_j.table.index_select(0, at(delta_j)).view(-1, 1)
        dscores = probs.mul_(dprobs)  # [m G, L], d(loss)/d(scaled score)
        dq_j.table.index_add_(0, at(dq_j), (dscores @ keys).view(len(rows), -1))
        dk_j[block].addmm_(dscores.T, q_rows.view(-1, dim), alpha=scale)


class SelectedBlockAttention(torch.autograd.Function):
    """Attention of every query over the raw tokens of its selected blocks; see the module.

    q [B, Hq, Tq, D] at global positions ``sides.q_positions``; k, v [B, Hkv, Tk, D] the whole
    sequence; ``selected`` [B, Hkv, Tq, n] int64 selection block indices (-1 = none; no block
    twice in a row), shared by the ``Hq / Hkv`` query heads of a GQA group. Returns out
    [B, Hq, Tq, D] in q's dtype; queries that see no key get 0. (NSA's layer runs this branch
    inside its fused ``GatedBranchAttention``; this is the branch on its own.)
    """

    @staticmethod
    def forward(ctx, q, k, v, selected, sides, scale, select_block):
        plans = selection_plans(selected, select_block, k.shape[2], sides)
        out, lse = selection_forward(q, k, v, plans, sides, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.sides, ctx.scale = plans, sides, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        acc = compute_dtype(q.dtype)
        grads = (
            token_major_zeros(q.shape, acc, q.device),
            *(torch.zeros_like(x, dtype=acc) for x in (k, v)),
        )
        row_sums = output_row_sums(dout, out)
        selection_backward(dout, q, k, v, row_sums, lse, ctx.plans, ctx.sides, ctx.scale, grads)
        dq, dk, dv = (g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
        return dq, dk, dv, None, None, None, None
