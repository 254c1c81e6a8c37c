"""Cross-entropy that never materialises [T, V] logits, exact under sequence parallelism.

The language-model head turns hidden states [N, d] into logits [N, V]; at long context that
tensor dominates memory (64k tokens x 32k vocab x 4 bytes = 8 GiB, plus its gradient). The
tiled loss computes logits, log-sum-exp and the target logit for ``chunk_size`` tokens at a
time and keeps only the per-token NLL; the backward recomputes each chunk's logits and turns them
into ``dhidden`` and ``dweight`` on the spot. Peak memory is O(chunk_size x V).

Labels are pre-shifted by the data pipeline (``labels[t]`` is the token after ``input_ids[t]``,
-100 = no loss), so every sequence-parallel shard scores its own tokens without a halo.

Loss under sequence parallelism (SPECS 1.6): the loss of a sequence is the sum of its token
NLLs over the number of scored tokens in the WHOLE sequence, counted with an all-reduce over the
SP group. ``tiled_cross_entropy(..., group=sp_group)`` returns this rank's share
``local_sum / global_count``; the shares of an SP group add up to the true loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

IGNORE_INDEX = -100


def _accum_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_nll(hidden: Tensor, weight: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of one chunk and the NLL of each scored token, in at least float32.

    hidden [n, d], weight [V, d], labels [n] -> logits [n, V], nll [n] (0 where the label is
    ignored); bf16 inputs are accumulated in float32, float64 inputs stay float64.
    """
    logits = (hidden @ weight.t()).to(_accum_dtype(hidden))  # [n, V]
    scored = labels != IGNORE_INDEX
    target = logits.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)  # [n]
    nll = (torch.logsumexp(logits, dim=1) - target) * scored
    return logits, nll


class _TiledNLLSum(torch.autograd.Function):
    """Sum of token NLLs over [N] tokens, computed and differentiated chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
        total = torch.zeros((), dtype=_accum_dtype(hidden), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            _, nll = _chunk_nll(hidden[sl], weight, labels[sl])
            total += nll.sum()
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros_like(weight, dtype=_accum_dtype(weight))
            if ctx.needs_input_grad[1]
            else None
        )
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h, y = hidden[sl], labels[sl]
            logits, _ = _chunk_nll(h, weight, y)
            # d(lse - target)/dlogits = softmax - onehot(target), zero for ignored tokens.
            dlogits = torch.softmax(logits, dim=1)
            rows = (y != IGNORE_INDEX).nonzero().squeeze(1)
            dlogits[rows, y[rows]] -= 1.0
            dlogits *= (y != IGNORE_INDEX).unsqueeze(1) * grad_total  # [n, V]
            if grad_hidden is not None:
                grad_hidden[sl] = (dlogits @ weight.to(dlogits.dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += dlogits.t() @ h.to(dlogits.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


@torch.no_grad()
def tiled_token_nll(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 4096
) -> Tensor:
    """NLL of every token of ``hidden @ weight.T`` against pre-shifted ``labels``, no gradient.

    hidden [N, d], weight [V, d], labels [N] (-100 = not scored) -> nll [N] in at least float32,
    0 where the label is ignored. The logits exist ``chunk_size`` tokens at a time (the same
    chunks as ``tiled_cross_entropy``), so evaluation at long context keeps per-token losses
    without ever holding [N, V].
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    nll = torch.empty(hidden.shape[0], dtype=_accum_dtype(hidden), device=hidden.device)  # [N]
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        nll[sl] = _chunk_nll(hidden[sl], weight, labels[sl])[1]
    return nll


def scored_token_count(labels: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Number of labels that are not ignored, summed over ``group`` when given (float scalar)."""
    count = (labels != IGNORE_INDEX).sum().to(torch.float64)
    if group is not None:
        dist.all_reduce(count, group=group)
    return count


def tiled_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 4096,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Token-mean cross-entropy of ``hidden @ weight.T`` against pre-shifted ``labels``.

    hidden [B, T, d] (or [N, d]), weight [V, d] (the LM head), labels [B, T] with -100 for
    tokens without loss. Returns a scalar (float32; float64 for float64 inputs): the sum of this rank's token NLLs divided
    by the number of scored tokens over ``group`` (the sequence-parallel group; None = this
    rank alone). With no scored token at all the loss is 0 (and so are the gradients).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, d]
    flat_labels = labels.reshape(-1)  # [N]
    nll_sum = _TiledNLLSum.apply(flat_hidden, weight, flat_labels, chunk_size)
    return nll_sum / scored_token_count(flat_labels, group).clamp_min(1.0).to(nll_sum.dtype)


def world_mean_scale(group: dist.ProcessGroup | None) -> int:
    """Factor on each rank's loss so that averaging gradients over the whole world is exact.

    DeepSpeed averages gradients over all dp x sp ranks; an SP group's shares add up to its
    sequence loss, so each share is multiplied by the SP degree before that average.
    """
    return 1 if group is None else dist.get_world_size(group)
