"""S2-attn, LongLoRA's shifted sparse attention (section 3.2): grouped attention for training.

In training the sequence of T tokens is cut into groups of ``g`` tokens (``attention.s2.
group_size``, default T / 4) and every token attends causally within its own group only. The
first half of the query heads (``h < H // 2``) uses the groups as they are; the second half
sees the tokens rolled by ``-g / 2`` before grouping and rolled back after, so its groups
straddle the first half's group boundaries and information flows between neighbouring groups.
In ``model.eval()`` the core is plain dense causal attention: S2 is a training-time
approximation, the fine-tuned model is used with full attention.

The roll wraps around, as in LongLoRA's reference code (``llama_attn_replace.py``: ``roll(-g //
2)``, reshape into groups, causal attention per group, roll back): the shifted heads' last group
holds the last ``g / 2`` tokens followed by the first ``g / 2``, and causality inside it is by
the rolled order, so the first ``g / 2`` tokens of the sequence see its last ``g / 2`` tokens in
those heads. Packed documents stay apart (doc ids are rolled with the tokens), so that wrapped
pair only meets within one document. ``/work/shared/SPECS.md`` says nothing about S2-attn; this
follows the paper and its code.

With grouped-query attention the kv heads are rolled with the query heads they serve; when the
half split falls inside a kv group (e.g. 9 query heads on 3 kv heads) the kv heads are repeated
per query head first. Under Ulysses a rank computes query heads ``start .. stop - 1`` of the
full sequence (``restrict_to_heads``), and which of them shift is decided on the global head
index. Ring attention cannot run it: a rank holds a slice of the sequence while the shifted
groups wrap around the whole of it, so ``recipe_problem`` refuses ``parallel.ring > 1``.
Each group runs through ``block_attention`` as one batch row: ``[B, H, T, D]`` becomes
``[B * T / g, H, g, D]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.core import AttentionShape
from longctx.attention.dense import DenseAttention
from longctx.attention.kernels import block_attention
from longctx.attention.mask import MaskSpec
from longctx.errors import LongctxError
from longctx.positional.config import PositionalConfig


def s2_group_size(attention: AttentionConfig, seq_len: int) -> int:
    """Tokens per group for a sequence of ``seq_len``: ``attention.s2.group_size`` or T // 4."""
    return attention.s2.group_size or seq_len // 4


def s2_length_problem(attention: AttentionConfig, seq_len: int) -> str | None:
    """Why S2-attn cannot group ``seq_len`` tokens (one line naming the fix), or None."""
    group = s2_group_size(attention, seq_len)
    if group >= 2 and group % 2 == 0 and seq_len % group == 0:
        return None
    if attention.s2.group_size is None:
        step = 8  # four groups of an even size
        reason = "four groups of an even number of tokens (attention.s2.group_size: null)"
    else:
        step, reason = group, f"groups of attention.s2.group_size={group} tokens"
    return (
        f"attention.variant 's2' needs a sequence length ({seq_len}) that divides into "
        f"{reason}; use a multiple of {step}, e.g. data.seq_len: {max(step, seq_len // step * step)}"
    )


def _grouped_causal(
    q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, group: int, config: AttentionConfig
) -> Tensor:
    """Causal attention within consecutive groups of ``group`` tokens.

    q [B, H, T, D], k/v [B, Hkv, T, D], doc_ids [B, T] or None -> out [B, H, T, D].
    """
    batch, heads, length, dim = q.shape
    count = length // group

    def to_groups(x: Tensor) -> Tensor:  # [B, h, T, D] -> [B * count, h, group, D]
        b, h = x.shape[:2]
        return x.reshape(b, h, count, group, dim).transpose(1, 2).reshape(b * count, h, group, dim)

    docs = None if doc_ids is None else doc_ids.reshape(batch * count, group)
    mask = MaskSpec(causal=True, q_doc_ids=docs, k_doc_ids=docs)
    out, _ = block_attention(
        to_groups(q),
        to_groups(k),
        to_groups(v),
        mask=mask,
        backend=config.backend,
        chunk_size=config.chunk_size,
    )
    return out.reshape(batch, count, heads, group, dim).transpose(1, 2).reshape(q.shape)


class S2Attention(DenseAttention):
    """S2-attn in training, dense causal attention in evaluation (see the module docstring).

    q [B, Hq, T, D], k/v [B, Hkv, T, D] (rotated) -> out [B, Hq, T, D], scale 1/sqrt(D). It
    needs the tokens in sequence order (one device, or Ulysses alone), so neither ring
    attention nor key gather runs it.
    """

    merges_blockwise = False
    accepts_gathered_keys = False
    supports_window = False

    def __init__(
        self, shape: AttentionShape, attention: AttentionConfig, positional: PositionalConfig
    ):
        super().__init__(shape, attention, positional)
        self.head_start = 0  # global index of this core's first query head (Ulysses)

    @classmethod
    def recipe_problem(cls, shape, attention, positional, *, ulysses: int, ring: int):
        """Refuses ring attention (the shifted groups wrap around the whole sequence) and, as
        every core, a sliding window it does not honour."""
        if ring > 1:
            return (
                f"attention.variant 's2' cannot run under parallel.ring={ring}: its shifted "
                "groups wrap around the whole sequence, which no ring rank holds; use "
                "parallel.ulysses for sequence parallelism (or parallel.ring: 1)"
            )
        return super().recipe_problem(shape, attention, positional, ulysses=ulysses, ring=ring)

    @classmethod
    def sequence_problem(cls, attention: AttentionConfig, seq_len: int) -> str | None:
        """Why ``seq_len`` tokens do not split into S2 groups (one line), or None."""
        return s2_length_problem(attention, seq_len)

    def restrict_to_heads(self, start: int, stop: int) -> None:
        """Compute global query heads ``start .. stop - 1``: those ``>= H // 2`` shift."""
        self.head_start = start

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """Grouped and shifted attention in training, dense attention in evaluation."""
        if not self.training:
            return super().forward(q, k, v, ctx)
        length = q.shape[2]
        problem = s2_length_problem(self.config, length)
        if problem is not None:
            raise LongctxError(problem)
        if not torch.equal(ctx.seq_positions, torch.arange(length, device=q.device)):
            raise LongctxError(
                "S2-attn needs the tokens in sequence order (one device or Ulysses alone); "
                "use parallel.ring: 1"
            )
        group = s2_group_size(self.config, length)
        unshifted = min(max(self.shape.num_heads // 2 - self.head_start, 0), q.shape[1])
        repeat = q.shape[1] // k.shape[1]
        if unshifted % repeat:  # the half split falls inside a kv group: one kv head per q head
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            repeat = 1
        split = unshifted // repeat
        parts = []
        if unshifted:
            parts.append(
                _grouped_causal(
                    q[:, :unshifted], k[:, :split], v[:, :split], ctx.doc_ids, group, self.config
                )
            )
        if unshifted < q.shape[1]:
            shift = group // 2

            def roll(x: Tensor) -> Tensor:
                return x.roll(-shift, dims=-2 if x.dim() == 4 else -1)

            docs = None if ctx.doc_ids is None else roll(ctx.doc_ids)
            out = _grouped_causal(
                roll(q[:, unshifted:]),
                roll(k[:, split:]),
                roll(v[:, split:]),
                docs,
                group,
                self.config,
            )
            parts.append(out.roll(shift, dims=2))
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.config.s2.group_size or 'T/4'}"
