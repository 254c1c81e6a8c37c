"""Sequence parallelism: zigzag layout, SP-exact tiled loss (ring attention and Ulysses follow)."""

from longctx.parallel.layout import (
    pad_batch,
    shard_batch,
    zigzag_positions,
    zigzag_shard,
    zigzag_unshard,
)
from longctx.parallel.loss import tiled_cross_entropy, world_mean_scale

__all__ = [
    "pad_batch",
    "shard_batch",
    "tiled_cross_entropy",
    "world_mean_scale",
    "zigzag_positions",
    "zigzag_shard",
    "zigzag_unshard",
]
