"""TAPA: token-aware phase attention (SPECS.md 2.4).

No RoPE. Each head's D dims split into an amplitude part (the first ``round(theta * D)`` dims,
A) and a phase part (the rest, P). The logit of query m and key n is

    s = (qA . kA / sqrt(|A|)) * cos(2 pi |m - n|^alpha * (qP . kP) / sqrt(|P|))

(theta 0.5, alpha 0.1 by default). The phase depends on the content and grows sub-linearly with
the distance, so attention decays smoothly rather than falling off a cliff past the training
length. Two Gram matrices per (query chunk, key) block; no parameters of its own. It runs in
``scored_attention``'s query-chunked kernel.

Converting a RoPE checkpoint (our design, SPECS 2.4 leaves it open): the q/k projections are
loaded unchanged and simply read through the split above; there is nothing new to initialise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from longctx.errors import LongctxError
from longctx.positional.config import TAPAConfig


def amplitude_dims(head_dim: int, theta: float) -> int:
    """Number of leading head dims that form the amplitude part (at least 1, at most D - 1)."""
    dims = round(theta * head_dim)
    if not 1 <= dims <= head_dim - 1:
        raise LongctxError(
            f"positional.tapa.theta={theta} with head dim {head_dim} leaves {dims} amplitude "
            f"dims; each part needs at least one dim: pick theta between {1 / head_dim:.3f} and "
            f"{1 - 1 / head_dim:.3f}"
        )
    return dims


def tapa_logits(q: Tensor, k: Tensor, distance: Tensor, *, amplitude: int, alpha: float) -> Tensor:
    """TAPA logits: q [B, H, c, D], k [B, H, Tk, D], distance [c, Tk] (m - n, any sign)
    -> [B, H, c, Tk]."""
    phase_dims = q.shape[-1] - amplitude
    amp = (q[..., :amplitude] @ k[..., :amplitude].transpose(-1, -2)) / math.sqrt(amplitude)
    phase = (q[..., amplitude:] @ k[..., amplitude:].transpose(-1, -2)) / math.sqrt(phase_dims)
    growth = distance.abs().to(q.dtype).pow(alpha)  # [c, Tk]; |0|^alpha = 0
    return amp * torch.cos(2 * math.pi * growth * phase)


class TAPAScore(nn.Module):
    """The TAPA score of one layer; holds only ``amplitude`` (dims) and ``alpha``."""

    def __init__(self, config: TAPAConfig, *, head_dim: int):
        super().__init__()
        self.amplitude = amplitude_dims(head_dim, config.theta)
        self.alpha = config.alpha

    def scores(
        self,
        q: Tensor,
        k: Tensor,
        q_positions: Tensor,
        k_positions: Tensor,
        visible: Tensor,
        heads: slice = slice(None),
    ) -> Tensor:
        """q [B, H, c, D], k [B, H, Tk, D] -> logits [B, H, c, Tk] (``visible`` and ``heads``
        unused: the score of a pair depends on nothing else, and TAPA has no parameters)."""
        distance = q_positions[:, None] - k_positions[None, :]  # [c, Tk]
        return tapa_logits(q, k, distance, amplitude=self.amplitude, alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"amplitude_dims={self.amplitude}, alpha={self.alpha}"
