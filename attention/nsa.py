"""NSA: native sparse attention (SPECS.md 3.1), three gated branches per query.

``o = g_cmp o_cmp + g_slc o_slc + g_win o_win`` with gates ``sigmoid(Linear(x))`` per head and
branch (x is the layer's normed input, ``ctx.hidden``):

- compression: key/value blocks of ``l`` tokens at stride ``d`` are summarised by learnable maps
  phi (``BlockCompressor``); query t sees compressed block i only when ``t >= i d + l - 1``.
- selection: the compression attention probabilities, summed over the query heads of a GQA
  group, score the compressed blocks; a selection block of ``l'`` tokens scores the sum of the
  compressed blocks overlapping it. Each query keeps the top ``n`` selection blocks that start
  at or before it, always including its document's first block (block 0 unpacked; with packed
  documents the block holding the first token of the query's document, so no forced block is
  hidden by the document mask) and its two most recent blocks, and attends to their raw tokens
  (causal inside its own block). Ties go to the lower block index.
- sliding window: the last ``w`` tokens (``0 <= t - j < w``).

A branch with no visible key contributes 0. Cost: the compressed branch reads ``T / d`` keys
and the window branch ``w`` (``nsa_branches``: materialised probabilities per query chunk,
which sees only the keys it can; the compressed forward inside the importance pass), and the
selection branch is block-major (``nsa_selection``: per key block, one GEMM against the
queries that chose it, so it costs ``n l'`` keys per query whatever the selections look like);
nothing T x T exists. Memory: the gated sum runs as one autograd function
(``nsa_gated.GatedBranchAttention``) that frees the selection branch's output at the start of
backward and takes the other two branches' gradients from their probabilities, re-formed from
their saved lse (no output recomputed). ``attention.backend`` does not apply: the branches are
plain GEMMs and elementwise ops on any device; ``attention.chunk_size`` sets the window tile.

Measured (``bench/sparse_nsa_mosa.py``, B=1, Hq=8, Hkv=2, D=64, fp32, one thread, T=32768,
token-major inputs and a random output gradient as the model hands them over, 2026-12-05
11:30 UTC, machine shared with a helper's test runs): fwd+bwd 2.96x (random inputs) / 2.92x
(coherent) faster than dense (32.2 s against 10.9 / 11.0 s; in alternating runs the same case
took 11.5-12.5 s before the compressed and window backwards were materialised, 10.6-10.9 s
after). Peak memory 0.96x dense for both input kinds (157 against 164 MiB, 2026-12-05 14:40,
steady within 0.5 MiB over 9 runs once the bench fixed glibc's mmap threshold before drawing its
inputs; the floor is the forward's out and saved selection output, 128 MiB, against dense
attention's out, dq, dk and dv in its backward, 160 MiB). In the day's later full runs (dense
34.6-37.8 s) the speed-up was 2.86-3.26x: NSA's 10.6-13.0 s moves with the machine as much as
its ratio does. Where the time goes (one run of
13.1 s on a slower machine): forward 5.1 s (selection 2.1, compressed with the importance 1.2,
window 0.8, top-n 0.3), backward 7.8 s (selection 3.7, compressed 2.4, window 1.6). Most of it
is GEMMs; the rest is the selection's row gathers and scatter-adds (bound by memory: rows of
scattered tokens) and per-op overhead (~300k small ops). NSA scores ~15% of dense causal
attention's (query, key) pairs.
Packed documents: a compressed block is visible only inside one document, and every raw token
must share the query's document.

Sequence parallelism: keys are the whole sequence in order (``sequence_keys``), queries any
tokens at their global positions (``ctx.seq_positions``), so the same code runs unsharded, under
Ulysses (every token of a head subset; the gates are sliced to the rank's heads by
``restrict_to_heads``) and under the ring group by key gather (this rank's zigzag queries against
all-gathered K, V: compression and selection over the global key blocks, the window by global
positions, the gates from the local queries' ``ctx.hidden``). Gathering K, V replaces SPECS
3.1's "all-gather the compressed keys, then fetch the selected raw blocks": exact and simpler,
for ``B x Hkv x T x D`` of replicated keys per rank. GQA groups share one selection, so a Ulysses
degree must divide the kv heads (no replicated kv heads; ``NSAAttention.recipe_problem``).

The window branch uses ``attention.nsa.window``; a model's own ``sliding_window``
(Mistral/Qwen2) is refused (``supports_window`` is False) rather than silently dropped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.attention.config import AttentionConfig, NSAConfig
from longctx.attention.context import AttentionContext
from longctx.attention.core import AttentionCore, AttentionShape
from longctx.attention.nsa_branches import (
    ACCELERATOR_WINDOW_TILE,
    WINDOW_TILE,
    BranchChunk,
    CompressedBranch,
    WindowBranch,
    attend,
    transposed,
)
from longctx.attention.nsa_gated import GatedBranchAttention, NSAProblem
from longctx.attention.nsa_selection import QueryKeySides
from longctx.attention.sequence_keys import sequence_keys
from longctx.errors import LongctxError
from longctx.positional.config import PositionalConfig

# Segments (of gcd(l, d) tokens) per step of the compressors' segment GEMM: bounds the copy of
# a token-major k or v that the step makes (256 segments of 16 tokens: 2 MiB at Hkv=2, D=64).
SEGMENT_CHUNK = 256
# Gate biases for (compression, selection, window) when NSA continues a dense model: the
# window branch (dense attention over the recent past) dominates at first (SPECS 3.1).
DENSE_START_GATE_BIAS = (-2.0, -2.0, 2.0)


def _segments(x: Tensor, seg: int, part: slice) -> Tensor:
    """Segments ``part`` of x [B, H, T, D] cut into ``seg``-token segments: [B H, s, seg D] (a
    view of a head-major x, a copy of a token-major one)."""
    batch, heads, _, dim = x.shape
    tokens = x[:, :, part.start * seg : part.stop * seg]
    return tokens.reshape(batch * heads, -1, seg * dim)


class _SegmentMaps(torch.autograd.Function):
    """``(x, weight, seg, used) -> segments(x[:, :, :used]) @ weight.T`` [B H, used / seg, O]
    for x [B, H, T, D] (``used`` a multiple of seg), keeping only x and weight for backward.

    The segments are a view of a head-major x but a copy of a token-major one (the model's k, v,
    views of the projections' outputs), and the matmul's autograd would keep that copy until
    backward: 16 MiB per map at T=32768, Hkv=2, two maps per layer. Here the copy is made
    ``SEGMENT_CHUNK`` segments at a time, in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, seg: int, used: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.seg, ctx.used = seg, used
        batch, heads = x.shape[:2]
        out = x.new_empty(batch * heads, used // seg, weight.shape[0])
        for part in _slices(used // seg, SEGMENT_CHUNK):
            out[:, part] = _segments(x, seg, part) @ weight.T
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        seg = ctx.seg
        batch, heads, _, dim = x.shape
        dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None  # 0 past ``used``
        dweight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for part in _slices(ctx.used // seg, SEGMENT_CHUNK):
            rows = grad[:, part]  # [B H, s, O]
            if dweight is not None:
                dweight.addmm_(rows.flatten(0, 1).T, _segments(x, seg, part).flatten(0, 1))
            if dx is not None:
                tokens = slice(part.start * seg, part.stop * seg)
                dx[:, :, tokens] = (rows @ weight).view(batch, heads, -1, dim)
        return dx, dweight, None, None


class BlockCompressor(nn.Module):
    """phi: one summary vector per block of ``block`` tokens, taken every ``stride`` tokens.

    ``phi(X) = mean_j X_j + W_out silu(W_in flatten(X + P) + b_in) + b_out`` where P [block, D]
    is the intra-block position embedding. The mean-pooling term lets ``init_new_parameters``
    start phi as plain mean pooling (``W_out = 0``, ``P = 0``), a sensible summary of a trained
    model's keys; the MLP learns what pooling misses. The parameters are held directly (not in
    ``nn.Linear``) so that ``load_hf`` finds them as this module's new parameters.
    """

    def __init__(self, block: int, stride: int, head_dim: int, std: float):
        super().__init__()
        self.block, self.stride, self.std = block, stride, std
        self.position = nn.Parameter(torch.empty(block, head_dim))  # [l, D]
        self.in_weight = nn.Parameter(torch.empty(head_dim, block * head_dim))  # [D, l D]
        self.in_bias = nn.Parameter(torch.empty(head_dim))
        self.out_weight = nn.Parameter(torch.empty(head_dim, head_dim))  # [D, D]
        self.out_bias = nn.Parameter(torch.empty(head_dim))
        with torch.no_grad():  # from scratch: every weight ~ N(0, std), biases 0
            for weight in (self.position, self.in_weight, self.out_weight):
                weight.normal_(0.0, std)
            self.in_bias.zero_()
            self.out_bias.zero_()

    def num_blocks(self, length: int) -> int:
        """Compressed blocks of a sequence of ``length`` tokens (0 when shorter than a block)."""
        return 0 if length < self.block else (length - self.block) // self.stride + 1

    def forward(self, x: Tensor) -> Tensor:
        """x [B, H, T, D] -> [B, H, nc, D], block i summarising tokens [i d, i d + l - 1].

        Both linear maps of a block (``W_in flatten(X)`` and the mean) are sums over its
        segments of ``g = gcd(l, d)`` tokens: the sequence is cut into segments [.., T / g, g D]
        (``_SegmentMaps``), ONE GEMM maps every segment to its l / g partial products of each
        map, and block i adds those of its segments ``i d / g + c`` (strided slices). Against a
        strided conv1d plus avg_pool1d (the former form), this keeps no unfolded or im2col
        buffer: at T=32768 (2 heads, D=64, l=32, d=16) the conv's forward and backward
        temporaries raised NSA's peak resident memory by ~50 MiB; the GEMM's are
        [.., T / g, 2 l D / g] floats.
        """
        batch, heads, length, dim = x.shape
        count = self.num_blocks(length)
        seg = math.gcd(self.block, self.stride)
        parts, step = self.block // seg, self.stride // seg  # segments per block, per stride
        used = (count - 1) * self.stride + self.block  # tokens covered by some block
        in_parts = self.in_weight.view(dim, parts, seg * dim).transpose(0, 1)  # [l/g, D, gD]
        mean_parts = torch.eye(dim, dtype=x.dtype, device=x.device).repeat(1, seg) / self.block
        weight = torch.cat(
            [in_parts.flatten(0, 1), mean_parts.expand(parts, dim, -1).flatten(0, 1)]
        )
        products = _SegmentMaps.apply(x, weight, seg, used)  # [BH, S, 2 (l/g) D]
        inner = pooled = 0
        for c in range(parts):  # block i reads segment i * step + c
            rows = products[:, c : c + (count - 1) * step + 1 : step]  # [BH, nc, 2 (l/g) D]
            inner = inner + rows[..., c * dim : (c + 1) * dim]
            pooled = pooled + rows[..., (parts + c) * dim : (parts + c + 1) * dim]
        bias = self.in_bias + self.in_weight @ self.position.flatten()  # [D]: W_in flatten(P)
        summary = pooled + F.linear(F.silu(inner + bias), self.out_weight, self.out_bias)
        return summary.view(batch, heads, count, dim)

    @torch.no_grad()
    def init_new_parameters(self) -> None:
        """Start as mean pooling: P = 0, W_out = 0 (W_in ~ N(0, std) so gradients flow)."""
        self.position.zero_()
        self.in_weight.normal_(0.0, self.std)
        self.in_bias.zero_()
        self.out_weight.zero_()
        self.out_bias.zero_()


class BranchGates(nn.Module):
    """``sigmoid(x W^T + b)``: one gate per (head, branch); [B, T, d] -> [3, B, h, T, 1].

    ``h`` is every head of the layer, or the heads ``restrict_to_heads`` named (a Ulysses
    rank's subset: the rows of the other heads stay, their gradients come from their ranks).
    """

    def __init__(self, hidden_size: int, heads: int, std: float):
        super().__init__()
        self.heads = heads
        self.active = slice(0, heads)  # the heads this module gates
        self.weight = nn.Parameter(torch.empty(3 * heads, hidden_size))  # row h * 3 + branch
        self.bias = nn.Parameter(torch.zeros(3 * heads))
        with torch.no_grad():
            self.weight.normal_(0.0, std)

    def restrict_to_heads(self, start: int, stop: int) -> None:
        """Gate heads ``start .. stop - 1`` of the layer only."""
        self.active = slice(start, stop)

    def forward(self, hidden: Tensor) -> Tensor:
        batch, length, _ = hidden.shape
        rows = slice(3 * self.active.start, 3 * self.active.stop)
        gates = torch.sigmoid(F.linear(hidden, self.weight[rows], self.bias[rows]))  # [B, T, 3h]
        heads = self.active.stop - self.active.start
        return gates.view(batch, length, heads, 3).permute(3, 0, 2, 1)[..., None]

    @torch.no_grad()
    def init_new_parameters(self) -> None:
        """Continuing a dense model: W = 0, biases (-2, -2, +2) so the window branch leads."""
        self.weight.zero_()
        self.bias.copy_(torch.tensor(DENSE_START_GATE_BIAS).repeat(self.heads))


def _selection_overlap(num_compressed: int, settings: NSAConfig, num_select: int) -> Tensor:
    """Compressed blocks overlapping each selection block: [ns, L] indices, -1 padding.

    Compressed block i covers [i d, i d + l - 1], selection block j covers [j l', j l' + l' - 1];
    they overlap iff ``i d <= j l' + l' - 1`` and ``i d + l - 1 >= j l'``.
    """
    stride, length, select = (
        settings.compress_stride,
        settings.compress_block,
        settings.select_block,
    )
    starts = torch.arange(num_select) * select  # [ns]
    first = torch.clamp(starts - length + 1 + stride - 1, min=0) // stride  # ceil((s-l+1)/d)
    last = torch.clamp((starts + select - 1) // stride, max=num_compressed - 1)
    width = max(1, int((last - first + 1).max().clamp(min=1)))
    index = first[:, None] + torch.arange(width)[None, :]  # [ns, L]
    return torch.where(index <= last[:, None], index, torch.full_like(index, -1))


def _selection_scores(
    per_block: Tensor, started: int, settings: NSAConfig, overlap: Tensor | None
) -> Tensor:
    """Importance of selection blocks ``0 .. started - 1``: per_block [..., visible] (the
    compressed blocks' importance) summed over the compressed blocks overlapping each selection
    block -> [..., started].

    When d divides l' (the SPECS defaults), selection block j overlaps compressed blocks
    ``j k - a .. j k + k - 1`` (k = l' / d, a = (l - 1) // d): a strided window, summed from
    an ``unfold`` view of the zero-padded row (at T=32768, 0.2 s less forward than gathering
    through ``overlap``, which the other case needs: ``_selection_overlap`` [ns, L])."""
    visible, stride = per_block.shape[-1], settings.compress_stride
    if overlap is None:
        per, before = settings.select_block // stride, (settings.compress_block - 1) // stride
        padded = F.pad(per_block, (before, started * per - visible))  # [..., before + started k]
        return padded.unfold(-1, per + before, per).sum(-1)
    padded = F.pad(per_block, (0, 1))  # index -1 reads the zero column
    index = overlap[:started]
    return padded[..., torch.where(index < visible, index, -1)].sum(-1)


def _compressed_doc_ids(doc_ids: Tensor, num_compressed: int, settings: NSAConfig) -> Tensor:
    """[B, nc] document of each compressed block; -1 when the block spans two documents (so it
    matches no query's document)."""
    starts = torch.arange(num_compressed, device=doc_ids.device) * settings.compress_stride
    first_doc = doc_ids[:, starts]
    last_doc = doc_ids[:, starts + settings.compress_block - 1]
    return torch.where(first_doc == last_doc, last_doc, torch.full_like(last_doc, -1))


def _document_first_blocks(sides: QueryKeySides, select_block: int) -> Tensor | None:
    """[B, Tq] the selection block holding the first token of each query's document (None
    unpacked: block 0 for every query).

    Packed documents are contiguous runs of ``k_doc_ids`` (key j at global position j, so this
    holds under sequence parallelism too): a key starts its document where its doc id differs
    from the previous key's, and a query's document starts at the last such start at or before
    its global position."""
    if sides.k_doc_ids is None:
        return None
    docs = sides.k_doc_ids  # [B, Tk]
    positions = torch.arange(docs.shape[1], device=docs.device)
    starts = F.pad(docs[:, 1:] != docs[:, :-1], (1, 0), value=True)  # [B, Tk]
    first = torch.where(starts, positions, 0).cummax(dim=1).values  # [B, Tk]
    index = sides.q_positions.to(docs.device).expand(docs.shape[0], -1)
    return first.gather(1, index) // select_block


def _slices(length: int, size: int) -> list[slice]:
    """``range(length)`` in consecutive slices of ``size``."""
    return [slice(a, min(a + size, length)) for a in range(0, length, size)]


def _top_blocks(ranked: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` largest entries of ``ranked`` [..., ns], ties to the lower index:
    [..., keep] in increasing index order (the selection is a set).

    ``topk`` alone breaks ties arbitrarily; here its k-th value is the threshold, every entry
    above it is kept and the remaining places go to the first entries equal to it.
    """
    threshold = ranked.topk(keep, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = ranked > threshold
    at = ranked == threshold
    places = keep - above.sum(-1, keepdim=True)  # [..., 1]
    kept = above | (at & (at.cumsum(-1) <= places))  # exactly ``keep`` per row
    return kept.nonzero()[:, -1].view(*ranked.shape[:-1], keep)


class NSAAttention(AttentionCore):
    """The NSA core: ``(q, k, v, ctx) -> out``; q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D].

    Queries at ``ctx.seq_positions``, keys the whole sequence (``sequence_keys``): it runs on
    gathered keys under the ring group (``accepts_gathered_keys``). Its gates read the layer
    input (``reads_hidden``) and are per head (``has_head_parameters``).
    """

    reads_hidden = True
    accepts_gathered_keys = True
    supports_window = False
    has_head_parameters = True

    def __init__(
        self, shape: AttentionShape, attention: AttentionConfig, positional: PositionalConfig
    ):
        super().__init__(shape, attention, positional)
        settings = attention.nsa
        self.settings = settings
        std, dim = shape.initializer_range, shape.head_dim
        block, stride = settings.compress_block, settings.compress_stride
        self.compress_key = BlockCompressor(block, stride, dim, std)
        self.compress_value = BlockCompressor(block, stride, dim, std)
        self.gates = BranchGates(shape.hidden_size, shape.num_heads, std)
        self.group = shape.num_heads // shape.num_kv_heads  # query heads per selection

    @classmethod
    def recipe_problem(cls, shape, attention, positional, *, ulysses, ring) -> str | None:
        """The model's sliding window is refused (the window branch is ``attention.nsa.window``).
        Ring (key gather) always works; Ulysses needs whole GQA groups on each rank, because the
        query heads of a group share one block selection."""
        problem = super().recipe_problem(shape, attention, positional, ulysses=ulysses, ring=ring)
        if problem is not None or ulysses == 1:
            return problem
        if shape.num_kv_heads % ulysses:
            return (
                f"attention.variant 'nsa' shares one block selection per GQA group, but "
                f"parallel.ulysses={ulysses} does not divide num_key_value_heads="
                f"{shape.num_kv_heads} (the group would be split over ranks); choose "
                "parallel.ulysses dividing the kv heads and shard the rest with parallel.ring"
            )
        return None

    def restrict_to_heads(self, start: int, stop: int) -> None:
        """Compute heads ``start .. stop - 1`` of the layer only (a Ulysses rank's subset): the
        gates are per head; compression (shared by all heads) needs nothing."""
        self.gates.restrict_to_heads(start, stop)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (rotated) -> out [B, Hq, Tq, D]."""
        if ctx.hidden is None:
            raise LongctxError(
                "NSA needs the layer input (ctx.hidden) for its gates; call the core from the "
                "model's attention layer, which sets it"
            )
        gates = self.gates(ctx.hidden)  # [3, B, Hq, Tq, 1]: compression, selection, window
        return self._gated(q, k, v, ctx, gates)

    def branches(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The ungated (compression, selection, window) outputs, each [B, Hq, Tq, D]: the fused
        function with one gate at 1 and the others at 0 (for inspection and tests; three
        passes)."""
        batch, heads, length = q.shape[:3]
        unit = torch.eye(3, dtype=q.dtype, device=q.device)[:, :, None, None, None, None]
        return tuple(
            self._gated(q, k, v, ctx, unit[i].expand(3, batch, heads, length, 1)) for i in range(3)
        )

    def _gated(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, gates: Tensor
    ) -> Tensor:
        """``sum_b gates[b] o_b`` [B, Hq, Tq, D] through ``GatedBranchAttention``."""
        if q.shape[1] != k.shape[1] * self.group:
            raise LongctxError(
                f"NSA shares one block selection per GQA group of {self.group} query heads, but "
                f"this core got {q.shape[1]} query heads over {k.shape[1]} kv heads (kv heads "
                "replicated by Ulysses); choose parallel.ulysses dividing num_key_value_heads"
            )
        keys = sequence_keys(k, v, ctx, "nsa")
        k, v = keys.k, keys.v  # [B, Hkv, Tk, D], key j at global position j
        sides = QueryKeySides(ctx.seq_positions.to(q.device), ctx.doc_ids, keys.doc_ids)
        settings, length = self.settings, k.shape[2]
        num_compressed = self.compress_key.num_blocks(length)
        ck = cv = compressed = None
        scale = 1.0 / math.sqrt(q.shape[-1])
        if num_compressed:  # else shorter than one block: no compressed key, zero importance
            ck, cv = self.compress_key(k), self.compress_value(v)  # [B, Hkv, nc, D]
            block_ends = (
                torch.arange(num_compressed, device=q.device) * settings.compress_stride
                + settings.compress_block - 1
            )  # fmt: skip
            block_docs = None
            if sides.k_doc_ids is not None:
                block_docs = _compressed_doc_ids(sides.k_doc_ids, num_compressed, settings)
            compressed = CompressedBranch(
                sides, block_ends, block_docs, settings.compress_block, settings.compress_stride
            )
        default_tile = WINDOW_TILE if q.device.type == "cpu" else ACCELERATOR_WINDOW_TILE
        tile = self.config.chunk_size or default_tile
        window = WindowBranch(sides, settings.window, tile)

        def select(queries, ck, cv, take_compressed) -> Tensor:
            return self._select_blocks(
                queries, ck, cv, length, compressed, sides, scale, take_compressed
            )

        problem = NSAProblem(sides, scale, compressed, window, select, settings.select_block)
        return GatedBranchAttention.apply(q, k, v, ck, cv, gates, problem)

    def _select_blocks(
        self, q, ck, cv, length, compressed, sides, scale, take_compressed
    ) -> Tensor:
        """Top-n selection blocks per (batch, kv head, query) over ``length`` keys:
        [B, Hkv, Tq, n] int32, -1 = none (written chunk by chunk into one int32 tensor: at
        T=32768 a list of int64 chunks and their concatenation held 16 MiB instead of 4).

        The importance comes from the compressed branch (``compressed``, None when the sequence
        is shorter than one block: all zero) on ck, cv [B, Hkv, nc, D], whose output and lse
        each chunk hands to ``take_compressed(rows, o_cmp, lse)``."""
        settings = self.settings
        batch, heads = q.shape[:2]
        select = settings.select_block
        num_select = -(-length // select)
        keep = min(settings.select_top_n, num_select)
        block_index = torch.arange(num_select, device=q.device)
        overlap, chunks = None, [BranchChunk(slice(0, q.shape[2]), slice(0, 0), None)]
        ck_t = None if ck is None else transposed(ck)
        if compressed is not None:
            if select % settings.compress_stride:  # irregular overlaps: an index
                overlap = _selection_overlap(ck.shape[2], settings, num_select).to(q.device)
            chunks = compressed.chunks(batch * heads)
        doc_first = _document_first_blocks(sides, select)  # [B, Tq] or None: block 0
        kv_heads = heads // self.group
        chosen = torch.empty(batch, kv_heads, q.shape[2], keep, dtype=torch.int32, device=q.device)
        for chunk in chunks:
            rows = chunk.rows
            query_pos = sides.q_positions[rows]  # [c]
            started_blocks = min(num_select, int(query_pos.max()) // select + 1)  # any query sees
            if chunk.width:
                probs, o_cmp, lse = attend(q, ck, cv, chunk, scale, ck_t)  # [B, Hkv, G, c, nv]
                take_compressed(rows, o_cmp, lse)
                scores = _selection_scores(probs.sum(2), started_blocks, settings, overlap)
            else:  # no compressed block seen: all zero
                dtype = torch.promote_types(q.dtype, torch.float32)
                scores = q.new_zeros(batch, kv_heads, len(query_pos), started_blocks, dtype=dtype)
            current = (query_pos // select)[:, None]  # [c, 1]
            index = block_index[:started_blocks]
            started = index[None, :] <= current  # block begins at or before the query
            first = 0 if doc_first is None else doc_first[:, None, rows, None]  # [B, 1, c, 1]
            forced = (index == first) | (index == current) | (index == current - 1)
            ranked = torch.where(started, scores, float("-inf"))
            ranked = torch.where(forced & started, float("inf"), ranked)
            ranked = F.pad(ranked, (0, max(0, keep - started_blocks)), value=float("-inf"))
            top = _top_blocks(ranked, keep)  # [B, Hkv, c, keep]
            chosen[:, :, rows] = torch.where(top <= current, top, -1)  # not started: fewer than n
        return chosen

    def extra_repr(self) -> str:
        s = self.settings
        return (
            f"l={s.compress_block}, d={s.compress_stride}, l'={s.select_block}, "
            f"n={s.select_top_n}, w={s.window}, window_tile={self.config.chunk_size or 'auto'}"
        )
