"""Which attention core runs a recipe: ``(attention.variant, positional.kind)`` -> core class.

The model's attention layer projects q, k, v, applies RoPE when ``positional.kind`` is ``rope``,
and hands everything else to the core built here: the attention variant and any position
encoding that lives in the scores (BAM, CoPE, TAPA). The model, the recipe validator, the
batch path and sequence parallelism all ask this registry, never a variant by name.

Adding a core:

1. write ``attention/<name>.py`` with a subclass of ``AttentionCore`` (``core.py``): the
   constructor ``(shape, attention, positional)``, ``forward(q, k, v, ctx)``, truthful
   capability attributes, and ``recipe_problem`` / ``transform_batch`` if it needs them;
2. add its line to ``CORES`` below (``**_rope_or_none("name", NameAttention)`` for a variant
   that runs under RoPE and NoPE); the variant name goes into ``AttentionConfig.variant``.
"""

from __future__ import annotations

from longctx.attention.config import AttentionConfig
from longctx.attention.core import AttentionCore, AttentionShape
from longctx.attention.dense import DenseAttention
from longctx.attention.landmark import LandmarkAttention
from longctx.attention.mosa import MoSAAttention
from longctx.attention.nsa import NSAAttention
from longctx.attention.power import PowerAttention
from longctx.attention.s2 import S2Attention
from longctx.attention.scored import BAMAttention, CoPEAttention, TAPAAttention
from longctx.errors import LongctxError
from longctx.positional.config import PositionalConfig


def _rope_or_none(variant: str, core: type[AttentionCore]) -> dict:
    """``core`` under both position encodings the layer applies outside the core (or none)."""
    return {(variant, "rope"): core, (variant, "none"): core}


CORES: dict[tuple[str, str], type[AttentionCore]] = {
    **_rope_or_none("dense", DenseAttention),
    **_rope_or_none("power", PowerAttention),
    **_rope_or_none("landmark", LandmarkAttention),
    **_rope_or_none("nsa", NSAAttention),
    **_rope_or_none("mosa", MoSAAttention),
    **_rope_or_none("s2", S2Attention),
    ("dense", "cope"): CoPEAttention,
    ("dense", "bam"): BAMAttention,
    ("dense", "tapa"): TAPAAttention,
}


def core_class(attention: AttentionConfig, positional: PositionalConfig) -> type[AttentionCore]:
    """The core class of ``attention.variant`` with ``positional.kind``; a one-line
    LongctxError naming the pair and the available ones when there is none."""
    key = (attention.variant, positional.kind)
    if key not in CORES:
        available = ", ".join(f"{variant}+{kind}" for variant, kind in CORES)
        raise LongctxError(
            f"attention.variant {attention.variant!r} with positional.kind {positional.kind!r} "
            f"is not available; choose a variant+kind pair among {available}"
        )
    return CORES[key]


def build_attention_core(
    shape: AttentionShape, attention: AttentionConfig, positional: PositionalConfig
) -> AttentionCore:
    """The ``(q, k, v, ctx) -> out`` core of one layer of shape ``shape``.

    q [B, Hq, T, D], k/v [B, Hkv, T, D] (rotated when RoPE is on) -> out [B, Hq, T, D].
    """
    return core_class(attention, positional)(shape, attention, positional)


def recipe_problem(
    shape: AttentionShape,
    attention: AttentionConfig,
    positional: PositionalConfig,
    *,
    ulysses: int,
    ring: int,
) -> str | None:
    """Why these sections and SP degrees cannot run (one line), or None: an unknown pair, or
    whatever the core class's ``recipe_problem`` says."""
    try:
        core = core_class(attention, positional)
    except LongctxError as error:
        return str(error)
    return core.recipe_problem(shape, attention, positional, ulysses=ulysses, ring=ring)


def sequence_problem(
    attention: AttentionConfig, positional: PositionalConfig, seq_len: int
) -> str | None:
    """Why the recipe's core cannot train on ``seq_len`` tokens (one line), or None."""
    return core_class(attention, positional).sequence_problem(attention, seq_len)
