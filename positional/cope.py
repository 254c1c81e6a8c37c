"""CoPE: contextual position encoding (Golovneva et al.; SPECS.md 2.2).

Positions are counted by the content instead of by tokens: query i gates every visible key j
with ``g_ij = sigmoid(s_ij)`` (s: the scaled attention logits), and the position of key j seen
from query i is ``p_ij = sum_{t=j..i} g_it``, a reverse cumulative sum along the keys, clamped to
``npos_max - 1``. A learnable table ``e`` [D, npos_max] (per layer; shared by the heads or one
per head) turns the fractional position into a logit term ``q_i . e[p_ij]``, interpolated
linearly between ``floor(p)`` and ``ceil(p)``; it is added to the logits before the softmax.

Because ``p`` needs the whole row of gates, ``CoPEScore`` runs in ``scored_attention``'s
query-chunked kernel (all keys of a chunk's rows), not in a flash kernel.

Sequence parallelism: the row stays whole. Ulysses gives each rank the full sequence of some
heads; ring gathers every key of the ring group to each rank's queries (key gather,
``attention/scored.py``), in global order or with their global positions, so the gate sum over
the keys between j and i is computed exactly as on one device. This replaces SPECS 2.2's
two-pass cross-rank scan (per-block gate sums on a first ring pass, an exclusive scan for the
block offsets, attention on a second pass): same result, one collective instead of two ring
passes and no per-block bookkeeping of the clamp, for K/V replicated at T x Hkv x D per rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from longctx.positional.config import CoPEConfig


def cope_positions(gates: Tensor, npos_max: int, key_order: Tensor | None = None) -> Tensor:
    """Contextual positions ``p_ij = min(sum_{t >= j} g_it, npos_max - 1)``.

    gates [..., Tk] with 0 on every key a query does not see (in particular keys after it,
    so the sum over t >= j is the sum over t = j..i) -> positions [..., Tk], same dtype.
    ``key_order`` [Tk]: the key indices sorted by sequence position when the keys are not in
    sequence order (Ulysses gathers zigzag shards); None when they are.
    """
    if key_order is not None:
        gates = gates.index_select(-1, key_order)
    reverse_cumsum = gates.flip(-1).cumsum(-1).flip(-1)  # [..., Tk] in sequence order
    positions = reverse_cumsum.clamp(max=npos_max - 1)
    if key_order is None:
        return positions
    return positions.index_select(-1, torch.argsort(key_order))  # back to the keys' order


def sequence_order(k_positions: Tensor) -> Tensor | None:
    """Indices sorting ``k_positions`` [Tk], or None when they are already ascending."""
    if bool((k_positions[1:] >= k_positions[:-1]).all()):
        return None
    return torch.argsort(k_positions, stable=True)


def interpolate_position_logits(position_logits: Tensor, positions: Tensor) -> Tensor:
    """``q . e[p]`` at fractional ``p``, linear between the two nearest integer positions.

    position_logits [B, H, c, npos] (``q . e[n]`` for every integer n), positions [B, H, c, Tk]
    -> [B, H, c, Tk]. Gradients reach both the table values and ``p`` (through the weight).
    """
    lower = positions.floor()
    weight_upper = positions - lower  # [B, H, c, Tk] in [0, 1)
    lower_index = lower.long()
    upper_index = positions.ceil().long()
    at_lower = position_logits.gather(-1, lower_index)
    at_upper = position_logits.gather(-1, upper_index)
    return at_lower * (1 - weight_upper) + at_upper * weight_upper


class CoPEScore(nn.Module):
    """Logits ``s_ij + q_i . e[p_ij]`` of one layer (see module docstring).

    ``pos_emb`` [1 or H, D, npos_max], zeros at initialisation (SPECS 2.2): a fresh CoPE layer
    starts as position-free attention and learns its positions.
    """

    def __init__(self, config: CoPEConfig, *, num_heads: int, head_dim: int):
        super().__init__()
        self.npos_max = config.npos_max
        self.scale = 1.0 / math.sqrt(head_dim)
        tables = 1 if config.shared_heads else num_heads
        self.pos_emb = nn.Parameter(torch.zeros(tables, head_dim, config.npos_max))

    @torch.no_grad()
    def init_new_parameters(self) -> None:
        """SPECS 2.2 initialisation (zeros); the HF loader calls it for tensors a RoPE
        checkpoint does not have."""
        self.pos_emb.zero_()

    def scores(
        self,
        q: Tensor,
        k: Tensor,
        q_positions: Tensor,
        k_positions: Tensor,
        visible: Tensor,
        heads: slice = slice(None),
    ) -> Tensor:
        """q [B, H, c, D], k [B, H, Tk, D], visible [Bm, c, Tk] -> logits [B, H, c, Tk]."""
        logits = (q @ k.transpose(-1, -2)) * self.scale  # [B, H, c, Tk]
        gates = torch.sigmoid(logits) * visible[:, None]  # masked keys: gate 0
        positions = cope_positions(gates, self.npos_max, sequence_order(k_positions))
        table = self.pos_emb if self.pos_emb.shape[0] == 1 else self.pos_emb[heads]
        position_logits = q @ table.to(q.dtype)  # [B, H, c, npos]
        return logits + interpolate_position_logits(position_logits, positions)

    def extra_repr(self) -> str:
        tables, dim, npos = self.pos_emb.shape
        return f"npos_max={npos}, tables={tables}, head_dim={dim}"
