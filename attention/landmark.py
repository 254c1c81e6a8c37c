"""Landmark attention (SPECS.md 3.4, Mohtashami and Jaggi): grouped softmax over blocks.

A landmark token follows every ``block_size`` regular tokens, so the sequence is a run of
groups of ``G = block_size + 1`` tokens whose last token is the landmark: sequence index ``p`` is
a landmark iff ``p % G == G - 1`` and belongs to block ``p // G``. ``insert_landmarks`` puts
them into a packed batch (labels -100 on landmarks, positions and doc ids kept consistent); the
core's ``transform_batch`` applies it, and the trainer calls that hook on every batch.

Grouped softmax, for a query in block c: the top-level softmax runs over the visible regular
tokens of block c (causal) and the landmarks of the earlier blocks; the weight landmark L_b wins
is shared among the regular tokens of block b by a softmax of their own logits; landmarks carry
no value. In log space the weight of a regular token j of block b < c is

    exp(s_Lb - lse_top) * exp(s_j - lse_b) = exp(s_j + s_Lb - lse_b - lse_top)

with ``lse_b`` the log-sum-exp of block b's visible logits and ``lse_top`` the log-sum-exp of the
top level. Documents: a token sees only its own document; a landmark counts only when its block
holds a visible regular token (else it would win weight that nothing receives).

Training (``module.training``) uses every earlier block. Inference retrieves, per query and
head, the ``retrieve_top_k`` earlier blocks with the largest landmark logits and runs the same
grouped softmax over those blocks plus the own block: cost ``O(T (T / G + (k + 1) G))`` instead
of ``O(T^2)``. With ``k`` >= the number of blocks, retrieval equals training.

Retrieval positions (``attention.landmark.retrieval_positions``). ``original``: every key keeps
the RoPE angle of its own position, so at 8-64x the trained length the landmark logits and the
retrieved blocks are seen at distances never trained. ``reference`` (default): the scheme of
the authors' inference code (epfml/landmark-attention, ``llama/llama_mem.py``,
``LlamaAttention.forward`` with ``mem_freq``): keys are kept BEFORE RoPE and rotated at positions
next to the local context. For a query in block c whose document has n earlier blocks, with
``top = min(k, n)`` (the reference's ``prefix_len = full_len - (top_k + 1) * (mem_freq + 1)``,
``full_len`` = c G here: its local context is the own block, i.e. its cached chunk is one
block):

- scoring: the landmarks of the ``top`` most recent earlier blocks keep their own positions;
  every older landmark is rotated at the position of the landmark of block ``c - top - 1``
  (the reference's ``mem_pos``);
- retrieved blocks: the chosen blocks, in increasing block order, fill the ``top + 1`` slots
  of G positions before the own block (blocks ``c - top - 1 .. c - 1``): the i-th (from 0)
  takes slot i, or slot i + 1 when it is one of the ``top`` most recent blocks (the
  reference's ``selected_indices``); a retrieved token at offset g of its block gets the
  position of offset g of its slot;
- the own block and the query keep their own positions.

So every key is seen at a distance below ``(k + 2) G``, whatever the length: within the trained
range when it is at least that. A query whose document has at most k earlier blocks retrieves
them all at their own positions, so it equals training (as ``original`` does). The core needs
the unrotated keys: it ``applies_rope_itself`` (the attention layer hands q, k unrotated and the
rotary tables in ``ctx.rotary``), and the slot positions are read from those tables (each slot
is a position of the query's own document, so per-document RoPE positions are respected).

Sequence parallelism: blocks are defined on GLOBAL positions, so the data path inserts the
landmarks into the whole sequence before ``shard_batch`` cuts it (``transform_batch`` in
``parallel/batch.py``), and any
layout keeps the block structure: the keys are the whole sequence in order (``sequence_keys``),
the queries any tokens at their global positions. Under Ulysses the core sees every token of a
head subset; under the ring group (key gather) this rank's zigzag queries against every key, so
the landmark logits of all earlier blocks and the within-block softmaxes are computed locally
from the gathered K, V (instead of SPECS 3.4's two passes over ring-held blocks: exact, and no
per-block bookkeeping across ranks). The layout's padding tokens (label -100) sit after every
real token and are never visible to one, whatever block they fall in. The sequence-parallel
wrappers declare this core's ``applies_rope_itself``, so under them too the model hands q, k
unrotated with ``ctx.rotary``: Ulysses all-gathers the tables with the tokens' metadata, key
gather all-gathers them with the keys into ``ctx.key_rotary`` (sorted like the keys), and the
core rotates its queries with ``ctx.rotary`` and its keys with ``ctx.k_rotary``. Rotation acts
position by position, so training and both retrieval schemes give the unsharded numbers under
every layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.core import AttentionCore, AttentionShape, Batch
from longctx.attention.sequence_keys import sequence_keys
from longctx.errors import LongctxError
from longctx.positional.config import PositionalConfig
from longctx.positional.rope import rotate_half, rotate_heads

IGNORE_INDEX = -100  # labels without loss (the cross-entropy's ignore index)
DEFAULT_QUERY_TILE = 256  # queries per tile when the recipe gives no chunk_size


def landmark_token_id(attention: AttentionConfig, vocab_size: int) -> int:
    """The landmark's token id: ``attention.landmark.token_id``, default the last vocab id."""
    token_id = attention.landmark.token_id
    return vocab_size - 1 if token_id is None else token_id


def insert_landmarks(
    batch: dict[str, Tensor], *, block_size: int, landmark_id: int
) -> dict[str, Tensor]:
    """A packed batch with a landmark token after every ``block_size`` tokens of each row.

    ``batch``: ``input_ids`` and optionally ``labels`` (pre-shifted: label t is the token after
    t), ``position_ids`` and ``doc_ids``, each [B, T]. Returns the same keys, each
    [B, T + T // block_size]. A regular token keeps its label (the next REGULAR token, so the
    landmark changes no prediction); a landmark gets label -100 and the doc id of the token
    before it; ``position_ids`` are recounted per document over the new row (a landmark takes a
    position like any token, as it will when inserted into a prompt at inference).
    """
    input_ids = batch["input_ids"]
    rows, length = input_ids.shape
    group = block_size + 1
    new_length = length + length // block_size
    regular_slot = regular_slots(length, block_size, input_ids.device)  # [T]
    is_landmark = torch.arange(new_length, device=input_ids.device) % group == block_size

    def spread(values: Tensor, fill: int) -> Tensor:
        out = torch.empty(rows, new_length, dtype=values.dtype, device=values.device)
        out[:, regular_slot] = values
        out[:, is_landmark] = fill
        return out

    landmark_source = torch.nonzero(is_landmark).squeeze(1) - 1  # index of the token before
    result = {"input_ids": spread(input_ids, landmark_id)}
    if "labels" in batch:
        result["labels"] = spread(batch["labels"], IGNORE_INDEX)
    doc_ids = batch.get("doc_ids")
    if doc_ids is not None:
        spread_docs = spread(doc_ids, 0)
        spread_docs[:, is_landmark] = spread_docs[:, landmark_source]
        result["doc_ids"] = spread_docs
    if "position_ids" in batch:
        docs = result.get("doc_ids")
        if docs is None:
            positions = torch.arange(new_length, device=input_ids.device).expand(rows, -1)
        else:
            starts = torch.ones_like(docs, dtype=torch.bool)
            starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
            token_index = torch.arange(new_length, device=docs.device).expand(rows, -1)
            start_index = torch.where(starts, token_index, 0).cummax(dim=1).values
            positions = token_index - start_index
        result["position_ids"] = positions.to(batch["position_ids"].dtype).contiguous()
    return result


def regular_slots(length: int, block_size: int, device: torch.device | None = None) -> Tensor:
    """[T] index of each of ``length`` regular tokens once the landmarks are inserted."""
    index = torch.arange(length, device=device)
    return index + index // block_size


def grouped_softmax_weights(
    scores: Tensor, token_visible: Tensor, own_block: Tensor, landmark_visible: Tensor
) -> Tensor:
    """Attention weights of the grouped softmax over ``m`` candidate blocks of ``G`` tokens.

    scores [B, H, tq, m, G] (scaled logits; slot G-1 is the block's landmark); token_visible
    [Bm, 1 or H, tq, m, G] (regular token visible to the query; False on landmark slots);
    own_block and landmark_visible [Bm, 1 or H, tq, m]. Returns weights [B, H, tq, m, G], zero
    on landmarks (they carry no value) and on hidden tokens; each row sums to 1 (0 when the
    query sees nothing).

    Each block's tokens get a within-block softmax (one fused op); each block then weighs
    ``exp(lse_b - lse_top)`` (own block) or ``exp(s_Lb - lse_top)`` (an earlier block): the
    grouped softmax of the module docstring with only [.., m]-sized top-level work.
    """
    hidden_logit = torch.finfo(scores.dtype).min / 4  # finite: the fused softmax stays NaN-free
    token_scores = scores.masked_fill(~token_visible, hidden_logit)  # [B, H, tq, m, G]
    within = torch.softmax(token_scores, dim=-1)
    block_lse = torch.logsumexp(token_scores, dim=-1)  # [B, H, tq, m]
    has_tokens = token_visible.any(-1)  # [Bm, 1 or H, tq, m]
    use_own = own_block & has_tokens
    use_landmark = landmark_visible & ~own_block & has_tokens
    used = use_own | use_landmark
    top_logits = torch.where(use_own, block_lse, scores[..., -1]).masked_fill(~used, -torch.inf)
    any_top = used.any(-1, keepdim=True)  # [.., tq, 1]: rows with no key get out 0, no NaN
    block_weight = torch.softmax(top_logits.masked_fill(~any_top, 0.0), dim=-1) * any_top
    return within * block_weight[..., None]  # [B, H, tq, m, G]


@dataclass(frozen=True)
class _UnrotatedKeys:
    """What ``reference`` retrieval rotates: keys before RoPE and the rotary tables of the key
    positions, both padded to whole blocks."""

    keys: Tensor  # [B, H, nb * G, D] unrotated, compute dtype
    cos: Tensor  # [B, nb * G, D]
    sin: Tensor  # [B, nb * G, D]

    def rotate(self, x: Tensor, index: Tensor) -> Tensor:
        """x [B, H, ..., D] rotated at the key positions ``index`` [B, H, ...] (int64)."""
        batch, dim = x.shape[0], x.shape[-1]
        flat = index.reshape(batch, -1, 1).expand(-1, -1, dim)  # [B, N, D]
        cos = self.cos.gather(1, flat).view(x.shape)
        sin = self.sin.gather(1, flat).view(x.shape)
        return x * cos + rotate_half(x) * sin


def _gather_blocks(x: Tensor, blocks: Tensor, group: int) -> Tensor:
    """x [B, H, nb * G, D] at block indices ``blocks`` [B, H, tq, m] -> [B, H, tq, m, G, D]."""
    batch, heads, length, dim = x.shape
    index = blocks.flatten(2)[..., None].expand(-1, -1, -1, group * dim)
    picked = x.reshape(batch, heads, length // group, group * dim).gather(2, index)
    return picked.view(*blocks.shape, group, dim)


def _table_rows(table: Tensor, index: Tensor) -> Tensor:
    """table [B, L, D] at ``index`` [Bm, 1, tq] -> [B, 1, tq, D]."""
    index = index.expand(table.shape[0], -1, -1).flatten(1)  # [B, tq]
    rows = table.gather(1, index[..., None].expand(-1, -1, table.shape[-1]))
    return rows[:, None]


class LandmarkAttention(AttentionCore):
    """Landmark attention core: grouped softmax in training, top-k block retrieval in eval.

    q [B, Hq, Tq, D] at global positions ``ctx.seq_positions``, k/v [B, Hkv, Tk, D] the whole
    sequence (any order; ``sequence_keys``) -> out [B, Hq, Tq, D]; the sequence must already hold
    the landmarks (``transform_batch``). Queries go in tiles of ``chunk_size`` (checkpointed in
    training), so no [Tq, Tk] tensor exists. Runs on gathered keys under the ring group; its
    blocks replace the model's sliding window (``supports_window`` is False).
    """

    accepts_gathered_keys = True
    supports_window = False
    applies_rope_itself = True  # ``reference`` retrieval re-positions unrotated keys

    def __init__(
        self, shape: AttentionShape, attention: AttentionConfig, positional: PositionalConfig
    ):
        super().__init__(shape, attention, positional)
        self.group = attention.landmark.block_size + 1
        self.top_k = attention.landmark.retrieve_top_k
        self.reposition = attention.landmark.retrieval_positions == "reference"

    @classmethod
    def recipe_problem(cls, shape, attention, positional, *, ulysses, ring) -> str | None:
        """Every sequence-parallel layout runs (see the module docstring), so ``ulysses`` and
        ``ring`` impose nothing; the model's sliding window and the landmark id are checked."""
        problem = super().recipe_problem(shape, attention, positional, ulysses=ulysses, ring=ring)
        if problem is not None:
            return problem
        vocab = shape.vocab_size
        token_id = landmark_token_id(attention, vocab)
        if token_id >= vocab:
            return (
                f"attention.landmark.token_id={token_id} is outside the vocabulary "
                f"(model.vocab_size={vocab}); pick an id below {vocab} or null"
            )
        return None

    @classmethod
    def transform_batch(
        cls, batch: Batch, shape: AttentionShape, attention: AttentionConfig
    ) -> Batch:
        """``insert_landmarks`` with ``attention.landmark.block_size`` and the landmark id."""
        return insert_landmarks(
            batch,
            block_size=attention.landmark.block_size,
            landmark_id=landmark_token_id(attention, shape.vocab_size),
        )

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> out [B, Hq, Tq, D]; q, k unrotated when
        ``ctx.rotary`` is set (this core rotates q with it and k with ``ctx.k_rotary``, exactly
        as the model would), else already rotated (or no RoPE)."""
        unrotated_k = None
        if ctx.rotary is not None:
            key_rotary = ctx.k_rotary  # the keys' tables: the queries' own, or gathered ones
            if key_rotary is None:
                raise LongctxError(
                    "LandmarkAttention got unrotated q, k with ctx.rotary for the queries but "
                    "no ctx.key_rotary for the gathered keys; the key-gather wrapper must "
                    "gather the keys' rotary tables (parallel/key_gather.py)"
                )
            unrotated_k = k
            q, k = rotate_heads(q, *ctx.rotary), rotate_heads(k, *key_rotary)
        whole = sequence_keys(k, v, ctx, "landmark")
        heads, queries, length = q.shape[1], q.shape[2], k.shape[2]
        group, blocks = self.group, -(-length // self.group)
        pad = blocks * group - length
        groups = heads // k.shape[1]
        # [B, Hq, nb * G, D]: padding keys are never visible (positions >= Tk).
        keys = nn.functional.pad(whole.k, (0, 0, 0, pad)).repeat_interleave(groups, 1)
        values = nn.functional.pad(whole.v, (0, 0, 0, pad)).repeat_interleave(groups, 1)
        in_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
        unrotated = None
        if not self.training and self.reposition and self.top_k < blocks:
            unrotated = self._unrotated_keys(unrotated_k, v, ctx, pad, groups, dtype)
        docs = whole.doc_ids
        if docs is not None:
            docs = nn.functional.pad(docs, (0, pad), value=-1)  # [B, nb * G]
        q_pos = ctx.seq_positions.to(q.device)  # [Tq] global position of each query
        tile = self.config.chunk_size or DEFAULT_QUERY_TILE
        q = q.to(dtype) / math.sqrt(q.shape[-1])  # scaled once: scores are q . k
        keys, values = keys.to(dtype), values.to(dtype)
        outputs = []
        for start in range(0, queries, tile):
            rows = slice(start, start + tile)
            q_docs = None if ctx.doc_ids is None else ctx.doc_ids[:, rows]
            args = (q[:, :, rows], keys, values, docs, q_pos[rows], q_docs, length, unrotated)
            if self.training and torch.is_grad_enabled() and queries > tile:
                outputs.append(checkpoint(self._tile, *args, use_reentrant=False))
            else:
                outputs.append(self._tile(*args))
        return torch.cat(outputs, dim=2).to(in_dtype)

    def _unrotated_keys(
        self,
        k: Tensor | None,
        v: Tensor,
        ctx: AttentionContext,
        pad: int,
        groups: int,
        dtype: torch.dtype,
    ) -> _UnrotatedKeys | None:
        """The unrotated keys and key rotary tables ``reference`` retrieval needs (None without
        RoPE: then there is nothing to re-position)."""
        if k is None:
            if self.positional.kind == "none":
                return None
            raise LongctxError(
                "attention.landmark.retrieval_positions 'reference' needs unrotated keys and "
                "ctx.rotary, but this core got rotated q, k (its caller does not honour "
                "applies_rope_itself); call it through the model or its sequence-parallel "
                "wrappers, or set attention.landmark.retrieval_positions: original"
            )
        cos, sin = ctx.k_rotary  # [B, Tk, D], ordered like the keys: sort both by position
        whole = sequence_keys(k, v, ctx, "landmark")
        tables = sequence_keys(cos[:, None], sin[:, None], ctx, "landmark")
        return _UnrotatedKeys(
            keys=nn.functional.pad(whole.k, (0, 0, 0, pad)).repeat_interleave(groups, 1).to(dtype),
            cos=nn.functional.pad(tables.k[:, 0], (0, 0, 0, pad)).to(dtype),
            sin=nn.functional.pad(tables.v[:, 0], (0, 0, 0, pad)).to(dtype),
        )

    def _tile(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        docs: Tensor | None,
        q_pos: Tensor,
        q_docs: Tensor | None,
        length: int,
        unrotated: _UnrotatedKeys | None = None,
    ) -> Tensor:
        """Output [B, H, tq, D] of the (pre-scaled) queries at global positions ``q_pos`` [tq].

        keys/values [B, H, nb * G, D] (the whole sequence of ``length`` keys, padded to whole
        blocks, rotated at their own positions); docs [B, nb * G] and q_docs [B, tq], or both
        None; ``unrotated``: re-position the retrieved blocks (``reference``), else None.
        """
        group = self.group
        blocks = keys.shape[2] // group
        device = q.device
        k_pos = torch.arange(blocks * group, device=device).view(blocks, group)  # [nb, G]
        regular = (k_pos[None] <= q_pos[:, None, None]) & (k_pos[None] < length)  # [tq, nb, G]
        regular[..., -1] = False  # landmarks carry no value
        landmark_visible = k_pos[None, :, -1] < q_pos[:, None]  # [tq, nb]: earlier landmarks
        if docs is None:
            token_visible = regular[None, None]  # [1, 1, tq, nb, G]
            landmark_visible = landmark_visible[None, None]  # [1, 1, tq, nb]
        else:
            same_doc = q_docs[:, :, None, None] == docs.view(-1, blocks, group)[:, None]
            token_visible = (regular[None] & same_doc)[:, None]  # [B, 1, tq, nb, G]
            landmark_visible = (landmark_visible[None] & same_doc[..., -1])[:, None]
        own_index = q_pos // group  # [tq]
        if self.training or self.top_k >= blocks:
            own_block = (own_index[:, None] == torch.arange(blocks, device=device))[None, None]
            scores = (q @ keys.transpose(-1, -2)).unflatten(-1, (blocks, group))  # [B,H,tq,nb,G]
            weights = grouped_softmax_weights(scores, token_visible, own_block, landmark_visible)
            return weights.flatten(3) @ values  # [B, H, tq, D]
        return self._retrieve(
            q, keys, values, token_visible, landmark_visible, own_index, unrotated
        )

    def _retrieve(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        token_visible: Tensor,
        landmark_visible: Tensor,
        own_index: Tensor,
        unrotated: _UnrotatedKeys | None = None,
    ) -> Tensor:
        """Grouped softmax over the top-k earlier blocks by landmark logit plus the own block.

        q [B, H, tq, D] (scaled); keys/values [B, H, nb * G, D]; token_visible
        [Bm, 1, tq, nb, G]; landmark_visible [Bm, 1, tq, nb]; own_index [tq] (each query's
        block); ``unrotated``: score and attend the retrieved blocks at the ``reference``
        positions (module docstring). Cost O(tq (nb + (k + 1) G) D): only the chosen blocks'
        tokens are scored.
        """
        batch, heads, tq, _ = q.shape
        group = self.group
        blocks = keys.shape[2] // group
        top_k = min(self.top_k, blocks)
        landmark_scores = q @ keys[:, :, group - 1 :: group].transpose(-1, -2)  # [B,H,tq,nb]
        if unrotated is not None:
            # top = min(k, earlier blocks of the query's document); blocks >= own - top are
            # the recent ones (own positions), the older landmarks sit at block own - top - 1
            top = landmark_visible.sum(-1).clamp(max=top_k)  # [Bm, 1, tq]
            recent_from = own_index - top  # [Bm, 1, tq]
            old_landmark = (recent_from * group - 1).clamp(min=0)  # landmark of own - top - 1
            cos = _table_rows(unrotated.cos, old_landmark)  # [B, 1, tq, D]
            sin = _table_rows(unrotated.sin, old_landmark)
            # q . R(p) k = (cos q - rotate_half(sin q)) . k: rotate the query back once
            q_back = cos * q - rotate_half(sin * q)
            old_scores = q_back @ unrotated.keys[:, :, group - 1 :: group].transpose(-1, -2)
            block_index = torch.arange(blocks, device=q.device)
            recent = block_index >= recent_from[..., None]  # [Bm, 1, tq, nb]
            landmark_scores = torch.where(recent, landmark_scores, old_scores)
        landmark_scores = landmark_scores.masked_fill(~landmark_visible, -torch.inf)
        chosen = landmark_scores.topk(top_k, dim=-1).indices  # [B, H, tq, k]
        if unrotated is not None:
            chosen = chosen.sort(-1).values  # the reference fills its slots in block order
        own = own_index.view(1, 1, tq, 1).expand(batch, heads, tq, 1)
        candidates = torch.cat([own, chosen], dim=-1)  # [B, H, tq, m = k + 1]
        if unrotated is None:
            picked_keys = _gather_blocks(keys, candidates, group)  # [B, H, tq, m, G, D]
        else:
            moved = self._repositioned_keys(unrotated, chosen, landmark_visible, own_index, top)
            picked_keys = torch.cat([_gather_blocks(keys, own, group), moved], dim=3)
        picked_values = _gather_blocks(values, candidates, group)
        token_index = candidates[..., None].expand(-1, -1, -1, -1, group)
        full_shape = (batch, heads, tq, blocks, group)
        picked_tokens = token_visible.expand(full_shape).gather(3, token_index)
        picked_landmarks = landmark_visible.expand(batch, heads, tq, blocks).gather(3, candidates)
        own_block = torch.zeros_like(candidates, dtype=torch.bool)
        own_block[..., 0] = True
        scores = torch.einsum("bhqd,bhqmgd->bhqmg", q, picked_keys)  # [B, H, tq, m, G]
        weights = grouped_softmax_weights(scores, picked_tokens, own_block, picked_landmarks)
        return torch.einsum("bhqmg,bhqmgd->bhqd", weights, picked_values)

    def _repositioned_keys(
        self,
        unrotated: _UnrotatedKeys,
        chosen: Tensor,
        landmark_visible: Tensor,
        own_index: Tensor,
        top: Tensor,
    ) -> Tensor:
        """The chosen blocks' keys [B, H, tq, k, G, D] rotated into the slots before the own
        block (module docstring): ``chosen`` [B, H, tq, k] in increasing order, of which
        ``top`` [Bm, 1, tq] are visible (the others get their own block, unseen anyway)."""
        batch, heads, tq, _ = chosen.shape
        group = self.group
        blocks = unrotated.keys.shape[2] // group
        picked_visible = landmark_visible.expand(batch, heads, tq, blocks).gather(3, chosen)
        rank = picked_visible.cumsum(-1) - 1  # among the visible picks, in block order
        recent_from = (own_index - top)[..., None]  # [Bm, 1, tq, 1]
        slot = rank + (chosen >= recent_from).long()  # the recent blocks skip slot 0
        target = torch.where(picked_visible, recent_from - 1 + slot, chosen).clamp(0, blocks - 1)
        positions = target[..., None] * group + torch.arange(group, device=chosen.device)
        return unrotated.rotate(_gather_blocks(unrotated.keys, chosen, group), positions)
