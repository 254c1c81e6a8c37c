"""Builds the inner attention core of one layer from the recipe: the model's only entry point.

The model's attention layer projects q, k, v, applies RoPE when ``positional.kind`` is ``rope``,
and hands everything else to the core returned here: the attention variant and any position
encoding that lives in the scores (BAM, CoPE, TAPA). Adding a variant or an encoding means
adding a branch here and a module beside it; the model file does not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from longctx.attention.config import AttentionConfig
from longctx.attention.dense import DenseAttention
from longctx.attention.landmark import LandmarkAttention
from longctx.attention.mosa import MoSAAttention
from longctx.attention.nsa import NSAAttention
from longctx.attention.power import PowerAttention
from longctx.attention.scored import positional_score_core
from longctx.errors import LongctxError
from longctx.positional.config import PositionalConfig

if TYPE_CHECKING:  # the model imports this module; only its config's shape is read here
    from longctx.model.config import ModelConfig


def build_attention_core(
    config: ModelConfig,
    attention: AttentionConfig,
    positional: PositionalConfig,
    *,
    layer_index: int,
    sliding_window: int | None,
) -> nn.Module:
    """The ``(q, k, v, ctx) -> out`` core of layer ``layer_index``.

    q [B, Hq, T, D], k/v [B, Hkv, T, D] (rotated when RoPE is on) -> out [B, Hq, T, D].
    """
    if attention.variant == "dense" and positional.kind in ("rope", "none"):
        return DenseAttention(attention, sliding_window=sliding_window)
    if attention.variant == "power" and positional.kind in ("rope", "none"):
        return PowerAttention(attention, sliding_window=sliding_window)
    if attention.variant == "landmark" and positional.kind in ("rope", "none"):
        return LandmarkAttention(attention, sliding_window=sliding_window)
    if attention.variant == "nsa" and positional.kind in ("rope", "none"):
        return NSAAttention(config, attention)
    if attention.variant == "mosa" and positional.kind in ("rope", "none"):
        return MoSAAttention(config, attention, sliding_window=sliding_window)
    if attention.variant == "dense" and positional.kind in ("cope", "bam", "tapa"):
        return positional_score_core(config, attention, positional, sliding_window=sliding_window)
    raise LongctxError(
        f"attention.variant {attention.variant!r} with positional.kind {positional.kind!r} is "
        "not available in this build; use attention.variant: dense with positional.kind: rope "
        "or none"
    )
