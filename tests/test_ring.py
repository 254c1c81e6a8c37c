"""Ring attention (SPECS 1.4) on 2 and 4 real gloo ranks equals dense attention on the full
sequence: out, lse, dq, dk, dv, for every case of ``sp_cases`` (causal, documents, GQA, MQA,
sliding window, block-sparse, head dim 80, padded length); on 3 ranks with shards that the
backward's key segments do not divide evenly; and it skips hidden work."""

import pytest
import torch
import torch.distributed as dist
from harness import run_on_ranks
from sp_cases import (
    CASES,
    case_inputs,
    check_against_reference,
    padded_case,
    sparse_pattern,
)

from longctx.attention.mask import MaskSpec
from longctx.parallel.layout import causal_work, zigzag_positions
from longctx.parallel.ring import (
    BACKWARD_PARTS,
    _rotate_segments,
    _segments,
    ring_attention,
    visible_pieces,
)


def _ring_rank(rank, world, padded_inputs):
    """Every case on this rank's zigzag shard; returns out, lse and the input grads."""
    results = {}
    for name, inputs in padded_inputs.items():
        case = CASES[name]
        positions = zigzag_positions(inputs["q"].shape[2], rank, world)
        q, k, v = (inputs[n][:, :, positions].clone().requires_grad_() for n in ("q", "k", "v"))
        docs = inputs["doc_ids"]
        out, lse = ring_attention(
            q,
            k,
            v,
            group=dist.group.WORLD,
            seq_positions=positions,
            doc_ids=None if docs is None else docs[:, positions],
            causal=case.causal,
            window=case.window,
            block_sparse=sparse_pattern(case),
            return_lse=True,
        )
        out.backward(inputs["dout"][:, :, positions])
        results[name] = {
            "positions": positions,
            "out": out.detach(),
            "lse": lse,
            "dq": q.grad,
            "dk": k.grad,
            "dv": v.grad,
        }
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"ring{p}")
def ring_results(request):
    """One spawn per ring size runs every case; the tests below check one case each."""
    world = request.param
    padded = {name: padded_case(case_inputs(case), world) for name, case in CASES.items()}
    return run_on_ranks(_ring_rank, world, padded)


@pytest.mark.parametrize("case_name", list(CASES))
def test_ring_equals_dense_attention(ring_results, case_name):
    check_against_reference(CASES[case_name], [r[case_name] for r in ring_results])


# Cases for the 3-rank ring: zigzag pads 64 to 66 and 50 to 54 tokens, 22 and 18 per rank,
# neither a multiple of BACKWARD_PARTS, so the last step's key segments are uneven.
ODD_RING_CASES = ("sliding_window", "gqa", "needs_padding")
SEGMENTED_BLOCK = (2, 3, 13, 5)  # [B, H, T, D]: 13 keys in 8 segments of 1 or 2


def _odd_ring_rank(rank, world, padded_inputs, block_shape):
    """The ring results of ``ODD_RING_CASES``, and what ``_rotate_segments`` delivers of a
    seeded random block per rank ([B, H, T, D], T split into uneven segments)."""
    results = _ring_rank(rank, world, padded_inputs)
    blocks = [
        torch.randn(block_shape, generator=torch.Generator().manual_seed(r))
        for r in range(2 * world)
    ]
    held = [blocks[2 * rank], blocks[2 * rank + 1]]
    segments = _segments(block_shape[2], BACKWARD_PARTS)
    received = [
        (segment, [t.clone() for t in tensors])
        for segment, tensors in _rotate_segments(dist.group.WORLD, held, segments)
    ]
    return results, received


@pytest.fixture(scope="module")
def odd_ring_results():
    world = 3
    padded = {name: padded_case(case_inputs(CASES[name]), world) for name in ODD_RING_CASES}
    return run_on_ranks(_odd_ring_rank, world, padded, SEGMENTED_BLOCK)


@pytest.mark.parametrize("case_name", ODD_RING_CASES)
def test_three_rank_ring_with_uneven_key_segments_equals_dense(odd_ring_results, case_name):
    check_against_reference(CASES[case_name], [r[case_name] for r, _ in odd_ring_results])


def test_segmented_receive_delivers_the_previous_ranks_block(odd_ring_results):
    """Each rank receives, segment by segment in order, exactly the previous rank's K,V."""
    world = len(odd_ring_results)
    for rank, (_, received) in enumerate(odd_ring_results):
        source = (rank - 1) % world
        expected = [
            torch.randn(SEGMENTED_BLOCK, generator=torch.Generator().manual_seed(r))
            for r in (2 * source, 2 * source + 1)
        ]
        assert [segment for segment, _ in received] == _segments(SEGMENTED_BLOCK[2], BACKWARD_PARTS)
        for segment, tensors in received:
            for got, block in zip(tensors, expected, strict=True):
                assert torch.equal(got, block[:, :, segment])


def _zigzag_mask(seq_len, world, rank, source, window=None):
    return MaskSpec(
        causal=True,
        q_positions=zigzag_positions(seq_len, rank, world),
        k_positions=zigzag_positions(seq_len, source, world),
        window=window,
    ).bind(seq_len // world, seq_len // world)


def _area(pieces):
    return sum((qs.stop - qs.start) * (ks.stop - ks.start) for qs, ks in pieces)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_ring_computes_half_a_block_at_every_later_step(world):
    """Under zigzag causal attention every step t > 0 needs exactly half of the T/P x T/P
    block (SPECS 1.4), the first step three quarters, so all ranks do the same work."""
    seq_len = 2 * world * 16
    local = seq_len // world
    for rank in range(world):
        work = []
        for step in range(world):
            source = (rank - step) % world
            pieces = visible_pieces(_zigzag_mask(seq_len, world, rank, source), local, local)
            work.append(_area(pieces))
        assert work == [local * local * 3 // 4] + [local * local // 2] * (world - 1)


def test_pieces_cover_every_visible_pair():
    """The computed pieces contain every visible (query, key) pair of every step."""
    world, seq_len = 4, 64
    local = seq_len // world
    for rank in range(world):
        for source in range(world):
            mask = _zigzag_mask(seq_len, world, rank, source, window=20)
            covered = torch.zeros(local, local, dtype=torch.bool)
            for qs, ks in visible_pieces(mask, local, local):
                covered[qs, ks] = True
            assert not (mask.dense_mask()[0] & ~covered).any()


def test_sliding_window_skips_distant_blocks():
    """A window shorter than a chunk hides every block that is not adjacent in positions."""
    world, seq_len = 4, 128
    local = seq_len // world
    mask = _zigzag_mask(seq_len, world, rank=3, source=0, window=4)
    # rank 3 holds chunks 3 and 4, rank 0 holds chunks 0 and 7: never within 4 tokens.
    assert visible_pieces(mask, local, local) == []


def test_zigzag_balances_the_ring_work():
    """Per-rank causal work: zigzag within 5%, contiguous split about (2P - 1) x apart."""
    world, seq_len = 4, 1024
    zigzag = [causal_work(zigzag_positions(seq_len, r, world)) for r in range(world)]
    contiguous = [causal_work(torch.arange(seq_len).chunk(world)[r]) for r in range(world)]
    assert max(zigzag) / min(zigzag) <= 1.05
    assert max(contiguous) / min(contiguous) > 2 * world - 2
