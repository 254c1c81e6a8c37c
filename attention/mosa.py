"""MoSA: mixture of sparse attention (SPECS.md 3.2), routed heads beside dense heads.

The first ``dense_heads`` query heads attend densely (causal, per document, with the model's
sliding window). Every other head m is a routed head: a router ``r = sigmoid(x W_r[:, m])``
scores each token (x is the layer's normed input, ``ctx.hidden``), the head keeps its
``k = max(2, T // rho)`` best tokens (expert-choice top-k along the sequence), and attention runs
among the chosen tokens only, causal by their ORIGINAL positions and within one document. Each
chosen token's output is multiplied by its router score (this is how W_r gets a gradient) and
scattered back to its position; unchosen positions get 0 from that head.

RoPE: the model's layer rotated q and k at their original positions before this core gathers
them, so routed attention sees original-position RoPE. Cost: the routed attention of a head is
O(k^2) instead of O(T^2); q, k, v are still projected for every token by the layer (the seam
hands them over projected), so only attention FLOPs shrink.

Caveat: top-k over the whole sequence looks at future tokens' router scores, so whether token t
is chosen depends on tokens after t. That is fine for training and perplexity, but
token-by-token generation cannot reproduce it (the chosen set changes as the sequence grows).

Sequence parallelism: the keys are the whole sequence in order (``sequence_keys``), the queries
any tokens at their global positions. Under Ulysses the core computes a contiguous subset of the
layer's heads (``restrict_to_heads``: which of them are dense, which routed and with which router
rows). Under the ring group (key gather, ``reads_key_hidden``) each rank gets every key, value
and layer input: it scores every token with the router and picks the same global top-k as one
device would, gathers the chosen tokens' K, V, and computes the routed outputs of the chosen
tokens IT holds (their queries are local); the router gradient of a token chosen on another rank
comes back through the gathered layer input. This replaces SPECS 3.2's "all-gather the router
scores, then the k chosen K, V" with one K, V gather: exact, and the routed attention of a head
stays O(k^2) per rank (rows of other ranks' chosen tokens are masked, not skipped).
Padding tokens added for the layout would join the top-k, so a sharded sequence must not need
padding (the recipe validator requires ``data.seq_len`` divisible by ``2 x sp``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.core import AttentionCore, AttentionShape
from longctx.attention.kernels import block_attention
from longctx.attention.mask import MaskSpec
from longctx.attention.sequence_keys import SequenceKeys, sequence_keys
from longctx.errors import LongctxError
from longctx.positional.config import PositionalConfig


def routed_token_count(length: int, sparsity: int) -> int:
    """k = max(2, T // rho), at most T: tokens each routed head keeps."""
    return min(length, max(2, length // sparsity))


class TokenRouter(nn.Module):
    """``r = sigmoid(x W_r)``, one score per (routed head, token): [B, T, d] -> [B, Hm, T].

    The weight is held directly so that ``load_hf`` finds it as this module's new parameter.
    """

    def __init__(self, hidden_size: int, heads: int, std: float):
        super().__init__()
        self.std = std
        self.weight = nn.Parameter(torch.empty(heads, hidden_size))  # [Hm, d]
        self.init_new_parameters()

    def forward(self, hidden: Tensor, heads: slice = slice(None)) -> Tensor:
        """Scores of the routed heads ``heads`` (all by default): [B, T, d] -> [B, h, T]."""
        return torch.sigmoid(hidden @ self.weight[heads].T).transpose(1, 2)

    @torch.no_grad()
    def init_new_parameters(self) -> None:
        """W_r ~ N(0, initializer_range): small, distinct scores (no ties in the top-k), r close
        to 0.5, so routed heads start as half-scaled sparse copies of the dense heads they
        replace (a routed head cannot equal a dense one unless k = T)."""
        self.weight.normal_(0.0, self.std)


class MoSAAttention(AttentionCore):
    """The MoSA core: ``(q, k, v, ctx) -> out``; q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D].

    Queries at ``ctx.seq_positions``, keys the whole sequence; its routers read the layer input
    (``reads_hidden``), and under the ring group it runs on gathered keys and reads the gathered
    layer input (``ctx.k_hidden``, ``reads_key_hidden``). The dense heads honour the layer's
    sliding window.
    """

    reads_hidden = True
    reads_key_hidden = True
    accepts_gathered_keys = True
    has_head_parameters = True

    def __init__(
        self, shape: AttentionShape, attention: AttentionConfig, positional: PositionalConfig
    ):
        super().__init__(shape, attention, positional)
        self.dense_heads = attention.mosa.dense_heads
        self.routed_heads = shape.num_heads - self.dense_heads
        self.router = TokenRouter(shape.hidden_size, self.routed_heads, shape.initializer_range)
        self.heads = slice(0, shape.num_heads)  # the layer's heads this core computes

    @classmethod
    def recipe_problem(cls, shape, attention, positional, *, ulysses, ring) -> str | None:
        """Every sequence-parallel layout runs (Ulysses on head subsets, ring by key gather);
        only the head split is checked."""
        problem = super().recipe_problem(shape, attention, positional, ulysses=ulysses, ring=ring)
        if problem is not None:
            return problem
        dense, heads = attention.mosa.dense_heads, shape.num_heads
        group = heads // shape.num_kv_heads
        if dense > heads:
            return (
                f"attention.mosa.dense_heads={dense} exceeds model.num_attention_heads={heads}; "
                f"use at most {heads}"
            )
        if dense % group:
            return (
                f"attention.mosa.dense_heads={dense} splits a GQA group of {group} query heads "
                f"(num_attention_heads={heads}, num_key_value_heads={shape.num_kv_heads}); use "
                f"a multiple of {group}"
            )
        return None

    def restrict_to_heads(self, start: int, stop: int) -> None:
        """Compute heads ``start .. stop - 1`` of the layer only (a Ulysses rank's subset): the
        dense ones among them stay dense, the routed ones use their own router rows."""
        self.heads = slice(start, stop)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """q [B, h, Tq, D], k/v [B, hkv, Tk, D] (rotated; the ``h`` heads of ``self.heads``)
        -> out [B, h, Tq, D]."""
        start, stop = self.heads.start, self.heads.stop
        dense = max(0, min(stop, self.dense_heads) - start)  # local heads that are dense
        group = q.shape[1] // k.shape[1]  # local GQA group (kv heads may be replicated)
        parts = []
        if dense:
            kv = dense // group  # dense heads use the first kv heads
            out, _ = block_attention(
                q[:, :dense], k[:, :kv], v[:, :kv], mask=ctx.causal_mask(self.sliding_window),
                backend=self.config.backend, chunk_size=self.config.chunk_size,
            )  # fmt: skip
            parts.append(out)  # [B, hd, Tq, D]
        if dense < q.shape[1]:
            router_rows = slice(start + dense - self.dense_heads, stop - self.dense_heads)
            keys = sequence_keys(k, v, ctx, "mosa")
            kv_head = (dense + torch.arange(q.shape[1] - dense, device=q.device)) // group
            parts.append(self._routed(q[:, dense:], keys, kv_head, router_rows, ctx))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _routed(
        self,
        q: Tensor,
        keys: SequenceKeys,
        kv_head: Tensor,
        router_rows: slice,
        ctx: AttentionContext,
    ) -> Tensor:
        """Routed heads: q [B, hm, Tq, D] -> out [B, hm, Tq, D], zero where a head chose nothing.

        ``keys`` the whole sequence (k, v [B, hkv, Tk, D], layer input [B, Tk, d]); ``kv_head``
        [hm] the kv head of each routed head; ``router_rows`` their rows of the router.
        """
        if keys.hidden is None:
            raise LongctxError(
                "MoSA needs the layer input (ctx.hidden) for its routers; call the core from "
                "the model's attention layer, which sets it"
            )
        batch, heads, queries, dim = q.shape
        length = keys.k.shape[2]
        scores = self.router(keys.hidden, router_rows)  # [B, hm, Tk]: every token of the sequence
        count = routed_token_count(length, self.config.mosa.sparsity)
        chosen = scores.detach().topk(count, dim=-1).indices.sort(dim=-1).values  # [B, hm, k]
        # Sorted chosen positions keep original order, so "causal by original position" is the
        # plain causal mask on the chosen list; heads fold into the batch dimension.
        flat = (kv_head[None, :, None] * length + chosen).flatten(1)  # [B, hm * k] into hkv * Tk
        index = flat[..., None].expand(-1, -1, dim)
        k_sel = keys.k.flatten(1, 2).gather(1, index).view(batch * heads, 1, count, dim)
        v_sel = keys.v.flatten(1, 2).gather(1, index).view(batch * heads, 1, count, dim)
        # Which local query each chosen token is (-1: another rank holds it, and computes it).
        local_index = torch.full((length,), -1, dtype=torch.long, device=q.device)
        local_index[ctx.seq_positions.to(q.device)] = torch.arange(queries, device=q.device)
        chosen_query = local_index[chosen]  # [B, hm, k]
        is_local = chosen_query >= 0
        query_index = chosen_query.clamp(min=0)[..., None].expand(-1, -1, -1, dim)
        q_sel = q.gather(2, query_index).view(batch * heads, 1, count, dim)
        q_docs = k_docs = None
        if keys.doc_ids is not None:
            k_docs = keys.doc_ids.gather(1, chosen.flatten(1)).view(batch * heads, count)
            q_docs = k_docs
        if not bool(is_local.all()):  # rows of other ranks' tokens see no key: output 0
            if k_docs is None:
                k_docs = torch.zeros(batch * heads, count, dtype=torch.long, device=q.device)
            q_docs = torch.where(is_local.view(batch * heads, count), k_docs, k_docs.min() - 1)
        out, _ = block_attention(
            q_sel, k_sel, v_sel, mask=MaskSpec(q_doc_ids=q_docs, k_doc_ids=k_docs),
            backend=self.config.backend, chunk_size=self.config.chunk_size,
        )  # fmt: skip
        weighted = out.view(batch, heads, count, dim) * scores.gather(-1, chosen)[..., None]
        # Scatter to the local queries; other ranks' rows land in a spare slot that is dropped.
        slot = torch.where(is_local, chosen_query, queries)[..., None].expand(-1, -1, -1, dim)
        out = q.new_zeros(batch, heads, queries + 1, dim).scatter(2, slot, weighted)
        return out[:, :, :queries]

    def extra_repr(self) -> str:
        return (
            f"dense_heads={self.dense_heads}, routed_heads={self.routed_heads}, "
            f"rho={self.config.mosa.sparsity}, backend={self.config.backend}"
        )
