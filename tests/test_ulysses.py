"""Ulysses (SPECS 1.5) on 2 and 4 real gloo ranks, and Ulysses 2 x ring 2, equal dense attention
on the full sequence: out, lse, dq, dk, dv for every mask case of ``sp_cases``; the context the
inner core sees is the whole group's (hidden states gathered with exact gradients); bad head
counts are refused with the numbers."""

import functools

import pytest
import torch
import torch.distributed as dist
from harness import run_on_ranks
from sp_cases import CASES, case_inputs, check_against_reference, padded_case
from torch import nn

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.dense import DenseAttention
from longctx.attention.kernels import block_attention
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.parallel.config import ParallelConfig
from longctx.parallel.mesh import build_mesh
from longctx.parallel.ring import RingAttention, ring_attention
from longctx.parallel.ulysses import (
    ContextGather,
    UlyssesAttention,
    check_ulysses_heads,
    kv_head_replication,
)
from longctx.positional.config import PositionalConfig

# DenseAttention is causal and has no block-sparse rule; ring attention's non-causal and
# block-sparse paths are checked in test_ring.
ULYSSES_CASES = [name for name, case in CASES.items() if case.causal and not case.block_sparse]


class LseProbe(nn.Module):
    """Inner core that also keeps the lse of the head subset it saw (the production cores
    return only ``out``): dense on one rank, or ring attention when a ring group is given."""

    def __init__(self, dense: DenseAttention, ring_group=None):
        super().__init__()
        self.dense, self.ring_group = dense, ring_group
        self.lse = None

    def forward(self, q, k, v, ctx):
        if self.ring_group is None:
            out, lse = block_attention(q, k, v, mask=self.dense.mask_for(ctx))
        else:
            out, lse = ring_attention(
                q,
                k,
                v,
                group=self.ring_group,
                seq_positions=ctx.seq_positions,
                doc_ids=ctx.doc_ids,
                window=self.dense.sliding_window,
                return_lse=True,
            )
        self.lse = lse.detach()  # [B, H / ulysses, T / ring]
        return out


def _local_lse(probe, mesh, local_tokens):
    """This rank's tokens of all heads: gather the head subsets, keep the local piece."""
    parts = [torch.empty_like(probe.lse) for _ in range(mesh.config.ulysses)]
    dist.all_gather(parts, probe.lse, group=mesh.ulysses_group)
    all_heads = torch.cat(parts, dim=1)  # [B, H, T / ring]
    return all_heads.split(local_tokens, dim=2)[mesh.ulysses_rank]


def _ulysses_rank(rank, world, layouts, padded_inputs):
    """Every case under every (ulysses, ring) layout of this world size, and the gathers."""
    results = {layout: _run_layout(*layout, padded_inputs) for layout in layouts}
    return results | {"gather": _gather_checks(rank, world)}


def _hidden_and_weight(rank, world):
    """This rank's hidden [2, 3, 5] and the weight [2, 3 x world, 5] its loss applies."""
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3 * world, 5, generator=gen)


def _gather_checks(rank, world):
    """Gathered context with and without hidden, and the gradient through the hidden gather."""
    hidden, weight = _hidden_and_weight(rank, world)
    hidden.requires_grad_()
    ctx = AttentionContext(
        position_ids=torch.arange(3).expand(2, 3) + 3 * rank,
        seq_positions=torch.arange(3) + 3 * rank,
        hidden=hidden,
    )
    gather = ContextGather(dist.group.WORLD)
    without = gather(ctx, with_hidden=False)
    full = gather(ctx, with_hidden=True)
    (full.hidden * weight).sum().backward()
    return {
        "seq_positions": full.seq_positions,
        "metadata_reused": full.seq_positions is without.seq_positions,
        "hidden_without": without.hidden,
        "hidden": full.hidden.detach(),
        "grad": hidden.grad,
    }


def _run_layout(ulysses, ring, padded_inputs):
    mesh = build_mesh(ParallelConfig(dp=1, ulysses=ulysses, ring=ring))
    results = {}
    for name, inputs in padded_inputs.items():
        case = CASES[name]
        batch, seq_len = inputs["q"].shape[0], inputs["q"].shape[2]
        docs = inputs["doc_ids"]
        tokens = {"input_ids": torch.arange(seq_len).expand(batch, seq_len)}
        if docs is not None:
            tokens["doc_ids"] = docs
        shard = mesh.shard_batch(tokens)
        positions = shard["seq_positions"]
        ctx = AttentionContext(
            position_ids=positions.expand(batch, -1),
            seq_positions=positions,
            doc_ids=shard.get("doc_ids"),
        )
        q, k, v = (inputs[n][:, :, positions].clone().requires_grad_() for n in ("q", "k", "v"))
        shape = ModelConfig(sliding_window=case.window).attention_shape(0)
        dense = DenseAttention(shape, AttentionConfig(), PositionalConfig())
        inner = RingAttention(dense, mesh.ring_group) if ring > 1 else dense
        heads = {"num_heads": case.heads, "num_kv_heads": case.kv_heads}
        core = UlyssesAttention(inner, mesh.ulysses_group, **heads)
        out = core(q, k, v, ctx)
        out.backward(inputs["dout"][:, :, positions])
        probe = LseProbe(dense, mesh.ring_group if ring > 1 else None)
        UlyssesAttention(probe, mesh.ulysses_group, **heads)(
            q.detach(), k.detach(), v.detach(), ctx
        )
        results[name] = {
            "positions": positions,
            "out": out.detach(),
            "lse": _local_lse(probe, mesh, len(positions)),
            "dq": q.grad,
            "dk": k.grad,
            "dv": v.grad,
        }
    return results


LAYOUTS_BY_WORLD = {2: [(2, 1)], 4: [(4, 1), (2, 2)]}


@functools.cache
def _world_results(world):
    """One spawn per world size runs every case under each of its layouts."""
    padded = {name: padded_case(case_inputs(CASES[name]), world) for name in ULYSSES_CASES}
    layouts = LAYOUTS_BY_WORLD[world]
    return run_on_ranks(_ulysses_rank, world, layouts, padded)


@pytest.mark.parametrize(
    "layout",
    [layout for layouts in LAYOUTS_BY_WORLD.values() for layout in layouts],
    ids=lambda p: f"ulysses{p[0]}xring{p[1]}",
)
@pytest.mark.parametrize("case_name", ULYSSES_CASES)
def test_ulysses_equals_dense_attention(layout, case_name):
    results = _world_results(layout[0] * layout[1])
    check_against_reference(CASES[case_name], [r[layout][case_name] for r in results])


def test_context_gather_concatenates_tokens_in_rank_order():
    results = _world_results(2)
    for r in results:
        gathered = r["gather"]
        assert gathered["seq_positions"].tolist() == list(range(6))
        assert gathered["metadata_reused"]
        assert gathered["hidden_without"] is None
        expected = torch.cat([_hidden_and_weight(rank, 2)[0] for rank in range(2)], dim=1)
        torch.testing.assert_close(gathered["hidden"], expected, rtol=0, atol=0)


def test_hidden_gather_returns_each_rank_the_sum_of_its_tokens_gradients():
    """Rank r's loss is sum(gathered * w_r); a token's gradient sums w_r over all ranks."""
    results = _world_results(2)
    weights = [_hidden_and_weight(rank, 2)[1] for rank in range(2)]
    for rank, r in enumerate(results):
        expected = sum(w[:, 3 * rank : 3 * rank + 3] for w in weights)
        torch.testing.assert_close(r["gather"]["grad"], expected, rtol=1e-6, atol=1e-6)


def test_heads_not_divisible_by_the_degree_are_refused_with_the_numbers():
    with pytest.raises(
        LongctxError, match=r"num_attention_heads 6 is not divisible by parallel.ulysses 4"
    ) as info:
        check_ulysses_heads(num_heads=6, num_kv_heads=2, degree=4)
    assert "\n" not in str(info.value)
    assert "[1, 2, 3, 6]" in str(info.value)


@pytest.mark.parametrize(
    ("kv_heads", "degree", "repeat"), [(4, 2, 1), (2, 4, 2), (1, 4, 4), (6, 4, 2), (3, 2, 2)]
)
def test_kv_heads_are_replicated_to_a_multiple_of_the_degree(kv_heads, degree, repeat):
    assert kv_head_replication(kv_heads, degree) == repeat
    assert (kv_heads * repeat) % degree == 0
