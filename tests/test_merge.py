"""merge_partials (SPECS.md 1.1): two key halves merge into attention over all keys, exactly,
and rows without visible keys on either side stay NaN-free."""

from __future__ import annotations

import pytest
import torch

from longctx.attention import MaskSpec, block_attention, merge_partials

# fp32 merge of fp32 partials: a few ulps of O(1) values (rtol/atol 1e-5).
TOL = {"rtol": 1e-5, "atol": 1e-5}


def inputs(seed: int = 0, tq: int = 64, tk: int = 96):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, tq, 32, generator=gen)
    k = torch.randn(2, 2, tk, 32, generator=gen)
    v = torch.randn(2, 2, tk, 32, generator=gen)
    return q, k, v


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu_flash"])
def test_two_key_halves_merge_to_attention_over_all_keys(backend):
    """A query shard at positions 32..95 against keys 0..95, split at key 48: each half's
    partial result merged equals the float64 attention over all keys, in out and lse."""
    q, k, v = inputs()
    q_pos, k_pos = torch.arange(32, 96), torch.arange(96)
    halves = (slice(0, 48), slice(48, 96))
    parts = [
        block_attention(
            q,
            k[:, :, h],
            v[:, :, h],
            mask=MaskSpec(q_positions=q_pos, k_positions=k_pos[h]),
            backend=backend,
            chunk_size=16,
        )  # fmt: skip
        for h in halves
    ]
    out, lse = merge_partials(*parts[0], *parts[1])
    ref_out, ref_lse = block_attention(
        q.double(), k.double(), v.double(), mask=MaskSpec(q_positions=q_pos), backend="reference"
    )
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out.float(), **TOL)
    torch.testing.assert_close(lse, ref_lse.float(), **TOL)


def test_merge_is_the_logaddexp_formula():
    """Against the textbook form lse = logaddexp(a, b), out = sum_i exp(lse_i - lse) out_i,
    in float64 on random partials with very different magnitudes."""
    gen = torch.Generator().manual_seed(3)
    out_a, out_b = torch.randn(2, 1, 3, 5, 8, generator=gen, dtype=torch.float64)
    lse_a = 30 * torch.randn(1, 3, 5, generator=gen, dtype=torch.float64)
    lse_b = 30 * torch.randn(1, 3, 5, generator=gen, dtype=torch.float64)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    expected_lse = torch.logaddexp(lse_a, lse_b)
    expected_out = (lse_a - expected_lse).exp()[..., None] * out_a + (lse_b - expected_lse).exp()[
        ..., None
    ] * out_b
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)


def test_rows_empty_on_one_or_both_sides_stay_finite():
    """Row 0: only A has keys -> A unchanged. Row 1: only B -> B unchanged. Row 2: neither ->
    out 0, lse -inf. Gradients through the merge stay finite (no NaN from -inf - -inf)."""
    gen = torch.Generator().manual_seed(5)
    out_a = torch.randn(1, 1, 3, 4, generator=gen)
    out_b = torch.randn(1, 1, 3, 4, generator=gen)
    out_a[0, 0, 1:] = 0.0  # rows without visible keys carry out 0 (SPECS preamble)
    out_b[0, 0, 0] = 0.0
    out_b[0, 0, 2] = 0.0
    inf = float("inf")
    lse_a = torch.tensor([[[0.7, -inf, -inf]]], requires_grad=True)
    lse_b = torch.tensor([[[-inf, -1.3, -inf]]], requires_grad=True)
    out_a.requires_grad_()
    out_b.requires_grad_()
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out[0, 0, 0], out_a[0, 0, 0]) and torch.equal(out[0, 0, 1], out_b[0, 0, 1])
    assert torch.equal(out[0, 0, 2], torch.zeros(4))
    assert torch.equal(lse[0, 0, :2], torch.tensor([0.7, -1.3]))
    assert torch.isneginf(lse[0, 0, 2])
    (out.sum() + lse[0, 0, :2].sum()).backward()
    for tensor in (out_a, out_b, lse_a, lse_b):
        assert torch.isfinite(tensor.grad).all()


def test_bf16_partials_merge_in_float32():
    gen = torch.Generator().manual_seed(2)
    out_a, out_b = torch.randn(2, 1, 2, 6, 8, generator=gen).to(torch.bfloat16)
    lse_a, lse_b = torch.randn(2, 1, 2, 6, generator=gen)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    expected = merge_partials(out_a.float(), lse_a, out_b.float(), lse_b)
    torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
