"""Ulysses sequence parallelism (SPECS 1.5): all-to-all from sequence shards to head shards.

Each rank of a Ulysses group holds T/P tokens of every head. An all-to-all turns that into the
full group's T tokens of H/P heads, the unchanged inner attention runs on it, and the inverse
all-to-all restores the sequence shard. The exchange is DeepSpeed's
``deepspeed.sequence.layer.DistributedAttention`` (``scatter_idx=2, gather_idx=1`` on
``[B, T/P, H, D]``), which concatenates the ranks' tokens in group-rank order; the token
metadata (global sequence positions, RoPE positions, doc ids) is all-gathered in the same order,
so the inner attention masks by GLOBAL positions exactly as on one device. Any inner core works:
the dense core, a sparse variant, or ring attention across a second group (the hybrid). Cores
with token-dependent parameters read ``ctx.hidden`` (the layer input); it is all-gathered too,
differentiably, for the cores that declare ``reads_hidden``.

RoPE: q and k usually arrive rotated by the model. A wrapper declares its inner core's
``applies_rope_itself``; when that is True (Landmark: ``reference`` retrieval re-positions its
keys), the model hands over q, k UNROTATED plus ``ctx.rotary`` (cos, sin of the local tokens),
the tables are all-gathered with the metadata, and the inner core rotates each token with its own
position's angles after the exchange: rotation acts position by position, so that is the same
numbers as rotating before it.

Token order: the inner core gets the group's tokens in rank order with their global positions.
Under the mesh's layout (``ParallelMesh.shard_batch``: the ring shard cut into contiguous
pieces) that is ``arange(T)`` with Ulysses alone and the ring shard (two zigzag chunks) under
Ulysses x ring. Cores never rely on it: dense cores mask by positions, and the sparse variants
(NSA, MoSA, Landmark) sort their keys by position (``attention/sequence_keys.py``). Cores with
per-head parameters are told their heads before wrapping (``restrict_to_heads``, called by
``parallelize``).

Heads: the query heads must divide by P. Key/value heads that do not divide by P (GQA with few
kv heads, down to MQA) are replicated before the exchange: each kv head is repeated
``r = P / gcd(Hkv, P)`` times in place, which keeps query head h on the rank holding its kv
head (``Hq % lcm(Hkv, P) == 0`` always holds when both Hq % Hkv and Hq % P are 0). Autograd sums
the replicas' gradients back into the original head.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from longctx.attention.context import AttentionContext
from longctx.errors import LongctxError


def check_ulysses_heads(
    num_heads: int, num_kv_heads: int, degree: int, *, recipe_fields: bool = False
) -> None:
    """Raise a one-line LongctxError unless ``num_heads`` query heads split over ``degree``.

    The one owner of the Ulysses head rule: ``parallelize``, ``UlyssesAttention`` and the recipe
    validator all call it; ``recipe_fields`` names the numbers as recipe fields
    (``model.num_attention_heads=4``). Key/value heads need no check
    (``kv_head_replication`` handles any GQA ratio).
    """
    if num_heads % degree:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        heads, ulysses = (
            (f"model.num_attention_heads={num_heads}", f"parallel.ulysses={degree}")
            if recipe_fields
            else (f"num_attention_heads {num_heads}", f"parallel.ulysses {degree}")
        )
        raise LongctxError(
            f"{heads} is not divisible by {ulysses}; choose parallel.ulysses among {divisors} "
            "or use parallel.ring for the rest"
        )
    if num_heads % num_kv_heads:
        raise LongctxError(
            f"num_attention_heads {num_heads} is not divisible by num_key_value_heads "
            f"{num_kv_heads}; fix the model config"
        )


def kv_head_replication(num_kv_heads: int, degree: int) -> int:
    """How many times each kv head is repeated so that the kv heads divide by ``degree``."""
    return degree // math.gcd(num_kv_heads, degree)


def _gather_tokens(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in group-rank order (no gradient)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherTokensWithGrad(torch.autograd.Function):
    """All-gather along ``dim`` whose backward returns each rank its tokens' summed gradient.

    Every rank's gathered copy feeds that rank's loss, so the gradient of a token is the sum
    over ranks of the gradients reaching its slot: an all-reduce, then this rank's slice.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim, ctx.length = group, dim, x.shape[dim]
        return _gather_tokens(x, group, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.length
        return grad.narrow(ctx.dim, start, ctx.length), None, None


def gather_tokens_with_grad(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    """Differentiable concatenation of every rank's ``x`` along ``dim`` (group-rank order)."""
    return _GatherTokensWithGrad.apply(x, group, dim)


class ContextGather:
    """The attention context of the whole Ulysses group: what each layer's inner core sees.

    The token metadata (positions, doc ids) and the RoPE tables (``ctx.rotary``, set when the
    inner core ``applies_rope_itself``) are the same tensors in every layer of one forward, so
    their gathered form is kept and reused while the source tensors are the same objects: a
    model with L layers pays one metadata all-gather per forward, not L. ``hidden`` differs per
    layer and is gathered (with gradient) on each call that asks for it. The rotary tables are
    constants of the positions, so they are gathered without gradient.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self._sources: tuple[Tensor | None, ...] | None = None
        self._gathered: tuple[Tensor | None, ...] | None = None

    def _metadata(self, ctx: AttentionContext) -> tuple[Tensor | None, ...]:
        cos, sin = (None, None) if ctx.rotary is None else ctx.rotary
        sources = (ctx.position_ids, ctx.seq_positions, ctx.doc_ids, cos, sin)
        if self._sources is None or any(a is not b for a, b in zip(self._sources, sources)):
            dims = (1, 0, 1, 1, 1)  # [B, T], [T], [B, T], [B, T, D], [B, T, D]: the token dim
            self._gathered = tuple(
                None if x is None else _gather_tokens(x, self.group, dim=dim)
                for x, dim in zip(sources, dims)
            )  # each with P*T tokens in group-rank order
            self._sources = sources
        return self._gathered

    def __call__(self, ctx: AttentionContext, *, with_hidden: bool) -> AttentionContext:
        position_ids, seq_positions, doc_ids, cos, sin = self._metadata(ctx)
        hidden = None
        if with_hidden and ctx.hidden is not None:
            hidden = gather_tokens_with_grad(ctx.hidden, self.group, dim=1)  # [B, P*T, d]
        return AttentionContext(
            position_ids=position_ids,
            seq_positions=seq_positions,
            doc_ids=doc_ids,
            hidden=hidden,
            rotary=None if cos is None else (cos, sin),
        )


class _HeadsLast(nn.Module):
    """Adapter between DeepSpeed's ``[B, T, h, D]`` layout and a core taking ``[B, h, T, D]``."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        # q [B, T, h, D]; k, v [B, T, hkv, D] -> core on [B, h, T, D] -> back to [B, T, h, D]
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx)
        return out.transpose(1, 2)


class UlyssesAttention(nn.Module):
    """Attention core that runs ``inner`` on the full sequence of a head subset (see module).

    ``forward(q [B, Hq, T/P, D], k, v [B, Hkv, T/P, D], ctx) -> out [B, Hq, T/P, D]``, the
    same signature as the core it replaces; ``ctx`` holds this rank's tokens' metadata.
    ``gather_hidden=False`` skips gathering ``ctx.hidden`` for an inner core that never reads
    it (``parallelize`` passes the core's ``reads_hidden``). Needs ``deepspeed.comm``
    initialised (done here when it is not, on torch's backend).
    """

    projects_itself = False  # the layer projects its tokens for every head (``AttentionCore``)

    def __init__(
        self,
        inner: nn.Module,
        group: dist.ProcessGroup,
        *,
        num_heads: int,
        num_kv_heads: int,
        gather_hidden: bool = True,
        context_gather: ContextGather | None = None,
    ):
        super().__init__()
        # DeepSpeed is imported here, not at module level, so that importing longctx.parallel
        # (the data loader does, for the layout) stays light.
        import deepspeed
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention

        self.degree = dist.get_world_size(group)
        check_ulysses_heads(num_heads, num_kv_heads, self.degree)
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self.kv_repeat = kv_head_replication(num_kv_heads, self.degree)
        self.gather_hidden = gather_hidden
        self.context_gather = context_gather or ContextGather(group)
        self.exchange = DistributedAttention(_HeadsLast(inner), group, scatter_idx=2, gather_idx=1)

    @property
    def inner(self) -> nn.Module:
        return self.exchange.local_attn.core

    @property
    def applies_rope_itself(self) -> bool:
        """The inner core's capability: when it rotates q, k itself, the model hands this
        wrapper unrotated q, k and ``ctx.rotary``, which travel through the exchange to it."""
        return self.inner.applies_rope_itself

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        if self.kv_repeat > 1:
            k = k.repeat_interleave(self.kv_repeat, dim=1)  # [B, Hkv * r, T/P, D]
            v = v.repeat_interleave(self.kv_repeat, dim=1)
        full_ctx = self.context_gather(ctx, with_hidden=self.gather_hidden)
        out = self.exchange(
            q.transpose(1, 2),  # [B, T/P, Hq, D]
            k.transpose(1, 2),
            v.transpose(1, 2),
            0,  # batch dim
            None,  # DeepSpeed rotates nothing: q, k arrive rotated, or the inner core rotates
            full_ctx,  # them with full_ctx.rotary (the group's tables, in the exchange's order)
        )  # [B, T/P, Hq, D]
        return out.transpose(1, 2)  # [B, Hq, T/P, D]

    def extra_repr(self) -> str:
        return f"degree={self.degree}, kv_repeat={self.kv_repeat}"
