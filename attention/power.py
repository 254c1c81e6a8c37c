"""PowerAttention (SPECS.md 3.3): a static power-of-two block pattern, window and sink blocks.

Tokens are grouped into position blocks of ``B`` tokens. A query block sees the key blocks at
block distance ``0 .. W-1`` (the window), at every power-of-two distance, and the first ``S``
blocks (the sinks), always causally:

    delta = q // B - kv // B
    visible = kv <= q and (delta < W or delta & (delta - 1) == 0 or kv // B < S)

A block therefore sees O(log T) blocks and the receptive field doubles with every layer, so a
token reaches any earlier token in O(log T) layers at O(T log T) cost.

The pattern is a ``BlockSparsePattern`` on the ``MaskSpec`` of a ``DenseAttention`` subclass:
the tiled kernels classify tile pairs from per-tile min/max and skip hidden tiles (no T x T mask
is built), and ring attention, which only asks the core for its ``mask_for(ctx)``, skips hidden
K,V shards the same way with no code of its own.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from longctx.attention.config import AttentionConfig, PowerConfig
from longctx.attention.context import AttentionContext
from longctx.attention.core import AttentionShape
from longctx.attention.dense import DenseAttention
from longctx.attention.mask import BlockSparsePattern, MaskSpec
from longctx.positional.config import PositionalConfig


@dataclasses.dataclass(frozen=True)
class PowerRule:
    """``rule(qb, kb)`` of the power pattern on block indices (see the module docstring).

    Uses only elementwise integer ops, so the flex backend can trace it under ``vmap``.
    Future blocks (``delta < 0``) pass the rule; causality removes them.
    """

    window_blocks: int
    sink_blocks: int

    def __call__(self, qb: Tensor, kb: Tensor) -> Tensor:
        delta = qb - kb  # broadcast [.., nq, nk] int64
        power_of_two = (delta > 0) & ((delta & (delta - 1)) == 0)
        return (delta < self.window_blocks) | power_of_two | (kb < self.sink_blocks)


def power_pattern(config: PowerConfig) -> BlockSparsePattern:
    """The ``BlockSparsePattern`` of ``config`` (block size in tokens, window and sinks in blocks)."""
    rule = PowerRule(window_blocks=config.window_blocks, sink_blocks=config.sink_blocks)
    return BlockSparsePattern(block_size=config.block_size, rule=rule)


class PowerAttention(DenseAttention):
    """Exact softmax attention restricted to the power-of-two block pattern of
    ``attention.power``.

    q [B, Hq, T, D], k/v [B, Hkv, T, D] -> out [B, Hq, T, D], scale 1/sqrt(D). Causality,
    documents and a model's sliding window still apply on top of the pattern; everything else
    (kernels, backward, ring, capabilities) is ``DenseAttention``'s.
    """

    def __init__(
        self, shape: AttentionShape, attention: AttentionConfig, positional: PositionalConfig
    ):
        super().__init__(shape, attention, positional)
        self.pattern = power_pattern(attention.power)

    def mask_for(self, ctx: AttentionContext) -> MaskSpec:
        """The dense causal/document/window mask plus the power pattern on global positions."""
        return dataclasses.replace(super().mask_for(ctx), block_sparse=self.pattern)

    def extra_repr(self) -> str:
        power = self.config.power
        return (
            f"{super().extra_repr()}, block_size={power.block_size}, "
            f"window_blocks={power.window_blocks}, sink_blocks={power.sink_blocks}"
        )
