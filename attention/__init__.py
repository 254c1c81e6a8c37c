"""longctx.attention: the attention cores behind the model's attention seam, and their kernels.

``AttentionCore`` / ``AttentionShape`` (``core.py``) are the contract every core implements;
``core_class`` and ``build_attention_core`` (``registry.py``) pick and build the core of a
recipe's ``(attention.variant, positional.kind)``. ``block_attention(q, k, v, scale=,
mask=MaskSpec(...), backend=) -> (out, lse)`` is the one exact attention primitive (DESIGN.md
4); ``merge_partials`` combines partial results (SPECS.md 1.1); ``DenseAttention`` is the
default core.
"""

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.core import AttentionCore, AttentionShape
from longctx.attention.dense import DenseAttention
from longctx.attention.kernels import block_attention, block_attention_backward
from longctx.attention.mask import BlockSparsePattern, MaskSpec, TileClass
from longctx.attention.merge import merge_partials
from longctx.attention.registry import build_attention_core, core_class

__all__ = [
    "AttentionConfig",
    "AttentionContext",
    "AttentionCore",
    "AttentionShape",
    "BlockSparsePattern",
    "DenseAttention",
    "MaskSpec",
    "TileClass",
    "block_attention",
    "block_attention_backward",
    "build_attention_core",
    "core_class",
    "merge_partials",
]
