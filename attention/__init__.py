"""longctx.attention: exact block attention, its mask, the log-sum-exp merge and the dense core.

``block_attention(q, k, v, scale=, mask=MaskSpec(...), backend=) -> (out, lse)`` is the one
exact attention primitive (DESIGN.md 4); ``merge_partials`` combines partial results (SPECS.md
1.1); ``DenseAttention`` is the default core behind the model's attention seam.
"""

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.dense import DenseAttention
from longctx.attention.kernels import block_attention, block_attention_backward
from longctx.attention.mask import BlockSparsePattern, MaskSpec, TileClass
from longctx.attention.merge import merge_partials

__all__ = [
    "AttentionConfig",
    "AttentionContext",
    "BlockSparsePattern",
    "DenseAttention",
    "MaskSpec",
    "TileClass",
    "block_attention",
    "block_attention_backward",
    "merge_partials",
]
