"""Tiled cross-entropy (SPECS 1.6): equals full cross-entropy, and is exact under SP."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_on_ranks

from longctx.parallel.layout import zigzag_shard
from longctx.parallel.loss import tiled_cross_entropy, world_mean_scale


def _inputs(seed=0, batch=2, seq=37, dim=16, vocab=53, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=gen, dtype=dtype) / dim**0.5
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < 0.2] = -100
    return hidden, weight, labels


def _full_loss(hidden, weight, labels):
    logits = hidden @ weight.t()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_value_and_gradients_equal_full_cross_entropy(chunk_size):
    hidden, weight, labels = _inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = tiled_cross_entropy(h1, w1, labels, chunk_size=chunk_size)
    ref = _full_loss(h2, w2, labels)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-7)


def test_fp32_matches_float64_reference():
    hidden, weight, labels = _inputs(seed=1, seq=64, vocab=300)
    ours = tiled_cross_entropy(hidden.float(), weight.float(), labels, chunk_size=16)
    torch.testing.assert_close(
        ours.double(), _full_loss(hidden, weight, labels), rtol=1e-5, atol=1e-6
    )


def test_all_ignored_gives_zero_loss_and_gradient():
    hidden, weight, _ = _inputs()
    hidden.requires_grad_()
    labels = torch.full(hidden.shape[:2], -100)
    loss = tiled_cross_entropy(hidden, weight, labels, chunk_size=8)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0


def _sharded_loss_grads(rank, world, hidden, weight, labels):
    """Each rank scores its zigzag shard; gradients averaged over the world as DeepSpeed does."""
    group = dist.group.WORLD
    h = zigzag_shard(hidden, 1, rank, world).clone().requires_grad_()
    w = weight.clone().requires_grad_()
    share = tiled_cross_entropy(
        h, w, zigzag_shard(labels, 1, rank, world), chunk_size=5, group=group
    )
    (share * world_mean_scale(group)).backward()
    total = share.detach().clone()
    dist.all_reduce(total)
    dist.all_reduce(w.grad)
    w.grad /= world
    # Activation gradients carry the factor; parameters see it cancelled by the world mean.
    return total, h.grad / world, w.grad


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_loss_and_grads_equal_single_process(world):
    hidden, weight, labels = _inputs(seed=2, seq=8 * world)
    results = run_on_ranks(_sharded_loss_grads, world, hidden, weight, labels)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = _full_loss(h, w, labels)
    ref.backward()
    for rank, (total, h_grad, w_grad) in enumerate(results):
        torch.testing.assert_close(total, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            h_grad, zigzag_shard(h.grad, 1, rank, world), rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(w_grad, w.grad, rtol=1e-10, atol=1e-12)
