"""Key-gather context parallelism on 2 and 4 real gloo ranks: the dense core on each rank's
zigzag queries against all-gathered keys equals dense attention on the full sequence (out, dq,
dk, dv in float64 reference, every causal mask case of ``sp_cases``), and the core sees the keys
sorted by global position with their metadata."""

import pytest
import torch
import torch.distributed as dist
from harness import run_on_ranks
from sp_cases import CASES, case_inputs, check_against_reference, padded_case
from torch import nn

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.dense import DenseAttention
from longctx.model.config import ModelConfig
from longctx.parallel.key_gather import KeyGatherAttention
from longctx.parallel.layout import zigzag_positions
from longctx.positional.config import PositionalConfig

# DenseAttention is causal with no block-sparse rule (those paths belong to ring attention).
KEY_GATHER_CASES = [name for name, case in CASES.items() if case.causal and not case.block_sparse]


class _KeyProbe(nn.Module):
    """Inner core that records the key side of the context it was handed."""

    def forward(self, q, k, v, ctx):
        self.seen = (ctx.k_seq_positions.clone(), ctx.k_hidden.detach().clone(), k.shape[2])
        return q * ctx.k_hidden.sum()  # makes the gathered hidden's gradient observable


def _key_gather_rank(rank, world, padded_inputs):
    results = {}
    for name, inputs in padded_inputs.items():
        case = CASES[name]
        positions = zigzag_positions(inputs["q"].shape[2], rank, world)
        q, k, v = (inputs[n][:, :, positions].clone().requires_grad_() for n in ("q", "k", "v"))
        docs = inputs["doc_ids"]
        ctx = AttentionContext(
            position_ids=positions[None].expand(q.shape[0], -1),
            seq_positions=positions,
            doc_ids=None if docs is None else docs[:, positions],
        )
        core = KeyGatherAttention(
            DenseAttention(
                ModelConfig(sliding_window=case.window).attention_shape(0),
                AttentionConfig(),
                PositionalConfig(),
            ),
            dist.group.WORLD,
        )
        out = core(q, k, v, ctx)
        out.backward(inputs["dout"][:, :, positions])
        results[name] = {
            "positions": positions,
            "out": out.detach(),
            "dq": q.grad,
            "dk": k.grad,
            "dv": v.grad,
        }
    results["probe"] = _probe_keys(rank, world)
    return results


def _probe_keys(rank, world):
    """What the inner core receives: sorted global key positions and the gathered hidden."""
    seq_len = 8 * world
    positions = zigzag_positions(seq_len, rank, world)
    hidden = positions.double()[None, :, None].repeat(1, 1, 3).requires_grad_()  # [1, T/P, 3]
    ctx = AttentionContext(position_ids=positions[None], seq_positions=positions, hidden=hidden)
    probe = _KeyProbe()
    q = torch.ones(1, 1, positions.numel(), 2, dtype=torch.float64)
    kv = torch.zeros(1, 1, positions.numel(), 2, dtype=torch.float64)
    out = KeyGatherAttention(probe, dist.group.WORLD, gather_hidden=True)(q, kv, kv, ctx)
    out.sum().backward()
    key_positions, key_hidden, num_keys = probe.seen
    return {
        "key_positions": key_positions,
        "key_hidden": key_hidden,
        "num_keys": num_keys,
        "hidden_grad": hidden.grad,
        "local_queries": positions.numel(),
    }


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"ring{p}")
def key_gather_results(request):
    world = request.param
    padded = {name: padded_case(case_inputs(CASES[name]), world) for name in KEY_GATHER_CASES}
    return world, run_on_ranks(_key_gather_rank, world, padded)


@pytest.mark.parametrize("case_name", KEY_GATHER_CASES)
def test_key_gather_equals_dense_attention(key_gather_results, case_name):
    _, results = key_gather_results
    results = [r[case_name] for r in results]
    check_against_reference(CASES[case_name], results, fields=("out", "dq", "dk", "dv"))


def test_core_sees_every_key_sorted_by_global_position(key_gather_results):
    world, results = key_gather_results
    seq_len = 8 * world
    for result in results:
        probe = result["probe"]
        assert probe["num_keys"] == seq_len
        assert torch.equal(probe["key_positions"], torch.arange(seq_len))
        assert torch.equal(probe["key_hidden"][0, :, 0], torch.arange(seq_len).double())
        # every rank's loss sums q * sum(all hidden): d/d hidden = sum over ranks of sum(q) = T
        expected = torch.full_like(probe["hidden_grad"], float(seq_len * 2))
        torch.testing.assert_close(probe["hidden_grad"], expected)
