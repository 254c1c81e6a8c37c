"""longctx.positional: position encodings (RoPE and its context-extension scalings).

``rope_frequencies`` gives the scaled RoPE frequencies and attention factor for a
transformers-style ``rope_scaling`` dict; ``RotaryEmbedding`` turns global position ids into
cos/sin tables and ``apply_rotary`` rotates q and k with them.
"""

from longctx.positional.config import PositionalConfig
from longctx.positional.rope import (
    KNOWN_ROPE_TYPES,
    RotaryEmbedding,
    apply_rotary,
    rope_frequencies,
    validate_rope_scaling,
)

__all__ = [
    "KNOWN_ROPE_TYPES",
    "PositionalConfig",
    "RotaryEmbedding",
    "apply_rotary",
    "rope_frequencies",
    "validate_rope_scaling",
]
