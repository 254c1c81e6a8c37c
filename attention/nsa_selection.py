"""NSA's selection branch: exact attention of each query over the raw tokens of its selected
blocks, computed block-major (an inverted index from key blocks to the queries that chose them).

Each query picks ``n`` selection blocks of ``l'`` tokens (shared by the ``G`` query heads of its
GQA group). Gathering those keys per query would move ``n l' D`` floats per query; gathering, per
query chunk, the union of the chunk's blocks costs as much as dense attention once neighbouring
queries choose unrelated blocks. Here the (query, block) pairs of every (sequence, kv head) are
sorted by block once; then for each key block the rows of the queries that chose it are gathered
([G, m, D], straight from the kv head's [G, Tq, D] slice: no re-laid-out copy of q or dout, whose
[Tq, G, D] copies per kv head were a quarter of dense attention's peak memory at 32k) and meet
the block's keys in one GEMM against a cached ``l' x D`` tile. So the work
is ``n l'`` keys per query whatever the selections look like, and nothing ``T x T`` or
``T x n l'`` is ever held.

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
``index_add_`` of dq most of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.tiling import compute_dtype

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
    count = selected.shape[0]
    queries = torch.arange(count, device=selected.device)
    pairs = (selected * count + queries[:, None]).flatten()  # block-major key, unique per pair
    pairs = torch.sort(pairs[pairs >= 0]).values
    blocks, rows = pairs // count, (pairs % count).to(torch.int32)
    chosen, sizes = torch.unique_consecutive(blocks, return_counts=True)
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
    q_rows: Tensor, keys: Tensor, step: _BlockStep, sides: QueryKeySides, batch: int
) -> Tensor:
    """q_rows [G, m, D] against scaled keys [L, D] -> scores [G, m, L], hidden entries -inf."""
    scores = q_rows @ keys.T  # one [G m, D] x [D, L] GEMM
    if step.masked:
        scores[:, : step.masked].masked_fill_(_hidden_keys(step, sides, batch), float("-inf"))
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


def _gatherable(x: Tensor) -> Tensor:
    """``x`` [G, T, D], contiguous (copied only when it is not): ``index_select`` over T runs
    its fast row-copy path on contiguous tensors only. Measured on 1024 of 32768 rows, G=4,
    D=64: 0.08 ms contiguous, 14 ms on a [T, H, D] transposed view, 10 ms on the expanded
    gradient of ``out.sum()``."""
    return x if x.is_contiguous() else x.contiguous()


def _row_dots(a: Tensor, b: Tensor, rows: int = 4096) -> Tensor:
    """``(a * b).sum(-1)`` for [G, T, D] operands (any strides), ``rows`` tokens at a time (no
    [G, T, D] product): [G, T] in the promoted dtype."""
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
    dtype (float32; float64 for float64 inputs); out 0 and lse -inf where no key is seen.

    ``plans``: ``selection_plans`` of the selected blocks. Online softmax per key block (see
    ``_head_forward``) into ``out``'s [G, Tq, D] slice of each kv head, normalised at the end:
    besides ``out`` only [B, Hq, Tq] running maxima and sums exist (the queries are gathered
    from q per step, from a copy of one kv head's only when q is not contiguous, and the keys
    are scaled per block).
    """
    acc = compute_dtype(q.dtype)
    batch, heads, count, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((batch, heads, count), float("-inf"), dtype=acc, device=q.device)
    sums = torch.zeros((batch, heads, count), dtype=acc, device=q.device)
    for b in range(batch):
        for j in range(k.shape[1]):
            heads_j = slice(j * group, (j + 1) * group)
            _head_forward(
                q[b, heads_j], k[b, j].to(acc) * scale, v[b, j].to(acc), out[b, heads_j],
                lse[b, heads_j], sums[b, heads_j], plans[b][j], sides, b,
            )  # fmt: skip
    seen = sums > 0
    out.div_(torch.where(seen, sums, 1.0)[..., None])
    lse.add_(torch.where(seen, sums, 1.0).log_()).masked_fill_(~seen, float("-inf"))
    return out, lse


def _head_forward(q_j, keys_j, values_j, out_j, ref_j, sums_j, steps, sides, batch) -> None:
    """One (sequence, kv head) of ``selection_forward``: q_j [G, Tq, D]; scaled keys_j and
    values_j [Tk, D]; accumulates ``sum exp(s - r) v`` into out_j [G, Tq, D] and
    ``sum exp(s - r)`` into sums_j [G, Tq] against each row's reference score r in ref_j
    [G, Tq] (-inf: nothing seen yet), all in place.

    r is the first seen block's maximum score and is raised (rescaling the row's sums) only
    when a block's maximum exceeds it by more than ``RESCALE_MARGIN``, so terms stay below
    ``e**RESCALE_MARGIN`` (no overflow, same relative precision) and almost every step adds
    its ``P V`` with one ``index_add_``: the online softmax that merged every step into
    normalised rows gathered, rescaled and wrote back all m rows of it (0.1 s more of 1.0 s at
    T=16384, more at T=32768)."""
    q_j = _gatherable(q_j)
    for step in steps:
        rows, block = step.rows, slice(step.start, step.stop)
        q_rows = q_j.index_select(1, rows).to(keys_j.dtype)  # [G, m, D]
        scores = _scores(q_rows, keys_j[block], step, sides, batch)  # [G, m, L]
        block_max = scores.amax(-1)  # [G, m], -inf: sees none of the block
        old_ref = ref_j.index_select(1, rows)
        fresh = torch.isneginf(old_ref)  # nothing accumulated: the block sets the reference
        raised = block_max > old_ref + RESCALE_MARGIN
        ref = torch.where(raised | fresh, block_max, old_ref)
        rows = rows.long()  # index_add_ and index_copy_ take int64 indices only
        rescaled = raised & ~fresh
        if rescaled.any():
            some = rescaled.any(0)  # [m] rows with some head's reference raised
            moved = rows[some]
            factor = torch.where(rescaled[:, some], (old_ref - ref)[:, some].exp(), 1.0)
            out_j.index_copy_(1, moved, out_j.index_select(1, moved).mul_(factor[..., None]))
            sums_j.index_copy_(1, moved, sums_j.index_select(1, moved).mul_(factor))
        ref_j.index_copy_(1, rows, ref)
        safe_ref = torch.where(torch.isneginf(ref), 0.0, ref)  # sees nothing yet: p = 0
        weights = scores.sub_(safe_ref[..., None]).exp_()  # [G, m, L]
        sums_j.index_add_(1, rows, weights.sum(-1))
        out_j.index_add_(1, rows, weights @ values_j[block])


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
    dtype, shapes of q, k, v).

    ``row_sums``: ``output_row_sums(dout, out)`` of ``selection_forward``'s out (so out itself
    need not outlive the start of the backward); ``lse``: its lse. The branch's output gradient
    is ``dout``, or ``gate * dout`` with ``gate`` [B, Hq, Tq, 1] (NSA's gated sum), formed one
    kv head at a time (``_branch_dout``); no re-laid-out copy of ``dout`` or ``q`` is made.
    """
    acc = compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    safe_lse = torch.where(torch.isneginf(lse), 0.0, lse)  # rows seeing nothing: p = 0
    delta = row_sums.to(acc)  # rowsum(branch dout * out)
    if gate is not None:
        delta = delta * gate[..., 0].to(acc)
    for b in range(q.shape[0]):
        for j in range(k.shape[1]):
            heads_j = slice(j * group, (j + 1) * group)
            gate_j = None if gate is None else gate[b, heads_j].to(acc)  # [G, Tq, 1]
            dout_j = _branch_dout(dout[b, heads_j], gate_j)  # [G, Tq, D]
            _head_backward(
                dout_j, q[b, heads_j], k[b, j].to(acc), v[b, j].to(acc), safe_lse[b, heads_j],
                delta[b, heads_j],
                tuple(g[b, heads_j] if i == 0 else g[b, j] for i, g in enumerate(grads)),
                plans[b][j], sides, b, scale,
            )  # fmt: skip
            del dout_j  # a copy when dout was gated or not contiguous: one kv head's at a time


def _branch_dout(dout_j: Tensor, gate_j: Tensor | None) -> Tensor:
    """The branch's output gradient ``gate_j * dout_j`` [G, Tq, D] of one kv head, contiguous
    (gate_j [G, Tq, 1] or None: ``dout_j`` itself, copied only when not contiguous).

    Gated once here rather than per gathered step: dout reaches the core as a transposed view
    of the layer's [B, T, H, D] gradient (or an expanded one), so this kv head's contiguous copy
    is made anyway and the product costs no extra memory; per step it was one more gather and
    one more pass over the [G, m, D] rows (measured at T=16384: 0.08 s of 1.36 s)."""
    if gate_j is None:
        return _gatherable(dout_j)
    dtype = torch.promote_types(dout_j.dtype, gate_j.dtype)
    return torch.mul(
        dout_j, gate_j, out=torch.empty(dout_j.shape, dtype=dtype, device=dout_j.device)
    )


def _head_backward(dout_j, q_j, k_j, v_j, lse_j, delta_j, grads_j, steps, sides, batch, scale):
    """One (sequence, kv head) of ``selection_backward``: dout_j (the branch's output gradient,
    contiguous), q_j [G, Tq, D]; k_j, v_j [Tk, D]; lse_j (finite) and delta_j =
    rowsum(branch dout * out) [G, Tq]; accumulates into grads_j = (dq [G, Tq, D], dk [Tk, D],
    dv [Tk, D])."""
    dq_j, dk_j, dv_j = grads_j
    q_j, dim = _gatherable(q_j), q_j.shape[-1]
    for step in steps:
        rows, block = step.rows, slice(step.start, step.stop)
        keys = k_j[block] * scale  # [L, D]
        q_rows = q_j.index_select(1, rows).to(k_j.dtype)  # [G, m, D]
        dout_rows = dout_j.index_select(1, rows).to(k_j.dtype).view(-1, dim)  # [G m, D]
        scores = _scores(q_rows, keys, step, sides, batch)  # [G, m, L]
        probs = scores.sub_(lse_j.index_select(1, rows)[..., None]).exp_()
        probs = probs.view(dout_rows.shape[0], -1)  # [G m, L]
        dv_j[block].addmm_(probs.T, dout_rows)
        dprobs = dout_rows @ v_j[block].T  # [G m, L]
        dprobs -= delta_j.index_select(1, rows).view(-1, 1)
        dscores = probs.mul_(dprobs)  # [G m, L], d(loss)/d(scaled score)
        dq_j.index_add_(1, rows, (dscores @ keys).view(q_rows.shape))
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
        grads = tuple(torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
        row_sums = output_row_sums(dout, out)
        selection_backward(dout, q, k, v, row_sums, lse, ctx.plans, ctx.sides, ctx.scale, grads)
        dq, dk, dv = (g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
        return dq, dk, dv, None, None, None, None
