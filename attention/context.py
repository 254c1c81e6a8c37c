"""What the attention core needs to know about the tokens of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from longctx.attention.mask import MaskSpec


@dataclass
class AttentionContext:
    """Built by the model once per forward and handed to every attention layer's core.

    ``position_ids`` drive the position encoding (RoPE restarts per document when packed);
    ``seq_positions`` are where each LOCAL token sits in the global sequence, which is what
    causality and windows are measured on (``arange(T)`` unsharded, zigzag indices under
    sequence parallelism, SPECS.md 1.3); ``doc_ids`` keep packed documents apart; ``hidden`` is
    the attention layer's input x, for cores whose parameters act on tokens.
    """

    position_ids: Tensor  # [B, T] RoPE positions (global; per-document when packed)
    seq_positions: Tensor  # [T] int64 global sequence index of each local token
    doc_ids: Tensor | None = None  # [B, T]
    # The layer's normed input, for cores with token-dependent parameters (NSA gates, MoSA
    # routers); set by the attention layer for its own core.
    hidden: Tensor | None = None  # [B, T, d]

    def causal_mask(self, window: int | None = None) -> MaskSpec:
        """The mask of a forward pass over these tokens: causal on ``seq_positions``, per
        document (``doc_ids``), and within ``window`` tokens when one is given. Exact cores
        (dense, score-based) and ring attention all mask by these rules."""
        return MaskSpec(
            causal=True,
            q_positions=self.seq_positions,
            k_positions=self.seq_positions,
            q_doc_ids=self.doc_ids,
            k_doc_ids=self.doc_ids,
            window=window,
        )
