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
    # Key side, when the keys are not the queries' own tokens (key-gather context parallelism,
    # ``parallel/key_gather.py``: every rank's keys, sorted by global position, against this
    # rank's queries). None means "the same tokens as the queries".
    key_seq_positions: Tensor | None = None  # [Tk] int64 global index of each key, increasing
    key_doc_ids: Tensor | None = None  # [B, Tk]
    key_hidden: Tensor | None = None  # [B, Tk, d]
    # RoPE (cos, sin) [B, T, D] of the queries' tokens, set by the attention layer only for a
    # core that ``applies_rope_itself`` (or a sequence-parallel wrapper around one, which gathers
    # it with the tokens): q, k then arrive unrotated. None: q, k are rotated (or no RoPE).
    rotary: tuple[Tensor, Tensor] | None = None
    # RoPE (cos, sin) [B, Tk, D] of the keys under key gather, ordered like the keys (None when
    # the keys are the queries' tokens, or q, k arrive rotated).
    key_rotary: tuple[Tensor, Tensor] | None = None

    @property
    def keys_are_queries(self) -> bool:
        """True when the keys are the queries' own tokens (no key-side fields set)."""
        return self.key_seq_positions is None

    @property
    def k_seq_positions(self) -> Tensor:
        """[Tk] global index of each key."""
        return self.seq_positions if self.keys_are_queries else self.key_seq_positions

    @property
    def k_doc_ids(self) -> Tensor | None:
        """[B, Tk] document ids of the keys (None when unpacked)."""
        return self.doc_ids if self.keys_are_queries else self.key_doc_ids

    @property
    def k_hidden(self) -> Tensor | None:
        """[B, Tk, d] the layer input at the key tokens (for routers that score keys)."""
        return self.hidden if self.keys_are_queries else self.key_hidden

    @property
    def k_rotary(self) -> tuple[Tensor, Tensor] | None:
        """(cos, sin) [B, Tk, D] of the keys' positions (None when q, k arrive rotated)."""
        return self.rotary if self.keys_are_queries else self.key_rotary

    def causal_mask(self, window: int | None = None) -> MaskSpec:
        """The mask of a forward pass over these tokens: causal on ``seq_positions``, per
        document (``doc_ids``), and within ``window`` tokens when one is given. Exact cores
        (dense, score-based) and ring attention all mask by these rules."""
        return MaskSpec(
            causal=True,
            q_positions=self.seq_positions,
            k_positions=self.k_seq_positions,
            q_doc_ids=self.doc_ids,
            k_doc_ids=self.k_doc_ids,
            window=window,
        )
