"""Which attention variant and kernel backend the model uses."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Backend = Literal["auto", "cpu_flash", "flex", "flash", "chunked", "reference"]
Variant = Literal["dense"]


class AttentionConfig(BaseModel):
    """``variant`` is the attention algorithm; ``backend`` the kernel that computes its blocks
    (``auto`` picks flash-attn on CUDA when installed, else torch's CPU flash op)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    variant: Variant = "dense"
    backend: Backend = "auto"
    chunk_size: int | None = Field(
        None,
        gt=0,
        description="query/key tile of the tiled kernels; None = the backend's measured default",
    )
