"""The log-sum-exp merge of two partial attention results (SPECS.md 1.1).

Attention of one query row over two disjoint key sets A and B combines exactly:
``lse = logaddexp(lse_A, lse_B)`` and ``out = exp(lse_A - lse) out_A + exp(lse_B - lse) out_B``.
This module is the one place that formula lives; blockwise kernels, ring attention and the
branches of sparse variants all call ``merge_partials``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_partials(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Merge two partial results over disjoint key sets into the result over their union.

    ``out_*`` [B, H, T, D], ``lse_*`` [B, H, T]. Computed in float32 (float64 stays float64)
    whatever the input dtype, in the sigmoid form that never subtracts two large exponentials:
    ``out = out_a - sigmoid(lse_b - lse_a) (out_a - out_b)``,
    ``lse = lse_a - logsigmoid(lse_a - lse_b)``.
    A row with ``lse = -inf`` on one side (no visible key there) takes the other side unchanged;
    on both sides it stays out 0, lse -inf. Differentiable, and no NaN reaches the gradients:
    the formula only ever sees finite stand-ins for -inf, and ``where`` selects the exact value.
    Returns ``(out [B, H, T, D], lse [B, H, T])`` in the compute dtype.
    """
    dtype = torch.promote_types(torch.promote_types(out_a.dtype, out_b.dtype), torch.float32)
    out_a, out_b = out_a.to(dtype), out_b.to(dtype)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    empty_a = torch.isneginf(lse_a)  # [B, H, T]
    empty_b = torch.isneginf(lse_b)
    safe_a = torch.where(empty_a, torch.zeros_like(lse_a), lse_a)
    safe_b = torch.where(empty_b, torch.zeros_like(lse_b), lse_b)
    weight_b = torch.sigmoid(safe_b - safe_a)  # share of B in the merged softmax
    weight_b = torch.where(empty_a, torch.ones_like(weight_b), weight_b)
    weight_b = torch.where(empty_b, torch.zeros_like(weight_b), weight_b)
    out = out_a - weight_b.unsqueeze(-1) * (out_a - out_b)
    lse = safe_a - torch.nn.functional.logsigmoid(safe_a - safe_b)
    lse = torch.where(empty_a, lse_b, lse)
    lse = torch.where(empty_b, lse_a, lse)
    return out, lse
