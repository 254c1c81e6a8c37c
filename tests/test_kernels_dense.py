"""DenseAttention, the model's default attention core, against torch's SDPA with an explicit
mask built from first principles (causal & same document & within the window)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx.attention import AttentionConfig, AttentionContext, DenseAttention
from longctx.model.config import ModelConfig
from longctx.positional.config import PositionalConfig

# fp32 attention vs fp32 SDPA math: rounding of 64-long dot products (rtol/atol 1e-5).
TOL = {"rtol": 1e-5, "atol": 1e-5}


def qkv(length: int = 90, heads: int = 4, kv_heads: int = 2, dim: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, dim, generator=gen)
    k = torch.randn(2, kv_heads, length, dim, generator=gen)
    v = torch.randn(2, kv_heads, length, dim, generator=gen)
    return q, k, v


def sdpa_reference(q, k, v, positions, doc_ids=None, window=None):
    """SDPA over GQA-expanded K,V with a bool mask written out elementwise."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    qp, kp = positions[:, None], positions[None, :]
    allowed = (kp <= qp)[None]  # [1, T, T]
    if window is not None:
        allowed = allowed & (qp - kp < window)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])


def context(length: int, doc_ids=None, seq_positions=None) -> AttentionContext:
    positions = torch.arange(length) if seq_positions is None else seq_positions
    return AttentionContext(
        position_ids=positions.expand(2, length), seq_positions=positions, doc_ids=doc_ids
    )


def _shape(window=None):
    return ModelConfig(sliding_window=window).attention_shape(0)


@pytest.mark.parametrize("backend", ["auto", "chunked", "cpu_flash"])
def test_dense_attention_with_documents_and_window_matches_sdpa(backend):
    q, k, v = qkv()
    docs = torch.tensor([[0] * 40 + [1] * 50, [0] * 15 + [1] * 60 + [2] * 15])
    attention = AttentionConfig(backend=backend, chunk_size=32)
    core = DenseAttention(_shape(window=20), attention, PositionalConfig())
    out = core(q, k, v, context(90, doc_ids=docs))
    expected = sdpa_reference(q, k, v, torch.arange(90), doc_ids=docs, window=20)
    torch.testing.assert_close(out, expected, **TOL)


def test_dense_attention_on_permuted_tokens_follows_global_positions():
    """Tokens given in zigzag order with their global positions attend exactly as in the
    original order: the output is the original output, permuted the same way."""
    q, k, v = qkv(length=96)
    core = DenseAttention(
        _shape(), AttentionConfig(backend="cpu_flash", chunk_size=16), PositionalConfig()
    )
    plain = core(q, k, v, context(96))
    order = torch.cat([torch.arange(0, 24), torch.arange(72, 96), torch.arange(24, 72)])
    shuffled = core(
        q[:, :, order], k[:, :, order], v[:, :, order], context(96, seq_positions=order)
    )
    torch.testing.assert_close(shuffled, plain[:, :, order], **TOL)


def test_dense_attention_is_differentiable_like_sdpa():
    q, k, v = (x.requires_grad_() for x in qkv(length=64))
    core = DenseAttention(_shape(), AttentionConfig(backend="cpu_flash"), PositionalConfig())
    grads = torch.autograd.grad(core(q, k, v, context(64)).square().sum(), (q, k, v))
    q2, k2, v2 = (x.detach().requires_grad_() for x in (q, k, v))
    expected = sdpa_reference(q2, k2, v2, torch.arange(64))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q2, k2, v2))
    for grad, ref in zip(grads, expected_grads):
        torch.testing.assert_close(grad, ref, **TOL)
