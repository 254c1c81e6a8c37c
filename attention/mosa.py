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

Limits: the core needs the unsharded sequence (``seq_positions == arange(T)``); recipes asking
for sequence parallelism with MoSA fail at validation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.kernels import block_attention
from longctx.attention.mask import MaskSpec
from longctx.errors import LongctxError


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

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.sigmoid(hidden @ self.weight.T).transpose(1, 2)

    @torch.no_grad()
    def init_new_parameters(self) -> None:
        """W_r ~ N(0, initializer_range): small, distinct scores (no ties in the top-k), r close
        to 0.5, so routed heads start as half-scaled sparse copies of the dense heads they
        replace (a routed head cannot equal a dense one unless k = T)."""
        self.weight.normal_(0.0, self.std)


class MoSAAttention(nn.Module):
    """The MoSA core: ``(q, k, v, ctx) -> out``; q [B, Hq, T, D], k/v [B, Hkv, T, D]."""

    def __init__(self, config, attention: AttentionConfig, *, sliding_window: int | None = None):
        super().__init__()
        problem = mosa_heads_problem(config, attention)
        if problem is not None:
            raise LongctxError(problem)
        self.attention = attention
        self.sliding_window = sliding_window
        self.dense_heads = attention.mosa.dense_heads
        self.routed_heads = config.num_attention_heads - self.dense_heads
        self.group = config.num_attention_heads // config.kv_heads
        self.router = TokenRouter(config.hidden_size, self.routed_heads, config.initializer_range)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] (rotated) -> out [B, Hq, T, D]."""
        _check_unsharded(ctx, q.shape[2])
        parts = []
        if self.dense_heads:
            kv = self.dense_heads // self.group  # dense heads use the first kv heads
            dense, _ = block_attention(
                q[:, : self.dense_heads], k[:, :kv], v[:, :kv],
                mask=ctx.causal_mask(self.sliding_window),
                backend=self.attention.backend, chunk_size=self.attention.chunk_size,
            )  # fmt: skip
            parts.append(dense)  # [B, Hd, T, D]
        if self.routed_heads:
            parts.append(self._routed(q[:, self.dense_heads :], k, v, ctx))  # [B, Hm, T, D]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def router_scores(self, hidden: Tensor) -> Tensor:
        """r = sigmoid(x W_r): [B, T, d] -> [B, Hm, T]."""
        return self.router(hidden)

    def _routed(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """Routed heads: q [B, Hm, T, D] -> out [B, Hm, T, D], zero where a head chose nothing."""
        if ctx.hidden is None:
            raise LongctxError(
                "MoSA needs the layer input (ctx.hidden) for its routers; call the core from "
                "the model's attention layer, which sets it"
            )
        batch, heads, length, dim = q.shape
        scores = self.router_scores(ctx.hidden)  # [B, Hm, T]
        count = routed_token_count(length, self.attention.mosa.sparsity)
        chosen = scores.detach().topk(count, dim=-1).indices.sort(dim=-1).values  # [B, Hm, k]
        # Sorted chosen indices keep original order, so "causal by original position" is the
        # plain causal mask on the chosen list; heads fold into the batch dimension.
        kv_head = (self.dense_heads + torch.arange(heads, device=q.device)) // self.group  # [Hm]
        flat = (kv_head[None, :, None] * length + chosen).flatten(1)  # [B, Hm * k] into Hkv * T
        index = flat[..., None].expand(-1, -1, dim)
        k_sel = k.flatten(1, 2).gather(1, index).view(batch * heads, 1, count, dim)
        v_sel = v.flatten(1, 2).gather(1, index).view(batch * heads, 1, count, dim)
        token_index = chosen[..., None].expand(-1, -1, -1, dim)  # [B, Hm, k, D]
        q_sel = q.gather(2, token_index).view(batch * heads, 1, count, dim)
        docs = None
        if ctx.doc_ids is not None:
            docs = ctx.doc_ids.gather(1, chosen.flatten(1)).view(batch * heads, count)
        out, _ = block_attention(
            q_sel, k_sel, v_sel, mask=MaskSpec(q_doc_ids=docs, k_doc_ids=docs),
            backend=self.attention.backend, chunk_size=self.attention.chunk_size,
        )  # fmt: skip
        weighted = out.view(batch, heads, count, dim) * scores.gather(-1, chosen)[..., None]
        return torch.zeros_like(q).scatter(2, token_index, weighted)

    def extra_repr(self) -> str:
        return (
            f"dense_heads={self.dense_heads}, routed_heads={self.routed_heads}, "
            f"rho={self.attention.mosa.sparsity}, backend={self.attention.backend}"
        )


def _check_unsharded(ctx: AttentionContext, length: int) -> None:
    positions = ctx.seq_positions
    if positions.shape != (length,) or not torch.equal(
        positions, torch.arange(length, device=positions.device)
    ):
        raise LongctxError(
            "MoSA picks its top-k over the whole sequence, but this core got a shard "
            "(seq_positions != arange(T)); run MoSA with parallel.ulysses = parallel.ring = 1"
        )


def mosa_heads_problem(model, attention: AttentionConfig) -> str | None:
    """Why MoSA's head split does not fit the model (None when it does)."""
    dense, heads = attention.mosa.dense_heads, model.num_attention_heads
    group = heads // model.kv_heads
    if dense > heads:
        return (
            f"attention.mosa.dense_heads={dense} exceeds model.num_attention_heads={heads}; "
            f"use at most {heads}"
        )
    if dense % group:
        return (
            f"attention.mosa.dense_heads={dense} splits a GQA group of {group} query heads "
            f"(num_attention_heads={heads}, num_key_value_heads={model.kv_heads}); use a "
            f"multiple of {group}"
        )
    return None


def mosa_recipe_problem(model, attention: AttentionConfig, ulysses: int, ring: int) -> str | None:
    """Why a recipe cannot run MoSA (None when it can): used by the recipe validator."""
    if attention.variant != "mosa":
        return None
    if ulysses > 1 or ring > 1:
        return (
            f"attention.variant 'mosa' picks top-k over the whole sequence, but "
            f"parallel.ulysses={ulysses} and parallel.ring={ring} shard it; set both to 1 "
            "(use data parallelism) or choose attention.variant dense"
        )
    return mosa_heads_problem(model, attention)
