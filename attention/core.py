"""The attention-core contract: what every inner attention of the model implements.

The model's attention layer projects q, k, v (and rotates them when ``positional.kind`` is
``rope``) and hands the rest to one core, ``layers[i].self_attn.core``:

    core(q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D], ctx: AttentionContext)
        -> out [B, Hq, T, D]

A core is an ``AttentionCore``. It is built from an ``AttentionShape`` (the layer's numbers,
never the model's config: attention sits below model) plus the recipe's ``AttentionConfig``
and ``PositionalConfig``, and it declares what it can do as class attributes, so that sequence
parallelism, the recipe validator and the batch path ask instead of probing:

    reads_hidden           reads ``ctx.hidden`` (the layer input); Ulysses gathers it for them
    reads_key_hidden       under key gather, also reads ``ctx.key_hidden`` (the gathered input)
    merges_blockwise       its softmax merges block by block, so ring attention can run it
                           (from its ``mask_for(ctx)`` and ``config.backend``, as for dense)
    accepts_gathered_keys  runs on all-gathered keys (key-gather context parallelism) under ring
    supports_window        honours the model's sliding window (else ``recipe_problem`` refuses it)
    has_head_parameters    has per-head parameters: ``restrict_to_heads`` narrows them to the
                           query heads a Ulysses rank computes
    applies_rope_itself    gets q, k UNROTATED plus the rotary tables and rotates them itself
                           (Landmark retrieval re-positions keys): ``ctx.rotary`` (cos, sin
                           [B, T, D]) for the queries, ``ctx.k_rotary`` for the keys (under key
                           gather the gathered ``ctx.key_rotary``, sorted like the keys). The
                           model reads it from ``self_attn.core``; the sequence-parallel
                           wrappers (``KeyGatherAttention``, ``UlyssesAttention``) declare their
                           inner core's and gather the tables with the tokens, ring attention
                           declares False. When ``ctx.rotary`` is None (no RoPE) q, k come
                           rotated as usual

Three hooks a core owns, all class methods so they run before any model exists:
``recipe_problem`` (why a recipe cannot run this core, one line, or None),
``sequence_problem`` (why it cannot train on sequences of a given length, e.g. S2-attn's
groups) and
``transform_batch`` (what the batch path does to every batch before it is sharded, e.g.
Landmark inserts its landmark tokens). ``longctx.attention.registry`` maps
``(attention.variant, positional.kind)`` to the core class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from longctx.attention.config import AttentionConfig
from longctx.errors import LongctxError
from longctx.positional.config import PositionalConfig

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class AttentionShape:
    """The numbers of one attention layer a core may read.

    ``vocab_size`` is for cores that add tokens to the sequence (Landmark's token id);
    ``max_position_embeddings`` for encodings scaled by the trained length (BAM);
    ``initializer_range`` the std a core draws its new weights with (NSA, MoSA).
    ``sliding_window`` is this layer's window (None: full attention). ``ModelConfig``'s
    ``attention_shape(layer_index)`` builds it for a model layer.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    layer_index: int = 0
    sliding_window: int | None = None
    initializer_range: float = 0.02


class AttentionCore(nn.Module):
    """Base class of every attention core; see the module docstring for the contract.

    Subclasses implement ``forward(q, k, v, ctx) -> out`` with the shapes above. The
    constructor refuses, in one line, what ``recipe_problem`` refuses without sequence
    parallelism (a window the core cannot honour, a head split that does not fit, ...)."""

    reads_hidden: ClassVar[bool] = False
    reads_key_hidden: ClassVar[bool] = False
    merges_blockwise: ClassVar[bool] = False
    accepts_gathered_keys: ClassVar[bool] = False
    supports_window: ClassVar[bool] = True
    has_head_parameters: ClassVar[bool] = False
    applies_rope_itself: ClassVar[bool] = False

    def __init__(
        self, shape: AttentionShape, attention: AttentionConfig, positional: PositionalConfig
    ):
        super().__init__()
        problem = type(self).recipe_problem(shape, attention, positional, ulysses=1, ring=1)
        if problem is not None:
            raise LongctxError(problem)
        self.shape = shape
        self.config = attention
        self.positional = positional
        self.sliding_window = shape.sliding_window

    @classmethod
    def recipe_problem(
        cls,
        shape: AttentionShape,
        attention: AttentionConfig,
        positional: PositionalConfig,
        *,
        ulysses: int,
        ring: int,
    ) -> str | None:
        """Why a recipe with these sections and SP degrees cannot run this core (one line
        naming the field and the fix), or None. The default refuses only a sliding window the
        core cannot honour."""
        if shape.sliding_window is not None and not cls.supports_window:
            return (
                f"attention.variant {attention.variant!r} does not honour the model's "
                f"sliding_window ({shape.sliding_window}); set model.sliding_window: null or use "
                "attention.variant: dense"
            )
        return None

    @classmethod
    def sequence_problem(cls, attention: AttentionConfig, seq_len: int) -> str | None:
        """Why this core cannot train on sequences of ``seq_len`` tokens (one line naming the
        fix), or None; the recipe validator asks it for ``data.seq_len`` of every stage."""
        return None

    @classmethod
    def transform_batch(
        cls, batch: Batch, shape: AttentionShape, attention: AttentionConfig
    ) -> Batch:
        """The packed batch ``{input_ids, labels, position_ids, doc_ids}`` (each [B, T]) this
        core trains and evaluates on; the identity unless the core adds tokens."""
        return batch

    def restrict_to_heads(self, start: int, stop: int) -> None:
        """Compute query heads ``start .. stop - 1`` only (a Ulysses rank's block of heads).
        Cores with ``has_head_parameters`` override it, and cores whose pattern depends on the
        head index (S2-attn shifts the second half); the others need nothing."""
