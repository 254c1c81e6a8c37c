"""Cross-entropy that never materialises [T, V] logits, exact under sequence parallelism.

The language-model head turns hidden states [N, d] into logits [N, V]; at long context that
tensor dominates memory (64k tokens x 32k vocab x 4 bytes = 8 GiB, plus its gradient). The
tiled loss computes logits, log-sum-exp and the target logit for ``chunk_size`` tokens at a
time, and while a chunk's logits exist also its share of ``dhidden`` and ``dweight`` (a fused
linear cross-entropy: no logits are recomputed); it keeps the NLL sum and those gradients. Peak
memory is O(chunk_size x V) beyond the gradients themselves.

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


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per loss chunk: the chunk's [n, V] float32 logits stay near 128 MiB (2^25
    elements), and never fewer than 256 tokens (a thinner GEMM loses speed). E.g. 682 tokens
    for SmolLM2's 49152 pieces, 1048 for Llama-2's 32000, 261 for Llama-3's 128256.

    The chunk buffer is alive at the step's peak (the end of the forward pass, when every
    layer's checkpointed activations exist), so it adds to every run's peak memory; halving it
    from 256 MiB kept the loss's fused forward+backward time within 1% on one CPU core
    (SmolLM2's head, 2730 tokens: 3.77-3.80 s at 1365 and 683 tokens per chunk, 3.95 s at 512).
    """
    return max(256, 2**25 // vocab_size)


def _chunk_logits(hidden: Tensor, weight: Tensor, buffer: Tensor | None = None) -> Tensor:
    """hidden [n, d] @ weight [V, d].T -> logits [n, V] in at least float32 (bf16 inputs are
    accumulated in float32, float64 stays float64).

    ``buffer`` ([>= n, V] from ``_logits_buffer``, or None) receives the logits in place, so
    one buffer serves every chunk: a fresh [n, V] tensor costs a page fault per 4 KiB on first
    touch (about 0.1 s of CPU time for SmolLM2's 1365 x 49152 floats), more than one
    elementwise pass over it."""
    if buffer is None:
        return (hidden @ weight.t()).to(_accum_dtype(hidden))
    return torch.mm(hidden, weight.t(), out=buffer[: hidden.shape[0]])


def _logits_buffer(hidden: Tensor, weight: Tensor, chunk_size: int) -> Tensor | None:
    """The one [min(chunk, N), V] logits buffer a tiled pass reuses, or None where the GEMM's
    dtype is not the logits' (bf16 inputs: their logits are cast up chunk by chunk)."""
    acc = _accum_dtype(hidden)
    if hidden.dtype != acc or weight.dtype != acc:
        return None
    rows = min(chunk_size, hidden.shape[0])
    return hidden.new_empty((rows, weight.shape[0]))


def _nll_and_exp_sums(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """NLL [n] of each scored token (0 where the label is ignored) and the row sums [n] of
    exp(logits - rowmax); ``logits`` [n, V] is overwritten IN PLACE by exp(logits - rowmax),
    so that one [n, V] buffer serves the whole chunk: scaled by 1 / row sum it is the
    softmax."""
    scored = labels != IGNORE_INDEX
    target = logits.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)  # [n]
    rowmax = logits.amax(dim=1, keepdim=True)  # [n, 1]
    logits.sub_(rowmax).exp_()
    exp_sums = logits.sum(dim=1)  # [n]
    lse = rowmax.squeeze(1) + exp_sums.log()  # [n]
    return (lse - target) * scored, exp_sums


def _chunk_nll_and_grads(
    h: Tensor,
    weight: Tensor,
    weight_acc: Tensor,
    labels: Tensor,
    buffer: Tensor | None,
    grad_rows: Tensor | None,
    grad_weight: Tensor | None,
) -> Tensor:
    """NLL sum of one chunk h [n, d] against ``weight`` [V, d] (``weight_acc``: it in the
    accumulation dtype), and its gradients: written into ``grad_rows`` [n, d] (this chunk's rows
    of dhidden) and added into ``grad_weight`` [V, d], each when given. The logits go into
    ``buffer`` (``_logits_buffer``) when given.

    A function of its own so that a chunk's fresh [n, V] logits (bf16 inputs, no buffer) are
    freed on return: in a loop body the next chunk's would be allocated while this one is still
    bound, two at once.
    """
    probs = _chunk_logits(h, weight, buffer)  # [n, V], becomes the softmax's numerator
    nll, exp_sums = _nll_and_exp_sums(probs, labels)
    if grad_rows is None and grad_weight is None:
        return nll.sum()
    scored = labels != IGNORE_INDEX
    probs.mul_((scored / exp_sums).unsqueeze(1))  # softmax; ignored tokens: 0
    rows = scored.nonzero().squeeze(1)
    probs[rows, labels[rows]] -= 1.0
    if grad_rows is not None:
        grad_rows.copy_(probs @ weight_acc)  # cast to hidden's dtype
    if grad_weight is not None:
        grad_weight.addmm_(probs.t(), h.to(weight_acc.dtype))
    return nll.sum()


class _TiledNLLSum(torch.autograd.Function):
    """Sum of token NLLs over [N] tokens, computed and differentiated chunk by chunk.

    The gradients are computed in the forward pass, while each chunk's logits exist anyway
    (a fused linear cross-entropy): d nll / d logits = softmax - onehot(target), turned at once
    into this chunk's rows of dhidden [N, d] and a sum into dweight [V, d]. Backward only scales
    them by the incoming scalar. That is three GEMMs per chunk (logits, dhidden, dweight), what
    an untiled loss costs, instead of four for a backward that recomputes the logits; the price
    is holding dhidden and dweight from forward to backward, tensors the backward creates
    anyway. Every chunk's logits live in one reused buffer, and the softmax's normalisation and
    the zeroing of ignored tokens are one pass over it.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = _accum_dtype(hidden)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, d]
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None  # [V, d]
        weight_acc = weight.to(acc)
        buffer = _logits_buffer(hidden, weight, chunk_size)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            rows = None if grad_hidden is None else grad_hidden[sl]
            total += _chunk_nll_and_grads(
                hidden[sl], weight, weight_acc, labels[sl], buffer, rows, grad_weight
            )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        # Scaled in place: the saved buffers are this call's alone and die with it, so no
        # second [N, d] / [V, d] tensor exists (the [V, d] one is 108 MiB for SmolLM2's head);
        # autograd then hands them on without a copy (accumulated into, or stolen as, .grad).
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


@torch.no_grad()
def tiled_token_nll(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int | None = None
) -> Tensor:
    """NLL of every token of ``hidden @ weight.T`` against pre-shifted ``labels``, no gradient.

    hidden [N, d], weight [V, d], labels [N] (-100 = not scored) -> nll [N] in at least float32,
    0 where the label is ignored. The logits exist ``chunk_size`` tokens at a time (the same
    chunks as ``tiled_cross_entropy``), so evaluation at long context keeps per-token losses
    without ever holding [N, V]. ``chunk_size`` None: ``default_chunk_size(V)``.
    """
    chunk_size = _checked_chunk_size(chunk_size, weight)
    nll = torch.empty(hidden.shape[0], dtype=_accum_dtype(hidden), device=hidden.device)  # [N]
    buffer = _logits_buffer(hidden, weight, chunk_size)
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        logits = _chunk_logits(hidden[sl], weight, buffer)
        nll[sl] = _nll_and_exp_sums(logits, labels[sl])[0]
    return nll


def _checked_chunk_size(chunk_size: int | None, weight: Tensor) -> int:
    if chunk_size is None:
        return default_chunk_size(weight.shape[0])
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return chunk_size


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
    chunk_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Token-mean cross-entropy of ``hidden @ weight.T`` against pre-shifted ``labels``.

    hidden [B, T, d] (or [N, d]), weight [V, d] (the LM head), labels [B, T] with -100 for
    tokens without loss. Returns a scalar (float32; float64 for float64 inputs): the sum of this rank's token NLLs divided
    by the number of scored tokens over ``group`` (the sequence-parallel group; None = this
    rank alone). With no scored token at all the loss is 0 (and so are the gradients).
    ``chunk_size``: tokens per chunk (None: ``default_chunk_size(V)``).
    """
    chunk_size = _checked_chunk_size(chunk_size, weight)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, d]
    flat_labels = labels.reshape(-1)  # [N]
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        nll_sum = _TiledNLLSum.apply(flat_hidden, weight, flat_labels, chunk_size)
    else:  # evaluation: no gradients to compute in the forward pass
        nll_sum = tiled_token_nll(flat_hidden, weight, flat_labels, chunk_size).sum()
    return nll_sum / scored_token_count(flat_labels, group).clamp_min(1.0).to(nll_sum.dtype)


def world_mean_scale(group: dist.ProcessGroup | None) -> int:
    """Factor on each rank's loss so that averaging gradients over the whole world is exact.

    DeepSpeed averages gradients over all dp x sp ranks; an SP group's shares add up to its
    sequence loss, so each share is multiplied by the SP degree before that average.
    """
    return 1 if group is None else dist.get_world_size(group)
