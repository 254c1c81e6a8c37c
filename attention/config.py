"""Which attention variant and kernel backend the model uses, with each variant's settings.

Each sparse variant keeps its hyperparameters in its own sub-model (defaults from SPECS.md
section 3); only the one named by ``variant`` is used.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Backend = Literal["auto", "cpu_flash", "flex", "flash", "chunked", "reference"]
Variant = Literal["dense", "nsa", "mosa", "power", "landmark", "s2"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NSAConfig(_Section):
    """Native sparse attention (SPECS 3.1): compression, top-n block selection, sliding window."""

    compress_block: int = Field(32, gt=0, description="l: tokens summarised by one compressed key")
    compress_stride: int = Field(16, gt=0, description="d: stride between compressed blocks")
    select_block: int = Field(64, gt=0, description="l': raw tokens per selection block")
    select_top_n: int = Field(
        16,
        ge=3,
        description="n: selection blocks kept per query (>= 3: the first and the two "
        "most recent blocks are always kept)",
    )
    window: int = Field(512, gt=0, description="w: sliding-window branch length")


class MoSAConfig(_Section):
    """Mixture of sparse attention (SPECS 3.2): expert-choice routed heads beside dense heads."""

    dense_heads: int = Field(4, ge=0, description="heads that stay dense attention")
    sparsity: int = Field(8, gt=0, description="rho: each routed head keeps max(2, T / rho) tokens")


class PowerConfig(_Section):
    """PowerAttention (SPECS 3.3): power-of-two block pattern with a window and sink blocks."""

    block_size: int = Field(64, gt=0)
    window_blocks: int = Field(1, ge=1)
    sink_blocks: int = Field(1, ge=0)


class LandmarkConfig(_Section):
    """Landmark attention (SPECS 3.4): a landmark token after every block, grouped softmax."""

    block_size: int = Field(50, gt=0, description="tokens per block before each landmark")
    retrieve_top_k: int = Field(4, gt=0, description="blocks retrieved per query at inference")
    token_id: int | None = Field(
        None, ge=0, description="landmark token id; None = the model's last vocab id"
    )
    retrieval_positions: Literal["reference", "original"] = Field(
        "reference",
        description=(
            "RoPE positions of the retrieved blocks at inference: 'reference' rotates the "
            "unrotated keys into the k + 1 blocks before the query's own block (the "
            "epfml/landmark-attention mem_cache scheme: distances stay within (k + 2) blocks); "
            "'original' keeps every key's own position"
        ),
    )


class S2Config(_Section):
    """Shifted sparse attention (LongLoRA section 3.2): attention within groups of tokens, half
    the heads shifted by half a group; training only (dense attention in ``model.eval()``)."""

    group_size: int | None = Field(
        None,
        gt=0,
        description="tokens per group (even: half the heads shift by half a group); None = a "
        "quarter of the sequence, LongLoRA's group_size_ratio 1/4",
    )

    @field_validator("group_size")
    @classmethod
    def _even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError(
                f"attention.s2.group_size={value} is odd, but half the heads shift by half a "
                f"group; use an even size, e.g. {value + 1}"
            )
        return value


class AttentionConfig(_Section):
    """``variant`` is the attention algorithm; ``backend`` the kernel that computes its blocks
    (``auto`` picks flash-attn on CUDA when installed, else torch's CPU flash op)."""

    variant: Variant = "dense"
    backend: Backend = "auto"
    chunk_size: int | None = Field(
        None,
        gt=0,
        description=(
            "query/key tile of the tiled kernels (NSA: its window branch's query tile); None = "
            "the measured default"
        ),
    )
    nsa: NSAConfig = Field(default_factory=NSAConfig)
    mosa: MoSAConfig = Field(default_factory=MoSAConfig)
    power: PowerConfig = Field(default_factory=PowerConfig)
    landmark: LandmarkConfig = Field(default_factory=LandmarkConfig)
    s2: S2Config = Field(default_factory=S2Config)
