"""Zigzag layout (SPECS 1.3): positions, shard/unshard round trip, padding, balance."""

import pytest
import torch

from longctx.errors import LongctxError
from longctx.parallel.layout import (
    causal_work,
    pad_batch,
    zigzag_positions,
    zigzag_shard,
    zigzag_shard_batch,
    zigzag_unshard,
)


def test_specs_example_p2_t8():
    assert zigzag_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 1, 2).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_holds_its_positions_and_unshard_inverts(world):
    seq_len = 2 * world * 5
    x = torch.randn(3, seq_len, 7)
    shards = [zigzag_shard(x, 1, r, world) for r in range(world)]
    for r, shard in enumerate(shards):
        torch.testing.assert_close(shard, x[:, zigzag_positions(seq_len, r, world)], rtol=0, atol=0)
    torch.testing.assert_close(zigzag_unshard(shards, 1), x, rtol=0, atol=0)
    covered = torch.cat([zigzag_positions(seq_len, r, world) for r in range(world)])
    assert sorted(covered.tolist()) == list(range(seq_len))


def test_indivisible_length_is_refused_with_the_fix():
    with pytest.raises(LongctxError, match="not divisible by 2 x ring = 4"):
        zigzag_positions(10, 0, 2)


def test_padding_masks_the_added_tokens():
    batch = {
        "input_ids": torch.randint(1, 50, (2, 10)),
        "labels": torch.randint(0, 50, (2, 10)),
        "position_ids": torch.arange(10).repeat(2, 1),
        "doc_ids": torch.zeros(2, 10, dtype=torch.long),
    }
    padded = pad_batch(batch, world=4)
    assert padded["input_ids"].shape == (2, 16)
    assert (padded["labels"][:, 10:] == -100).all()
    assert (padded["doc_ids"][:, 10:] == -1).all()
    assert padded["position_ids"][0].tolist() == list(range(16))
    shards = [zigzag_shard_batch(batch, r, 4) for r in range(4)]
    assert all(s["input_ids"].shape == (2, 4) for s in shards)
    torch.testing.assert_close(
        zigzag_unshard([s["labels"] for s in shards], 1), padded["labels"], rtol=0, atol=0
    )


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_balances_causal_work(world):
    seq_len = 2 * world * 64
    work = [causal_work(zigzag_positions(seq_len, r, world)) for r in range(world)]
    assert max(work) / min(work) <= 1.05
    contiguous = [causal_work(torch.arange(seq_len).chunk(world)[r]) for r in range(world)]
    assert max(contiguous) / min(contiguous) > 2.5
