"""Which position encoding the model uses (RoPE's own numbers live in ``ModelConfig``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

PositionalKind = Literal["rope", "none"]


class PositionalConfig(BaseModel):
    """``kind`` selects the encoding. ``rope`` rotates q and k by global position ids using
    ``model.rope_theta`` and ``model.rope_scaling``; ``none`` is NoPE (causal mask only)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: PositionalKind = "rope"
