"""MoSA: mixture of sparse attention (SPECS.md 3.2), routed heads beside dense heads.

The first ``dense_heads`` query heads attend densely (causal, per document, with the model's
sliding window). Every other head m is a routed head: a router ``r = sigmoid(x W_r[:, m])``
scores each token (x is the layer's normed input), the head keeps its ``k = max(2, T // rho)``
best tokens (expert-choice top-k along the sequence), and attention runs among the chosen tokens
only, causal by their ORIGINAL positions and within one document. Each chosen token's output is
multiplied by its router score (this is how W_r gets a gradient) and scattered back to its
position; unchosen positions get 0 from that head.

Projections (``projects_itself``): when the core is its layer's own core (one device, or data
parallel), the layer hands it x and its projections and ``forward_layer`` runs the whole layer
as the paper counts it. Dense heads project every token (their slices of q_proj, k_proj, v_proj,
RoPE, attention, their columns of o_proj). A routed head gathers its k chosen rows of x
([B, Hm, k, d] for the Hm routed heads), projects them with its slices of q_proj, k_proj, v_proj
in one batched matmul over heads, rotates them at their ORIGINAL positions, attends among them,
scales by the router score and applies its columns of o_proj to those k rows only, added into
the layer output at the chosen tokens (``index_add``): unchosen rows are 0 and cost nothing. A
routed head's projection cost is O(k d D) instead of O(T d D) and its attention O(k^2 D)
instead of O(T^2 D). GQA: routed head h reads kv head ``h // (Hq / Hkv)`` of k_proj, v_proj
(the grouping the float64 reference and ``forward`` use), projected at ITS chosen tokens.

Caveat: top-k over the whole sequence looks at future tokens' router scores, so whether token t
is chosen depends on tokens after t. That is fine for training and perplexity, but
token-by-token generation cannot reproduce it (the chosen set changes as the sequence grows).

Sequence parallelism: the wrappers do not project for their core, so under SP the layer projects
every token for every head (as before this core learnt to project) and calls ``forward(q, k, v,
ctx)``: exact, with only the attention FLOPs reduced. The keys are the whole sequence in order
(``sequence_keys``), the queries any tokens at their global positions. Under Ulysses the core
computes a contiguous subset of the layer's heads (``restrict_to_heads``: which of them are
dense, which routed and with which router rows). Under the ring group (key gather,
``reads_key_hidden``) each rank gets every key, value and layer input: it scores every token
with the router and picks the same global top-k as one device would, gathers the chosen tokens'
K, V, and computes the routed outputs of the chosen tokens IT holds (their queries are local);
the router gradient of a token chosen on another rank comes back through the gathered layer
input. This replaces SPECS 3.2's "all-gather the router scores, then the k chosen K, V" with one
K, V gather: exact, and the routed attention of a head stays O(k^2) per rank (rows of other
ranks' chosen tokens are masked, not skipped). Padding tokens added for the layout would join
the top-k, so a sharded sequence must not need padding (the recipe validator requires
``data.seq_len`` divisible by ``2 x sp``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.core import AttentionCore, AttentionShape, LayerProjections
from longctx.attention.kernels import block_attention
from longctx.attention.mask import MaskSpec
from longctx.attention.sequence_keys import SequenceKeys, sequence_keys
from longctx.errors import LongctxError
from longctx.positional.config import PositionalConfig
from longctx.positional.rope import apply_rotary


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
    """The MoSA core: ``forward_layer(x, projections, rotary, ctx) -> [B, T, d]`` as its layer's
    own core, ``(q, k, v, ctx) -> out`` (q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]) under sequence
    parallelism.

    Queries at ``ctx.seq_positions``, keys the whole sequence; its routers read the layer input
    (``reads_hidden``), and under the ring group it runs on gathered keys and reads the gathered
    layer input (``ctx.k_hidden``, ``reads_key_hidden``). The dense heads honour the layer's
    sliding window.
    """

    reads_hidden = True
    reads_key_hidden = True
    accepts_gathered_keys = True
    has_head_parameters = True
    projects_itself = True

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
            parts.append(self._dense(q[:, :dense], k[:, :kv], v[:, :kv], ctx))  # [B, hd, Tq, D]
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
        chosen = self._choose(scores, torch.arange(length, device=scores.device))  # [B, hm, k]
        count = chosen.shape[-1]
        # Sorted chosen positions keep original order, so "causal by original position" is the
        # plain causal mask on the chosen list; heads fold into the batch dimension.
        k_sel, v_sel = (
            _gather_rows(x, chosen, kv_head).view(batch * heads, 1, count, dim)
            for x in (keys.k, keys.v)
        )
        # Which local query each chosen token is (-1: another rank holds it, and computes it).
        local_index = torch.full((length,), -1, dtype=torch.long, device=q.device)
        local_index[ctx.seq_positions.to(q.device)] = torch.arange(queries, device=q.device)
        chosen_query = local_index[chosen]  # [B, hm, k]
        is_local = chosen_query >= 0
        query_index = chosen_query.clamp(min=0)[..., None].expand(-1, -1, -1, dim)
        if q.transpose(1, 2).is_contiguous():  # the model's q: grads come back token-major
            local_heads = torch.arange(heads, device=q.device)
            q_sel = _gather_rows(q, chosen_query.clamp(min=0), local_heads)
        else:
            q_sel = q.gather(2, query_index)
        q_sel = q_sel.view(batch * heads, 1, count, dim)
        q_docs = k_docs = None
        if keys.doc_ids is not None:
            k_docs = keys.doc_ids.gather(1, chosen.flatten(1)).view(batch * heads, count)
            q_docs = k_docs
        if not bool(is_local.all()):  # rows of other ranks' tokens see no key: output 0
            if k_docs is None:
                k_docs = torch.zeros(batch * heads, count, dtype=torch.long, device=q.device)
            q_docs = torch.where(is_local.view(batch * heads, count), k_docs, k_docs.min() - 1)
        out = self._among_chosen(q_sel, k_sel, v_sel, q_docs, k_docs)
        weighted = out.view(batch, heads, count, dim) * scores.gather(-1, chosen)[..., None]
        # Added (in place) to the local queries' rows; other ranks' rows add 0 to row 0. (A
        # spare row sliced off afterwards cost a [B, hm, Tq + 1, D] zeros in backward, and an
        # out-of-place scatter a copy of the zeros in forward.)
        weighted = torch.where(is_local[..., None], weighted, 0.0)
        out = q.new_zeros(batch, heads, queries, dim)
        return out.scatter_add_(2, query_index, weighted)

    def forward_layer(
        self,
        x: Tensor,
        projections: LayerProjections,
        rotary: tuple[Tensor, Tensor] | None,
        ctx: AttentionContext,
    ) -> Tensor:
        """The whole attention layer: x [B, T, d] (normed input) -> [B, T, d] (after o_proj).

        ``rotary``: (cos, sin) [B, T, D] of the tokens' positions, or None (no RoPE). Dense
        heads project every token; each routed head projects, attends and applies o_proj at its
        k chosen tokens only (module docstring). Equals projecting every token and calling
        ``forward``, then o_proj (tests/test_mosa.py).
        """
        batch, length, hidden = x.shape
        dim, dense = self.shape.head_dim, self.dense_heads
        group = self.shape.num_heads // self.shape.num_kv_heads
        if not dense:
            out = x.new_zeros(batch * length, hidden)
        else:
            q = _project(projections.q, x, dense, dim)  # [B, hd, T, D]
            k = _project(projections.k, x, dense // group, dim)  # [B, hd / group, T, D]
            v = _project(projections.v, x, dense // group, dim)
            if rotary is not None:
                q, k = apply_rotary(q, k, *rotary)
            attended = self._dense(q, k, v, ctx).transpose(1, 2).flatten(2)  # [B, T, hd * D]
            out = F.linear(attended, projections.o.weight[:, : dense * dim]).flatten(0, 1)
        if self.routed_heads:
            rows, contribution = self._routed_layer(x, projections, rotary, ctx)
            # In place: o_proj's backward needs neither its output nor the zeros, and a copy
            # of the [B * T, d] output would raise the peak memory.
            out.index_add_(0, rows, contribution)  # only the chosen rows of each head
        return out.view(batch, length, hidden)

    def _routed_layer(
        self,
        x: Tensor,
        projections: LayerProjections,
        rotary: tuple[Tensor, Tensor] | None,
        ctx: AttentionContext,
    ) -> tuple[Tensor, Tensor]:
        """The routed heads' share of the layer output, at their chosen tokens only.

        x [B, T, d] -> (rows [B * Hm * k] into the flattened [B * T] tokens, contribution
        [B * Hm * k, d]: each chosen token's router-scaled attention output times its head's
        columns of o_proj).
        """
        batch, length, hidden = x.shape
        dim, dense, heads = self.shape.head_dim, self.dense_heads, self.routed_heads
        group = self.shape.num_heads // self.shape.num_kv_heads
        scores = self.router(x)  # [B, Hm, T]
        chosen = self._choose(scores, ctx.seq_positions.to(x.device))  # [B, Hm, k]
        count = chosen.shape[-1]
        offsets = torch.arange(batch, device=x.device)[:, None, None] * length
        rows = (offsets + chosen).flatten()  # [B * Hm * k]
        x_sel = x.flatten(0, 1).index_select(0, rows).view(batch, heads, count, hidden)
        kv_head = (dense + torch.arange(heads, device=x.device)) // group  # [Hm]
        weight = torch.cat(
            [
                projections.q.weight.view(-1, dim, hidden)[dense:],  # [Hm, D, d]
                projections.k.weight.view(-1, dim, hidden)[kv_head],
                projections.v.weight.view(-1, dim, hidden)[kv_head],
            ],
            dim=1,
        )  # [Hm, 3D, d]
        qkv = x_sel @ weight.transpose(1, 2)  # [B, Hm, k, 3D]: one batched matmul over heads
        if projections.q.bias is not None:
            qkv = (
                qkv
                + torch.cat(
                    [
                        projections.q.bias.view(-1, dim)[dense:],  # [Hm, D]
                        projections.k.bias.view(-1, dim)[kv_head],
                        projections.v.bias.view(-1, dim)[kv_head],
                    ],
                    dim=1,
                )[:, None]
            )  # [Hm, 1, 3D]
        q, k, v = (part.reshape(batch * heads, 1, count, dim) for part in qkv.split(dim, dim=-1))
        if rotary is not None:  # at the chosen tokens' original positions
            cos, sin = (table.flatten(0, 1).index_select(0, rows) for table in rotary)
            q, k = apply_rotary(q, k, cos.view(-1, count, dim), sin.view(-1, count, dim))
        docs = None
        if ctx.doc_ids is not None:
            docs = ctx.doc_ids.flatten().index_select(0, rows).view(batch * heads, count)
        attended = self._among_chosen(q, k, v, docs, docs).view(batch, heads, count, dim)
        weighted = attended * scores.gather(-1, chosen)[..., None]  # [B, Hm, k, D]
        w_out = projections.o.weight.view(hidden, -1, dim)[:, dense:].permute(1, 2, 0)
        return rows, (weighted @ w_out).flatten(0, 2)  # w_out [Hm, D, d] -> [B * Hm * k, d]

    def _choose(self, scores: Tensor, positions: Tensor) -> Tensor:
        """Each routed head's k best tokens, ordered by global position: scores [B, h, T],
        positions [T] (the tokens' global indices) -> chosen token indices [B, h, k].

        In position order, "causal by original position" is the plain causal mask on the
        chosen list. The top-k takes no gradient; the router learns through the score scaling.
        """
        count = routed_token_count(scores.shape[-1], self.config.mosa.sparsity)
        best = scores.detach().topk(count, dim=-1).indices  # [B, h, k]
        return best.gather(-1, positions[best].argsort(dim=-1))

    def _dense(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """Dense heads: q [B, hd, Tq, D], k/v [B, hkv, Tk, D] -> [B, hd, Tq, D], causal per
        document within the layer's window."""
        out, _ = block_attention(
            q, k, v, mask=ctx.causal_mask(self.sliding_window), backend=self.config.backend,
            chunk_size=self.config.chunk_size,
        )  # fmt: skip
        return out

    def _among_chosen(
        self, q: Tensor, k: Tensor, v: Tensor, q_docs: Tensor | None, k_docs: Tensor | None
    ) -> Tensor:
        """Attention among one head's chosen tokens, (batch, head) folded into the batch:
        q, k, v [B * h, 1, k, D] in position order, docs [B * h, k] -> [B * h, 1, k, D]."""
        out, _ = block_attention(
            q, k, v, mask=MaskSpec(q_doc_ids=q_docs, k_doc_ids=k_docs),
            backend=self.config.backend, chunk_size=self.config.chunk_size,
        )  # fmt: skip
        return out

    def extra_repr(self) -> str:
        return (
            f"dense_heads={self.dense_heads}, routed_heads={self.routed_heads}, "
            f"rho={self.config.mosa.sparsity}, backend={self.config.backend}"
        )


def _gather_rows(x: Tensor, chosen: Tensor, kv_head: Tensor) -> Tensor:
    """The rows ``chosen`` [B, hm, k] of heads ``kv_head`` [hm] of x [B, hkv, T, D] ->
    [B, hm * k, D], gathered from a flat view of x's memory (token-major, as the model's q, k
    and v are, or head-major): no copy of x, and x's gradient comes back in x's layout (a
    head-major gradient of a token-major leaf is copied by autograd to match it)."""
    batch, kv_heads, length, dim = x.shape
    if x.transpose(1, 2).is_contiguous():  # [B, T, hkv, D] in memory: row t * hkv + j
        table, flat = x.transpose(1, 2).flatten(1, 2), chosen * kv_heads + kv_head[:, None]
    else:
        table, flat = x.flatten(1, 2), kv_head[:, None] * length + chosen  # row j * T + t
    return table.gather(1, flat.flatten(1)[..., None].expand(-1, -1, dim))


def _project(linear: nn.Linear, x: Tensor, heads: int, dim: int) -> Tensor:
    """The first ``heads`` heads of ``linear``'s output: x [B, T, d] -> [B, heads, T, D]."""
    rows = slice(0, heads * dim)
    bias = None if linear.bias is None else linear.bias[rows]
    out = F.linear(x, linear.weight[rows], bias)  # [B, T, heads * D]
    return out.view(*x.shape[:2], heads, dim).transpose(1, 2)
