"""Attention whose logits come from a score module: the kernel of CoPE and TAPA, and BAM's core.

BAM's core (``BAMAttention``) does not use the query-chunked kernel below: its prior depends on
the distance only, so it runs inside the flash-style tiled kernel (``attention/biased.py``).

Some position encodings need the whole row of logits of a query before its softmax (CoPE counts
gates along the row) or replace the dot product altogether (TAPA), so they cannot ride inside a
flash kernel that only ever sees one key tile. ``scored_attention`` cuts the QUERIES into chunks
of ``chunk_size`` and computes, per chunk, the logits against every key with the score module,
masks them, and applies the softmax. Each chunk runs under activation checkpointing: the forward
keeps only its output, and the backward recomputes the chunk's logits. Peak memory is therefore
O(B * H * chunk * T), never the T x T matrix of a naive implementation (bench/positional.py).
A chunk is given only the run of keys that holds every key it sees (``visible_key_ranges``:
from the mask's tile classes, in tiles of ``chunk`` keys), so under a causal mask the chunks do
half the work of all-keys rows, and under a sliding window O(window) each; the keys left out
are invisible to every row of the chunk, so each score term's row (CoPE's gate sums, SSMax's
key count) is unchanged. The chunks write into one output tensor (no list of chunk outputs
concatenated at the end, which held the output twice).

A score module is any ``nn.Module`` with
``scores(q, k, q_positions, k_positions, visible, heads) -> logits`` (see ``ScoreTerm``); its
own parameters (CoPE embeddings, BAM priors) get gradients through the recomputation.

Sequence parallelism. Under Ulysses the core runs on the full sequence of a contiguous subset
of the heads; ``ScoredAttention.restrict_to_heads`` tells it which, so per-head parameters are
sliced to match (the parameters stay whole: the gradients of the other heads come from their
ranks). Under ring (``parallel.ring > 1``) the core opts into key-gather context parallelism
(``accepts_gathered_keys``, ``parallel/key_gather.py``): each rank keeps its T/P zigzag queries
and receives every key and value of the ring group sorted by global position, so the queries
are a rectangle ``Tq != Tk`` and every key-side quantity (positions, document ids) comes from
``ctx.k_*``. With the whole row of keys present, every score term is computed exactly as on
one device: CoPE's gate sums over the keys between j and i, BAM's distances and SSMax's key
count ``n_i`` (the GLOBAL number of keys query i sees), TAPA's distances. This replaces the
two-pass cross-rank scan of SPECS 2.2 (a first ring pass for each query's gate sums per key
block, an exclusive scan for the block offsets, a second pass to attend): the scan is exact
too but needs two ring passes and a per-block bookkeeping of CoPE's clamp, whereas the gather
is one collective with the unchanged kernel. Its cost: K and V of the whole sequence,
``T x Hkv x D`` each, are replicated on every rank (the logits stay O(B x H x chunk x T), as
on one device); TAPA, whose scores would merge block by block, and BAM's tiled kernel take the
same key-gather path.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longctx.attention.biased import DEFAULT_TILE, distance_range, relative_bias_attention
from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.core import AttentionCore, AttentionShape
from longctx.attention.mask import MaskSpec, TileClass
from longctx.attention.tiling import compute_dtype, visible_key_counts
from longctx.positional.bam import BAMScore
from longctx.positional.config import PositionalConfig
from longctx.positional.cope import CoPEScore
from longctx.positional.tapa import TAPAScore

DEFAULT_QUERY_CHUNK = 256  # queries per chunk when the recipe gives no attention.chunk_size


class ScoreTerm(Protocol):
    """Computes the attention logits of a query chunk against all keys.

    q [B, H, c, D], k [B, H, Tk, D] (kv heads already repeated to H), q_positions [c] and
    k_positions [Tk] global sequence indices (keys in any order), visible [Bm, c, Tk] bool
    (Bm 1 or B), ``heads``: which of the layer's heads these H are (a slice of its per-head
    parameters) -> logits [B, H, c, Tk] in q's dtype. Entries where ``visible`` is False are
    ignored by the kernel (a score term that reads the row, like CoPE's gates, must zero them).
    """

    def scores(
        self,
        q: Tensor,
        k: Tensor,
        q_positions: Tensor,
        k_positions: Tensor,
        visible: Tensor,
        heads: slice,
    ) -> Tensor: ...


def repeat_kv_heads(x: Tensor, heads: int) -> Tensor:
    """[B, Hkv, T, D] -> [B, heads, T, D]: kv head h serves query heads h*g .. h*g+g-1 (GQA)."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def masked_softmax(logits: Tensor, visible: Tensor) -> Tensor:
    """Softmax over the last dim of ``logits`` [B, H, c, Tk] restricted to ``visible``
    [Bm, 1, c, Tk]; a row without any visible key gets probabilities 0 (never NaN)."""
    row_has_key = visible.any(dim=-1, keepdim=True)  # [Bm, 1, c, 1]
    masked = logits.masked_fill(~visible, float("-inf"))
    masked = masked.masked_fill(~row_has_key, 0.0)  # all-masked rows: finite stand-in
    return torch.softmax(masked, dim=-1) * row_has_key


def visible_key_ranges(mask: MaskSpec, chunk: int) -> list[slice | None]:
    """Per chunk of ``chunk`` queries of a bound ``mask``, the run of key indices, in whole tiles
    of ``chunk`` keys, outside which the chunk sees no key; None for a chunk that sees none.

    From the mask's tile classes (per-tile position and doc-id bounds, nothing [Tq, Tk]); the
    run may hold invisible keys (a row's own mask still applies), never leaves a visible one out.
    """
    tk = mask.k_positions.shape[0]
    classes, _ = mask.classify_tiles(chunk, chunk)  # [query chunks, key tiles]
    seen = classes != TileClass.EMPTY
    first = seen.int().argmax(dim=1)
    last = seen.shape[1] - 1 - seen.flip(1).int().argmax(dim=1)
    return [
        slice(lo * chunk, min((hi + 1) * chunk, tk)) if any_seen else None
        for lo, hi, any_seen in zip(first.tolist(), last.tolist(), seen.any(dim=1).tolist())
    ]


def _chunk_attention(
    score: ScoreTerm,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tile: MaskSpec,
    heads: slice,
) -> Tensor:
    """Exact attention of one query chunk: q [B, H, c, D], k/v [B, H, Tk, D] -> [B, H, c, D]
    (Tk: the chunk's run of keys).

    ``tile`` is the chunk's rows of the bound mask; its [Bm, c, Tk] visibility is rebuilt here
    (also in the recomputation), so no chunk keeps one between forward and backward.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    visible = tile.dense_mask()  # [Bm, c, Tk]
    q_positions, k_positions = tile.q_positions, tile.k_positions
    logits = score.scores(q.to(compute), k.to(compute), q_positions, k_positions, visible, heads)
    probs = masked_softmax(logits, visible[:, None])  # [B, H, c, Tk]
    return (probs @ v.to(compute)).to(q.dtype)


def scored_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    score: ScoreTerm,
    *,
    mask: MaskSpec,
    chunk_size: int | None = None,
    heads: slice = slice(None),
) -> Tensor:
    """Masked softmax attention with logits from ``score``, chunked over queries.

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (Hq % Hkv == 0) -> out [B, Hq, Tq, D] in q's dtype;
    computed in float32 (float64 stays float64). ``mask`` (positions global, as everywhere) says
    which keys each query sees; rows without a visible key give 0. Differentiable w.r.t. q, k,
    v and the score module's parameters; the backward recomputes one chunk at a time.
    ``heads``: which of the score module's per-head parameters the Hq heads use (all).
    """
    tq, tk = q.shape[2], k.shape[2]
    if tq == 0 or tk == 0:
        return torch.zeros_like(q)
    mask = mask.bind(tq, tk, device=q.device)
    k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])
    chunk = chunk_size or DEFAULT_QUERY_CHUNK
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad
        or k.requires_grad
        or v.requires_grad
        or any(p.requires_grad for p in getattr(score, "parameters", list)())
    )
    out = torch.zeros_like(q)
    for start, keys in zip(range(0, tq, chunk), visible_key_ranges(mask, chunk)):
        if keys is None:  # no query of the chunk sees a key: its rows stay 0
            continue
        rows = slice(start, min(start + chunk, tq))
        args = (score, q[:, :, rows], k[:, :, keys], v[:, :, keys], mask.slice(rows, keys), heads)
        if needs_grad:
            out[:, :, rows] = checkpoint(_chunk_attention, *args, use_reentrant=False)
        else:
            out[:, :, rows] = _chunk_attention(*args)
    return out


class ScoredAttention(AttentionCore):
    """Attention core (the model's ``self_attn.core``) around a score module, ``self.score``.

    Masks like ``DenseAttention`` (causal on global positions, per document, the layer's
    sliding window, queries by ``ctx.seq_positions``, keys by ``ctx.k_seq_positions``); the
    score module sees the same global positions, so distances are measured on the sequence,
    which equals the per-document position difference inside a packed document. Runs on
    gathered keys under ring (``accepts_gathered_keys``; see the module docstring).
    The registered cores are its subclasses, one per score-side encoding: each has the core
    constructor ``(shape, attention, positional)`` and hands this base the layer's own
    ``ScoreTerm`` module.
    """

    accepts_gathered_keys = True

    def __init__(
        self,
        shape: AttentionShape,
        attention: AttentionConfig,
        positional: PositionalConfig,
        score: nn.Module,
    ):
        super().__init__(shape, attention, positional)
        self.score = score
        self.heads = slice(None)  # the layer's heads this core computes (all but under Ulysses)

    def restrict_to_heads(self, start: int, stop: int) -> None:
        """Compute heads ``start .. stop - 1`` of the layer only (a Ulysses rank's subset)."""
        self.heads = slice(start, stop)

    def mask_for(self, ctx: AttentionContext) -> MaskSpec:
        """Causal on global positions, per document, windowed."""
        return ctx.causal_mask(self.sliding_window)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> out [B, Hq, Tq, D]; Tk = Tq unless the
        keys were gathered (then ``ctx.key_*`` describe them)."""
        return scored_attention(
            q,
            k,
            v,
            self.score,
            mask=self.mask_for(ctx),
            chunk_size=self.config.chunk_size,
            heads=self.heads,
        )

    def extra_repr(self) -> str:
        return (
            f"chunk_size={self.config.chunk_size}, sliding_window={self.sliding_window}, "
            f"heads={self.heads}"
        )


class CoPEAttention(ScoredAttention):
    """Dense attention with CoPE's contextual positions in the logits (per-head tables unless
    ``positional.cope.shared_heads``)."""

    has_head_parameters = True

    def __init__(
        self, shape: AttentionShape, attention: AttentionConfig, positional: PositionalConfig
    ):
        super().__init__(
            shape,
            attention,
            positional,
            CoPEScore(positional.cope, num_heads=shape.num_heads, head_dim=shape.head_dim),
        )


class BAMAttention(ScoredAttention):
    """Dense attention with BAM's per-head priors (and SSMax) in the logits.

    Its prior depends on the distance only, so it does not take the query-chunked path of
    the other score terms: the prior is evaluated once per distance (``BAMScore.prior_table``)
    and added per tile inside the flash-style tiled kernel (``attention/biased.py``), whose
    backward recomputes each tile and accumulates the prior's and SSMax's gradients per tile.
    SSMax's ``n_i`` is counted from the same tile plan (``visible_key_counts``): every key the
    query sees, also under key gather. ``attention.chunk_size`` is the tile (default 512)."""

    has_head_parameters = True

    def __init__(
        self, shape: AttentionShape, attention: AttentionConfig, positional: PositionalConfig
    ):
        super().__init__(
            shape,
            attention,
            positional,
            BAMScore(
                positional.bam,
                num_heads=shape.num_heads,
                head_dim=shape.head_dim,
                max_position_embeddings=shape.max_position_embeddings,
            ),
        )

    @property
    def tile(self) -> int:
        return self.config.chunk_size or DEFAULT_TILE

    def visible_key_counts(self, mask: MaskSpec) -> Tensor:
        """SSMax's ``n_i``: keys each query sees under the bound ``mask``, [Bm, Tq]."""
        return visible_key_counts(mask, self.tile)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> out [B, Hq, Tq, D] (see the class doc)."""
        if q.shape[2] == 0 or k.shape[2] == 0:
            return torch.zeros_like(q)
        mask = self.mask_for(ctx).bind(q.shape[2], k.shape[2], device=q.device)
        dtype = compute_dtype(q.dtype)
        low, high = distance_range(mask)
        distances = torch.arange(low, high + 1, device=q.device)
        # The O(T x H) table and row scale in float64: their gradients reach the few per-head
        # parameters as sums over every distance and row, which float32 would round
        wide = torch.promote_types(dtype, torch.float64)
        table = self.score.prior_table(distances, self.heads, wide)  # [Hq, N]
        row_scale = None
        if self.score.ssmax_scale is not None:
            counts = self.visible_key_counts(mask)  # [Bm, Tq]
            row_scale = self.score.ssmax_multiplier(counts, self.heads, wide)  # [Bm, Hq, Tq]
        return relative_bias_attention(
            q, k, v, table, low, mask=mask, row_scale=row_scale, scale=self.score.scale,
            tile=self.tile,
        )  # fmt: skip


class TAPAAttention(ScoredAttention):
    """Dense attention with TAPA's distance-aware logits (no per-head parameters)."""

    def __init__(
        self, shape: AttentionShape, attention: AttentionConfig, positional: PositionalConfig
    ):
        super().__init__(
            shape, attention, positional, TAPAScore(positional.tapa, head_dim=shape.head_dim)
        )
