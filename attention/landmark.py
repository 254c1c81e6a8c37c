"""Landmark attention (SPECS.md 3.4, Mohtashami and Jaggi): grouped softmax over blocks.

A landmark token follows every ``block_size`` regular tokens, so the sequence is a run of
groups of ``G = block_size + 1`` tokens whose last token is the landmark: sequence index ``p`` is
a landmark iff ``p % G == G - 1`` and belongs to block ``p // G``. ``insert_landmarks`` puts
them into a packed batch (labels -100 on landmarks, positions and doc ids kept consistent); the
trainer applies it when ``attention.variant`` is ``landmark``.

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

Sequence parallelism: blocks are defined on GLOBAL positions, so the data path inserts the
landmarks into the whole sequence before ``shard_batch`` cuts it (``parallel/batch.py``), and any
layout keeps the block structure: the keys are the whole sequence in order (``sequence_keys``),
the queries any tokens at their global positions. Under Ulysses the core sees every token of a
head subset; under the ring group (key gather) this rank's zigzag queries against every key, so
the landmark logits of all earlier blocks and the within-block softmaxes are computed locally
from the gathered K, V (instead of SPECS 3.4's two passes over ring-held blocks: exact, and no
per-block bookkeeping across ranks). The layout's padding tokens (label -100) sit after every
real token and are never visible to one, whatever block they fall in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.sequence_keys import sequence_keys
from longctx.errors import LongctxError

if TYPE_CHECKING:  # only the config's fields are read
    from longctx.model.config import ModelConfig

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


def landmark_recipe_problem(
    model: ModelConfig, attention: AttentionConfig, ulysses: int, ring: int
) -> str | None:
    """Why a recipe cannot run landmark attention (None when it can): the recipe validator.

    Every sequence-parallel layout runs (see the module docstring), so ``ulysses`` and ``ring``
    impose nothing; the model's sliding window and the landmark id are checked.
    """
    if attention.variant != "landmark":
        return None
    if model.sliding_window is not None:
        return (
            f"attention.variant 'landmark' replaces the model's sliding_window "
            f"({model.sliding_window}); set model.sliding_window: null"
        )
    token_id = landmark_token_id(attention, model.vocab_size)
    if token_id >= model.vocab_size:
        return (
            f"attention.landmark.token_id={token_id} is outside the vocabulary "
            f"(model.vocab_size={model.vocab_size}); pick an id below {model.vocab_size} or null"
        )
    return None


def batch_transform(
    attention: AttentionConfig, vocab_size: int
) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """What the trainer applies to every packed batch: ``insert_landmarks`` when
    ``attention.variant`` is ``landmark``, else the identity."""
    if attention.variant != "landmark":
        return lambda batch: batch
    block_size = attention.landmark.block_size
    token_id = landmark_token_id(attention, vocab_size)
    return lambda batch: insert_landmarks(batch, block_size=block_size, landmark_id=token_id)


def regular_slots(length: int, block_size: int, device: torch.device | None = None) -> Tensor:
    """[T] index of each of ``length`` regular tokens once the landmarks are inserted."""
    index = torch.arange(length, device=device)
    return index + index // block_size


def landmark_forward(
    model: nn.Module, block_size: int, landmark_id: int
) -> Callable[[Tensor], Tensor]:
    """A ``forward_hidden`` for evaluation code that knows nothing of landmarks: ``input_ids``
    [B, T] -> hidden [B, T, d] of ``model`` run on the ids with landmarks inserted (positions
    0..T'-1, one document), read back at the regular tokens. In eval mode the cores retrieve
    their top-k blocks, so a model trained at 512 tokens can be scored on much longer prompts.
    """

    def forward(input_ids: Tensor) -> Tensor:
        with_landmarks = insert_landmarks(
            {"input_ids": input_ids}, block_size=block_size, landmark_id=landmark_id
        )["input_ids"]
        hidden = model.forward_hidden(with_landmarks)  # [B, T', d]
        return hidden[:, regular_slots(input_ids.shape[1], block_size, input_ids.device)]

    return forward


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


class LandmarkAttention(nn.Module):
    """Landmark attention core: grouped softmax in training, top-k block retrieval in eval.

    q [B, Hq, Tq, D] at global positions ``ctx.seq_positions``, k/v [B, Hkv, Tk, D] the whole
    sequence (any order; ``sequence_keys``) -> out [B, Hq, Tq, D]; the sequence must already hold
    the landmarks (``insert_landmarks``). Queries go in tiles of ``chunk_size`` (checkpointed in
    training), so no [Tq, Tk] tensor exists. Runs on gathered keys under the ring group.
    """

    accepts_gathered_keys = True

    def __init__(self, config: AttentionConfig, *, sliding_window: int | None = None):
        super().__init__()
        if sliding_window is not None:
            raise LongctxError(
                f"attention.variant landmark does not combine with a model sliding_window "
                f"({sliding_window}); set the model's sliding_window to null or use variant dense"
            )
        self.config = config
        self.group = config.landmark.block_size + 1
        self.top_k = config.landmark.retrieve_top_k

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (already rotated) -> out [B, Hq, Tq, D]."""
        whole = sequence_keys(k, v, ctx, "landmark")
        heads, queries, length = q.shape[1], q.shape[2], k.shape[2]
        group, blocks = self.group, -(-length // self.group)
        pad = blocks * group - length
        groups = heads // k.shape[1]
        # [B, Hq, nb * G, D]: padding keys are never visible (positions >= Tk).
        keys = nn.functional.pad(whole.k, (0, 0, 0, pad)).repeat_interleave(groups, 1)
        values = nn.functional.pad(whole.v, (0, 0, 0, pad)).repeat_interleave(groups, 1)
        docs = whole.doc_ids
        if docs is not None:
            docs = nn.functional.pad(docs, (0, pad), value=-1)  # [B, nb * G]
        q_pos = ctx.seq_positions.to(q.device)  # [Tq] global position of each query
        tile = self.config.chunk_size or DEFAULT_QUERY_TILE
        in_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
        q = q.to(dtype) / math.sqrt(q.shape[-1])  # scaled once: scores are q . k
        keys, values = keys.to(dtype), values.to(dtype)
        outputs = []
        for start in range(0, queries, tile):
            rows = slice(start, start + tile)
            q_docs = None if ctx.doc_ids is None else ctx.doc_ids[:, rows]
            args = (q[:, :, rows], keys, values, docs, q_pos[rows], q_docs, length)
            if self.training and torch.is_grad_enabled() and queries > tile:
                outputs.append(checkpoint(self._tile, *args, use_reentrant=False))
            else:
                outputs.append(self._tile(*args))
        return torch.cat(outputs, dim=2).to(in_dtype)

    def _tile(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        docs: Tensor | None,
        q_pos: Tensor,
        q_docs: Tensor | None,
        length: int,
    ) -> Tensor:
        """Output [B, H, tq, D] of the (pre-scaled) queries at global positions ``q_pos`` [tq].

        keys/values [B, H, nb * G, D] (the whole sequence of ``length`` keys, padded to whole
        blocks); docs [B, nb * G] and q_docs [B, tq], or both None.
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
        return self._retrieve(q, keys, values, token_visible, landmark_visible, own_index)

    def _retrieve(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        token_visible: Tensor,
        landmark_visible: Tensor,
        own_index: Tensor,
    ) -> Tensor:
        """Grouped softmax over the top-k earlier blocks by landmark logit plus the own block.

        q [B, H, tq, D] (scaled); keys/values [B, H, nb * G, D]; token_visible
        [Bm, 1, tq, nb, G]; landmark_visible [Bm, 1, tq, nb]; own_index [tq] (each query's
        block). Cost O(tq (nb + (k + 1) G) D): only the chosen blocks' tokens are scored.
        """
        batch, heads, tq, dim = q.shape
        group = self.group
        blocks = keys.shape[2] // group
        top_k = min(self.top_k, blocks)
        landmark_scores = q @ keys[:, :, group - 1 :: group].transpose(-1, -2)  # [B,H,tq,nb]
        landmark_scores = landmark_scores.masked_fill(~landmark_visible, -torch.inf)
        chosen = landmark_scores.topk(top_k, dim=-1).indices  # [B, H, tq, k]
        own = own_index.view(1, 1, tq, 1).expand(batch, heads, tq, 1)
        candidates = torch.cat([own, chosen], dim=-1)  # [B, H, tq, m = k + 1]
        m = top_k + 1
        index = candidates.flatten(2)[..., None].expand(-1, -1, -1, group * dim)
        picked_keys = keys.reshape(batch, heads, blocks, group * dim).gather(2, index)
        picked_values = values.reshape(batch, heads, blocks, group * dim).gather(2, index)
        picked_keys = picked_keys.view(batch, heads, tq, m, group, dim)
        picked_values = picked_values.view(batch, heads, tq, m, group, dim)
        token_index = candidates[..., None].expand(-1, -1, -1, -1, group)
        full_shape = (batch, heads, tq, blocks, group)
        picked_tokens = token_visible.expand(full_shape).gather(3, token_index)
        picked_landmarks = landmark_visible.expand(batch, heads, tq, blocks).gather(3, candidates)
        own_block = torch.zeros_like(candidates, dtype=torch.bool)
        own_block[..., 0] = True
        scores = torch.einsum("bhqd,bhqmgd->bhqmg", q, picked_keys)  # [B, H, tq, m, G]
        weights = grouped_softmax_weights(scores, picked_tokens, own_block, picked_landmarks)
        return torch.einsum("bhqmg,bhqmgd->bhqd", weights, picked_values)
