"""Which position encoding the model uses (RoPE's own numbers live in ``ModelConfig``).

Each encoding beyond RoPE keeps its settings in its own sub-model (defaults from SPECS.md
section 2); only the one named by ``kind`` is used.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PositionalKind = Literal["rope", "cope", "bam", "tapa", "none"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CoPEConfig(_Section):
    """Contextual position encoding (SPECS 2.2)."""

    npos_max: int = Field(64, gt=0, description="number of learnable position embeddings")
    shared_heads: bool = Field(True, description="one embedding table for all heads of a layer")


class BAMConfig(_Section):
    """Bayesian attention mechanism (SPECS 2.3): a generalised-Gaussian log-prior per head."""

    ssmax: bool = Field(False, description="scalable softmax: logits x s_h log(n_i)")


class TAPAConfig(_Section):
    """Token-aware phase attention (SPECS 2.4)."""

    theta: float = Field(0.5, gt=0, lt=1, description="fraction of head dims used as amplitude")
    alpha: float = Field(0.1, gt=0, description="phase grows as |m - n| ** alpha")


class PositionalConfig(_Section):
    """``kind`` selects the encoding. ``rope`` rotates q and k by global position ids using
    ``model.rope_theta`` and ``model.rope_scaling``; ``none`` is NoPE (causal mask only);
    ``cope``, ``bam`` and ``tapa`` add their score terms inside the attention core."""

    kind: PositionalKind = "rope"
    cope: CoPEConfig = Field(default_factory=CoPEConfig)
    bam: BAMConfig = Field(default_factory=BAMConfig)
    tapa: TAPAConfig = Field(default_factory=TAPAConfig)
