"""The multi-process harness itself: real gloo collectives on 2 and 4 ranks."""

import pytest
import torch
import torch.distributed as dist
from harness import run_on_ranks


def _all_reduce_and_ring(rank: int, world: int) -> dict:
    """Sum a rank-specific random tensor over all ranks and pass a token around the ring."""
    gen = torch.Generator().manual_seed(rank)
    mine = torch.randn(5, generator=gen)
    total = mine.clone()
    dist.all_reduce(total)
    send = torch.tensor([float(rank)])
    recv = torch.empty(1)
    ops = [
        dist.P2POp(dist.isend, send, (rank + 1) % world),
        dist.P2POp(dist.irecv, recv, (rank - 1) % world),
    ]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return {"mine": mine, "total": total, "from_prev": recv.item()}


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_on_real_ranks(world):
    results = run_on_ranks(_all_reduce_and_ring, world)
    expected_total = sum(r["mine"] for r in results)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["total"], expected_total, rtol=1e-6, atol=1e-6)
        assert result["from_prev"] == float((rank - 1) % world)


def _fail_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank one")


def test_failure_carries_the_remote_traceback():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_on_ranks(_fail_on_rank_one, 2, timeout=60)
