"""The thread-balanced CPU flash backward (attention/cpu_flash_backward.py).

Reference: ``block_attention``'s float64 ``reference`` backend differentiated by autograd, at
T = 1024 with 9 query / 3 kv heads on 2 threads, shapes where the remainder item is cut into
pieces. Tolerance as tests/test_kernels.py: fp32, rtol = atol = 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from longctx.attention import MaskSpec, block_attention
from longctx.attention.cpu_flash_backward import (
    balanced_flash_backward,
    fused_backward,
    splits_remainder,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _inputs(batch: int, q_heads: int, kv_heads: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # Queries in the [B, T, H, D] layout projections leave them in (a transposed view).
    q = torch.randn(batch, length, q_heads, 64, generator=gen).transpose(1, 2)
    k, v = (torch.randn(batch, kv_heads, length, 64, generator=gen) for _ in range(2))
    dout = torch.randn(batch, q_heads, length, 64, generator=gen)
    return q, k, v, dout


def _grads(backend: str, q, k, v, dout, causal: bool):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    mask = MaskSpec(causal=causal)
    out, _ = block_attention(q, k, v, mask=mask, backend=backend)
    return torch.autograd.grad((out * dout).sum(), (q, k, v))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "no_mask"])
@pytest.mark.parametrize("batch,q_heads,kv_heads", [(1, 9, 3), (1, 3, 3), (3, 2, 1)])
def test_gradients_match_the_float64_reference(two_threads, causal, batch, q_heads, kv_heads):
    length = 1024
    assert splits_remainder(batch * kv_heads, 2, causal, length, length)
    q, k, v, dout = _inputs(batch, q_heads, kv_heads, length)
    got = _grads("cpu_flash", q, k, v, dout, causal)
    want = _grads("reference", *(x.double() for x in (q, k, v, dout)), causal)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, **TOL, msg=f"d{name}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "no_mask"])
def test_balanced_equals_one_fused_call(two_threads, causal):
    """Same gradients as the op called once, up to fp32 summation order."""
    q, k, v, dout = _inputs(1, 9, 3, 1024, seed=1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=0.125
    )[:2]
    whole = fused_backward(dout, q, k, v, out, lse, causal, 0.125)
    split = balanced_flash_backward(dout, q, k, v, out, lse, causal, 0.125)
    for name, a, b in zip("qkv", whole, split):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=f"d{name}")


@pytest.mark.parametrize(
    "items,threads,causal,expected",
    [
        (3, 2, True, True),  # 1 left over: 2 rounds of 1/4 instead of 1 round of 1
        (9, 2, False, True),
        (8, 2, True, False),  # divides evenly: nothing to balance
        (1, 1, True, False),
        (9, 4, True, True),  # 1 left over on 4 threads: 2 * ceil(2/4) / 4 = 1/2
        (3, 4, True, False),  # 3 left over: 2 * ceil(6/4) / 4 = 1, no gain
        (3, 4, False, True),  # ceil(12/4) / 4 = 3/4
    ],
)
def test_the_split_is_taken_only_when_it_shortens_the_wall_time(items, threads, causal, expected):
    assert splits_remainder(items, threads, causal, 4096, 4096) is expected


def test_short_or_non_square_causal_problems_stay_whole():
    assert not splits_remainder(3, 2, True, 512, 512)  # pieces of 128 rows < MIN_PIECE_ROWS
    assert not splits_remainder(3, 2, True, 1026, 1026)  # not a multiple of 4 rows
    assert not splits_remainder(3, 2, True, 1024, 2048)  # causal but not square
    assert splits_remainder(3, 2, False, 1024, 2048)
