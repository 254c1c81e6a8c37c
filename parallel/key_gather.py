"""Key-gather context parallelism: every rank's keys and values against this rank's queries.

Ring attention (``parallel/ring.py``) streams K,V blocks around the ring and merges partial
softmaxes, which only works for cores whose attention is a softmax over independent
(query, key) scores (``merges_blockwise``: ``DenseAttention``). Cores whose weights couple keys (CoPE's gate sums run
over every key between j and i; NSA compresses and selects key blocks; MoSA picks its top-k
tokens over the whole sequence; Landmark normalises per key block) cannot be merged block by
block. For them the ring group all-gathers K and V instead (the scheme Llama 3 trains its
context parallelism with): each rank keeps its own T/P queries, receives all T keys and values
(sorted by global position), and runs the unchanged core on that rectangle. The queries and
every per-query tensor stay sharded; only K, V (B x Hkv x T x D each), the keys' metadata and,
for cores that read it, the layer input at the keys are replicated.

Gradients: the gather's backward all-reduces the keys' gradient over the group and keeps each
rank's own slice, so dK, dV are exact sums over every rank's queries.

The core receives ``ctx`` with the key side filled in (``AttentionContext.key_*``): its
``seq_positions``/``doc_ids``/``hidden`` are this rank's queries', its ``k_*`` properties the
keys'. A core opts in with the ``AttentionCore`` capability ``accepts_gathered_keys = True``,
promising that it masks and positions keys by ``ctx.k_*`` (``parallelize`` refuses the others
under ring unless their softmax ``merges_blockwise``).

RoPE: the wrapper declares its inner core's ``applies_rope_itself``. When the inner core rotates
q, k itself (Landmark, whose ``reference`` retrieval re-positions unrotated keys), the model
hands over q, k unrotated and ``ctx.rotary`` (cos, sin of this rank's tokens): the tables are
all-gathered with the keys' metadata and sorted like the keys into ``ctx.key_rotary``, so the
core rotates its queries with ``ctx.rotary`` and the gathered keys with ``ctx.k_rotary``: the same
numbers as rotating every rank's keys before the gather.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from longctx.attention.context import AttentionContext
from longctx.parallel.ulysses import ContextGather, gather_tokens_with_grad


class KeyGatherAttention(nn.Module):
    """Attention core running ``inner`` on local queries against the ring group's keys.

    ``forward(q [B, Hq, T/P, D], k, v [B, Hkv, T/P, D], ctx) -> out [B, Hq, T/P, D]``, the
    signature of the core it wraps; ``ctx`` holds this rank's tokens' metadata (global
    ``seq_positions``). ``gather_hidden`` also gathers ``ctx.hidden`` into ``ctx.key_hidden``
    (with gradient) for cores that score keys by the layer input (MoSA's router). When
    ``ctx.rotary`` is set (the inner core ``applies_rope_itself``) the keys' tables are gathered
    into ``ctx.key_rotary``.
    """

    projects_itself = (
        False  # the layer projects this rank's tokens for every head (``AttentionCore``)
    )

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup, *, gather_hidden: bool = False):
        super().__init__()
        self.inner = inner
        self.group = group
        self.gather_hidden = gather_hidden
        self.context_gather = ContextGather(group)

    @property
    def applies_rope_itself(self) -> bool:
        """The inner core's capability: when it rotates q, k itself, the keys travel unrotated
        and their rotary tables are gathered with them (``ctx.key_rotary``)."""
        return self.inner.applies_rope_itself

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        full = self.context_gather(ctx, with_hidden=self.gather_hidden)  # keys in rank order
        order = full.seq_positions.argsort()  # [T] rank order -> global order
        k_all = gather_tokens_with_grad(k, self.group, dim=2).index_select(2, order)
        v_all = gather_tokens_with_grad(v, self.group, dim=2).index_select(2, order)
        key_ctx = AttentionContext(
            position_ids=ctx.position_ids,
            seq_positions=ctx.seq_positions,
            doc_ids=ctx.doc_ids,
            hidden=ctx.hidden,
            key_seq_positions=full.seq_positions[order],
            key_doc_ids=None if full.doc_ids is None else full.doc_ids.index_select(1, order),
            key_hidden=None if full.hidden is None else full.hidden.index_select(1, order),
            rotary=ctx.rotary,  # set when q, k arrive unrotated (the inner core rotates them)
            key_rotary=None
            if full.rotary is None
            else tuple(table.index_select(1, order) for table in full.rotary),
        )
        return self.inner(q, k_all, v_all, key_ctx)

    def extra_repr(self) -> str:
        return f"degree={dist.get_world_size(self.group)}, gather_hidden={self.gather_hidden}"
