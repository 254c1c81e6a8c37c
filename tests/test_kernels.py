"""Every CPU backend of ``block_attention`` against the float64 reference (SPECS.md 1.1, 1.2).

Reference: the ``reference`` backend run on float64 copies of the inputs, differentiated by
torch.autograd. Tolerance: fp32 kernels of exact algorithms, rtol = atol = 1e-5 (observed
errors are a few 1e-7 in out/lse and up to ~3e-6 in gradients of O(1) size, from fp32 rounding
of D-long dot products and tile merges). ``chunk_size=32`` on T ~ 100 makes the tiled paths
cut, skip and merge tiles, including ragged last tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from longctx.attention import (
    BlockSparsePattern,
    MaskSpec,
    block_attention,
    block_attention_backward,
)
from longctx.attention.kernels import resolve_backend
from longctx.errors import LongctxError

TOL = {"rtol": 1e-5, "atol": 1e-5}
CHUNK = 32


def power_pattern(block: int, window: int, sinks: int) -> BlockSparsePattern:
    """PowerAttention's static pattern (SPECS.md 3.3) on blocks: window, powers of two, sinks."""

    def rule(qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        delta = qb - kb
        return (delta < window) | ((delta & (delta - 1)) == 0) | (kb < sinks)

    return BlockSparsePattern(block_size=block, rule=rule)


@dataclass(frozen=True)
class Case:
    name: str
    tq: int = 100
    tk: int = 100
    hq: int = 4
    hkv: int = 4
    dim: int = 64
    mask_args: dict = field(default_factory=dict)


ZIGZAG_Q = torch.cat([torch.arange(0, 40), torch.arange(120, 160)])  # rank 0 of P=2, T=160
ZIGZAG_K = torch.cat([torch.arange(40, 80), torch.arange(80, 120)])  # rank 1's keys
DOCS = torch.tensor([[0] * 30 + [1] * 45 + [2] * 25, [0] * 70 + [3] * 30])  # [2, 100]

CASES = [
    Case("causal"),
    Case("offset_shard", tq=64, tk=128, mask_args={"q_positions": torch.arange(64, 128)}),
    Case("zigzag", tq=80, tk=80, mask_args={"q_positions": ZIGZAG_Q, "k_positions": ZIGZAG_K}),
    Case("doc_ids", mask_args={"q_doc_ids": DOCS, "k_doc_ids": DOCS}),
    Case("sliding_window", mask_args={"window": 24}),
    Case("gqa", hq=8, hkv=2),
    Case("head_dim_80", dim=80),
    Case(
        "fully_masked_rows",
        tq=64,
        tk=64,
        mask_args={"q_positions": torch.arange(0, 64), "k_positions": torch.arange(40, 104)},
    ),
    Case("block_sparse", tq=128, tk=128, mask_args={"block_sparse": power_pattern(8, 2, 1)}),
    Case("non_causal", mask_args={"causal": False}),
]


def make_inputs(case: Case, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, case.hq, case.tq, case.dim, generator=gen, dtype=dtype)
    k = torch.randn(2, case.hkv, case.tk, case.dim, generator=gen, dtype=dtype)
    v = torch.randn(2, case.hkv, case.tk, case.dim, generator=gen, dtype=dtype)
    dout = torch.randn(2, case.hq, case.tq, case.dim, generator=gen, dtype=dtype)
    return q, k, v, dout


def attention_and_grads(backend, q, k, v, dout, mask, lse_weight=None):
    """out, lse and d(loss)/d(q, k, v) for loss = <out, dout> (+ <finite lse, lse_weight>)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = block_attention(q, k, v, mask=mask, backend=backend, chunk_size=CHUNK)
    loss = (out * dout).sum()
    if lse_weight is not None:
        loss = loss + (torch.where(torch.isneginf(lse), 0.0, lse) * lse_weight).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return out, lse, grads


def reference_result(q, k, v, dout, mask, lse_weight=None):
    q, k, v, dout = (x.double() for x in (q, k, v, dout))
    weight = None if lse_weight is None else lse_weight.double()
    return attention_and_grads("reference", q, k, v, dout, mask, weight)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ["chunked", "cpu_flash"])
def test_tiled_backends_match_reference_values_and_grads(backend, case):
    q, k, v, dout = make_inputs(case)
    mask = MaskSpec(**case.mask_args)
    out, lse, grads = attention_and_grads(backend, q, k, v, dout, mask)
    ref_out, ref_lse, ref_grads = reference_result(q, k, v, dout, mask)
    torch.testing.assert_close(out, ref_out.float(), **TOL)
    torch.testing.assert_close(lse, ref_lse.float(), **TOL)  # -inf rows must match as -inf
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad.float(), **TOL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_flex_forward_matches_reference(case):
    q, k, v, _ = make_inputs(case)
    mask = MaskSpec(**case.mask_args)
    out, lse = block_attention(q, k, v, mask=mask, backend="flex")
    ref_out, ref_lse = block_attention(
        q.double(), k.double(), v.double(), mask=mask, backend="reference"
    )
    torch.testing.assert_close(out, ref_out.float(), **TOL)
    torch.testing.assert_close(lse, ref_lse.float(), **TOL)


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu_flash"])
def test_gradient_through_lse_matches_reference(backend):
    """Merging branches differentiates through lse; the fused op's backward cannot, so the
    kernel must still give d lse / d s = softmax (cpu_flash routes this to plain-torch tiles)."""
    case = CASES[3]  # doc ids: tiled, several pieces per query tile
    q, k, v, dout = make_inputs(case)
    lse_weight = torch.randn(2, case.hq, case.tq, generator=torch.Generator().manual_seed(7))
    mask = MaskSpec(**case.mask_args)
    _, _, grads = attention_and_grads(backend, q, k, v, dout, mask, lse_weight)
    _, _, ref_grads = reference_result(q, k, v, dout, mask, lse_weight)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad.to(grad.dtype), **TOL)


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu_flash", "flex"])
def test_rows_without_visible_keys_give_zero_out_and_neg_inf_lse(backend):
    """Queries 0..39 sit before every key (keys at 40..103): no visible key, so exactly out 0,
    lse -inf, and (where differentiable) finite gradients, zero for those query rows."""
    case = CASES[7]
    q, k, v, dout = make_inputs(case)
    mask = MaskSpec(**case.mask_args)
    if backend == "flex":
        out, lse = block_attention(q, k, v, mask=mask, backend=backend)
        grads = None
    else:
        out, lse, grads = attention_and_grads(backend, q, k, v, dout, mask)
    assert torch.equal(out[:, :, :40], torch.zeros_like(out[:, :, :40]))
    assert torch.isneginf(lse[:, :, :40]).all()
    assert torch.isfinite(lse[:, :, 40:]).all()
    if grads is not None:
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.equal(grads[0][:, :, :40], torch.zeros_like(grads[0][:, :, :40]))


@pytest.mark.parametrize(
    ("backend", "lse_tol"),
    # chunked/reference accumulate exact bf16 products in fp32 (lse to fp32 rounding); the
    # fused CPU op rounds the scaled queries to bf16 first, which moves lse by up to ~1e-4.
    [("reference", 1e-5), ("chunked", 1e-5), ("cpu_flash", 1e-3)],
)
def test_bf16_inputs_accumulate_in_fp32(backend, lse_tol):
    """bf16 in, bf16 out, float32 lse; values match float64 attention of the same bf16 numbers
    to bf16 output rounding (2^-8 relative; tolerance 1e-2 on O(1) values)."""
    case = CASES[3]
    q, k, v, dout = make_inputs(case, dtype=torch.bfloat16)
    mask = MaskSpec(**case.mask_args)
    out, lse, grads = attention_and_grads(backend, q, k, v, dout, mask)
    ref_out, ref_lse, ref_grads = reference_result(q, k, v, dout, mask)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=lse_tol, atol=lse_tol)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=2e-2)


def test_chunked_never_materialises_the_full_score_matrix():
    """Memory O(T * chunk): no op in forward or backward sees a [.., T, T]-sized operand."""
    length, chunk = 512, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, length, 32, generator=gen, requires_grad=True) for _ in range(3))
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        out, _ = block_attention(q, k, v, backend="chunked", chunk_size=chunk)
        out.sum().backward()
    largest = max(
        (
            torch.Size(shape).numel()
            for event in prof.events()
            for shape in event.input_shapes
            if shape
        ),
        default=0,
    )
    assert largest <= 2 * length * chunk * 2  # [B, H, T, D]-sized tensors are the largest


def test_auto_backend_is_cpu_flash_on_cpu():
    assert resolve_backend("auto", torch.zeros(1, 1, 1, 8)) == "cpu_flash"


def test_unknown_backend_is_refused_with_the_choices():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(LongctxError, match="unknown attention backend 'fast'.*cpu_flash"):
        block_attention(q, q, q, backend="fast")


def test_flash_backend_on_cpu_is_refused():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(LongctxError, match="'flash' needs CUDA tensors"):
        block_attention(q, q, q, backend="flash")


def test_flex_refuses_gradients_on_cpu_but_runs_without():
    q = torch.randn(1, 1, 16, 8, requires_grad=True)
    with pytest.raises(LongctxError, match="'flex' cannot compute gradients on CPU"):
        block_attention(q, q, q, backend="flex")
    with torch.no_grad():
        out, lse = block_attention(q, q, q, backend="flex")
    assert out.shape == (1, 1, 16, 8) and lse.shape == (1, 1, 16)


def test_query_heads_must_be_a_multiple_of_kv_heads():
    q, k = torch.randn(1, 6, 4, 8), torch.randn(1, 4, 4, 8)
    with pytest.raises(LongctxError, match="query heads 6 are not a multiple of kv heads 4"):
        block_attention(q, k, k)


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu_flash", "flex"])
def test_block_backward_over_two_key_blocks_sums_to_the_full_gradient(backend):
    """Ring attention's backward (SPECS 1.1/1.4): each K,V block's gradient from the FINAL out and
    lse; dq summed over the blocks and dk, dv per block equal autograd of the full attention.
    Queries are rank 0's zigzag shard; the key blocks are rank 0's and rank 1's shards."""
    case = Case("zigzag_gqa", tq=80, tk=160, hq=4, hkv=2)
    q, k, v, dout = make_inputs(case)
    key_positions = torch.cat([ZIGZAG_Q, ZIGZAG_K])  # [160]: block 0 = keys 0..79
    full_mask = MaskSpec(q_positions=ZIGZAG_Q, k_positions=key_positions)
    ref_out, ref_lse, (ref_dq, ref_dk, ref_dv) = reference_result(q, k, v, dout, full_mask)
    forward_backend = "chunked" if backend == "flex" else backend  # flex has no CPU autograd
    with torch.no_grad():
        out, lse = block_attention(
            q, k, v, mask=full_mask, backend=forward_backend, chunk_size=CHUNK
        )
    dq = torch.zeros_like(q)
    dk_blocks, dv_blocks = [], []
    for block in (slice(0, 80), slice(80, 160)):
        block_mask = MaskSpec(q_positions=ZIGZAG_Q, k_positions=key_positions[block])
        dq_b, dk_b, dv_b = block_attention_backward(
            dout, q, k[:, :, block], v[:, :, block], out, lse,
            mask=block_mask, backend=backend, chunk_size=CHUNK,
        )  # fmt: skip
        dq += dq_b
        dk_blocks.append(dk_b)
        dv_blocks.append(dv_b)
    torch.testing.assert_close(dq, ref_dq.float(), **TOL)
    torch.testing.assert_close(torch.cat(dk_blocks, dim=2), ref_dk.float(), **TOL)
    torch.testing.assert_close(torch.cat(dv_blocks, dim=2), ref_dv.float(), **TOL)


def test_doc_ids_of_another_batch_size_are_refused():
    q = torch.randn(2, 1, 4, 8)
    docs = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(LongctxError, match="doc ids have batch 3 but q has batch 2"):
        block_attention(q, q, q, mask=MaskSpec(q_doc_ids=docs, k_doc_ids=docs))
