"""``DenseAttention``: the default inner attention core behind the model's attention seam."""

from __future__ import annotations

from torch import Tensor

from longctx.attention.context import AttentionContext
from longctx.attention.core import AttentionCore
from longctx.attention.kernels import block_attention
from longctx.attention.mask import MaskSpec


class DenseAttention(AttentionCore):
    """Exact causal softmax attention over the local tokens, with doc ids and the layer's
    sliding window (``shape.sliding_window``).

    The model's attention layer projects and rotates q, k, v and calls this core; sequence
    parallelism swaps the core (ring, Ulysses) without touching the layer. Scale 1/sqrt(D).
    Its softmax merges block by block (ring attention runs it), and it masks keys by ``ctx``'s
    key side, so it also runs on gathered keys (``key_gather``).
    """

    merges_blockwise = True
    accepts_gathered_keys = True

    def mask_for(self, ctx: AttentionContext) -> MaskSpec:
        """The mask of a forward pass: causal on global positions, per document, windowed."""
        return ctx.causal_mask(self.sliding_window)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] (already rotated) -> out [B, Hq, T, D]."""
        out, _ = block_attention(
            q,
            k,
            v,
            mask=self.mask_for(ctx),
            backend=self.config.backend,
            chunk_size=self.config.chunk_size,
        )
        return out

    def extra_repr(self) -> str:
        return f"backend={self.config.backend}, sliding_window={self.sliding_window}"
