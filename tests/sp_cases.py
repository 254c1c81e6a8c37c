"""Shared cases and the float64 dense reference for the sequence-parallel attention tests.

Every sequence-parallel path (ring, Ulysses, Ulysses x ring) must reproduce dense attention on
the full sequence: the same out, lse and dq, dk, dv. ``dense_reference`` computes those in
float64 from the visibility rules written out here (not through the library's kernels), so it
is an independent check. Cases cover plain causal attention, packed documents, GQA (and MQA),
a sliding window, a block-sparse pattern, head dim 80, a length that needs padding, and
bidirectional (non-causal) attention within documents.

Helpers for the rank functions: ``padded_case`` extends a case's tensors to a length the
layout can split (random padding, zero output gradient on padded rows: in a model those rows
carry no loss, so nothing flows back from them), and ``assemble`` puts the ranks' shards back
in global order from the positions each rank reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.mask import BlockSparsePattern
from longctx.parallel.layout import padded_length

# fp32 kernels against a float64 reference: outputs and grads are O(1) sums of a few hundred
# fp32 products, so 1e-5 relative (the project's bar for exact fp32 algorithms) with a small
# absolute floor for entries near zero.
RTOL, ATOL = 1e-5, 2e-6


@dataclass(frozen=True)
class AttentionCase:
    """One attention problem: shapes and which mask rules are on."""

    name: str
    seq_len: int = 64
    batch: int = 2
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 16
    window: int | None = None
    documents: bool = False
    block_sparse: bool = False
    causal: bool = True


CASES = {
    case.name: case
    for case in [
        AttentionCase("causal"),
        AttentionCase("documents", documents=True),
        AttentionCase("gqa", kv_heads=2),
        AttentionCase("mqa", kv_heads=1),
        AttentionCase("sliding_window", window=11),
        AttentionCase("head_dim_80", head_dim=80, seq_len=48),
        AttentionCase("needs_padding", seq_len=50, documents=True),
        AttentionCase("block_sparse", block_sparse=True),
        AttentionCase("bidirectional_documents", documents=True, causal=False),
    ]
}


def local_and_strided(qb: Tensor, kb: Tensor) -> Tensor:
    """Block-sparse rule of the tests: the previous block, and every fourth block."""
    return (qb - kb <= 1) | (kb % 4 == 0)


def sparse_pattern(case: AttentionCase) -> BlockSparsePattern | None:
    return BlockSparsePattern(block_size=8, rule=local_and_strided) if case.block_sparse else None


def random_doc_ids(batch: int, seq_len: int, gen: torch.Generator) -> Tensor:
    """[B, T] non-decreasing document ids with 2-4 random boundaries per row."""
    rows = []
    for _ in range(batch):
        cuts = torch.randint(
            1, seq_len, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen
        )
        boundary = torch.zeros(seq_len, dtype=torch.long)
        boundary[cuts] = 1
        rows.append(boundary.cumsum(0))
    return torch.stack(rows)


def case_inputs(case: AttentionCase, seed: int = 0) -> dict[str, Tensor | None]:
    """Seeded fp32 q [B, H, T, D], k, v [B, Hkv, T, D], dout like q, doc_ids [B, T] or None."""
    gen = torch.Generator().manual_seed(seed)
    b, t, d = case.batch, case.seq_len, case.head_dim
    return {
        "q": torch.randn(b, case.heads, t, d, generator=gen),
        "k": torch.randn(b, case.kv_heads, t, d, generator=gen),
        "v": torch.randn(b, case.kv_heads, t, d, generator=gen),
        "dout": torch.randn(b, case.heads, t, d, generator=gen),
        "doc_ids": random_doc_ids(b, t, gen) if case.documents else None,
    }


def padded_case(inputs: dict[str, Tensor | None], sp: int, seed: int = 1) -> dict:
    """Inputs extended at the end to ``padded_length(T, sp)``: random q, k, v, zero dout,
    doc id -1 (as ``pad_batch`` does), positions continuing. Unchanged when T divides."""
    seq_len = inputs["q"].shape[2]
    extra = padded_length(seq_len, sp) - seq_len
    if extra == 0:
        return dict(inputs)
    gen = torch.Generator().manual_seed(seed)
    padded = {}
    for name in ("q", "k", "v"):
        x = inputs[name]
        tail = torch.randn(*x.shape[:2], extra, x.shape[3], generator=gen)
        padded[name] = torch.cat([x, tail], dim=2)
    dout = inputs["dout"]
    padded["dout"] = torch.cat([dout, dout.new_zeros(*dout.shape[:2], extra, dout.shape[3])], 2)
    docs = inputs["doc_ids"]
    padded["doc_ids"] = (
        None if docs is None else torch.cat([docs, docs.new_full((docs.shape[0], extra), -1)], 1)
    )
    return padded


def visibility(case: AttentionCase, doc_ids: Tensor | None, seq_len: int) -> Tensor:
    """Bool [B or 1, T, T]: query i sees key j under the case's rules (written out densely)."""
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    visible = j <= i if case.causal else torch.ones(seq_len, seq_len, dtype=torch.bool)
    if case.window is not None:
        visible = visible & (i - j < case.window)
    if case.block_sparse:
        visible = visible & local_and_strided(i // 8, j // 8)
    if doc_ids is None:
        return visible[None]
    return visible[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])


def dense_reference(case: AttentionCase, inputs: dict) -> dict[str, Tensor]:
    """out, lse, dq, dk, dv of full-sequence attention in float64, by autograd."""
    q, k, v = (inputs[n].double().requires_grad_() for n in ("q", "k", "v"))
    groups = case.heads // case.kv_heads
    k_full = k.repeat_interleave(groups, dim=1)  # query head h reads kv head h // groups
    v_full = v.repeat_interleave(groups, dim=1)
    scores = q @ k_full.transpose(-1, -2) / case.head_dim**0.5  # [B, H, T, T]
    visible = visibility(case, inputs["doc_ids"], case.seq_len)[:, None]  # [B|1, 1, T, T]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # every row sees itself, so finite
    out = torch.softmax(scores, dim=-1) @ v_full
    out.backward(inputs["dout"].double())
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def assemble(shards: list[tuple[Tensor, Tensor]], seq_len: int, dim: int = 2) -> Tensor:
    """The full tensor (first ``seq_len`` positions) from ``(positions [t], shard)`` pairs."""
    positions = torch.cat([pos for pos, _ in shards])
    values = torch.cat([x for _, x in shards], dim=dim)
    order = torch.argsort(positions)
    return values.index_select(dim, order).narrow(dim, 0, seq_len)


FIELDS = ("out", "lse", "dq", "dk", "dv")


def check_against_reference(
    case: AttentionCase, results: list[dict], fields: tuple[str, ...] = FIELDS
) -> None:
    """Assemble every rank's shard of ``fields`` (default out, lse, dq, dk, dv) and compare
    with the reference."""
    reference = dense_reference(case, case_inputs(case))
    for name in fields:
        expected = reference[name]
        got = assemble([(r["positions"], r[name]) for r in results], case.seq_len)
        torch.testing.assert_close(
            got.double(), expected, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}"
        )
