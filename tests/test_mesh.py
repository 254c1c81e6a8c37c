"""Process mesh: dp x ulysses x ring validated up front, groups on 4 real gloo ranks, and the
two-level token layout (zigzag over ring, contiguous over Ulysses)."""

import pytest
import torch
import torch.distributed as dist
from harness import run_on_ranks

from longctx.errors import LongctxError
from longctx.parallel.config import ParallelConfig
from longctx.parallel.layout import zigzag_shard
from longctx.parallel.mesh import build_mesh, mesh_coordinates, sequence_shard, validate_mesh


def test_world_size_not_equal_to_the_product_is_refused_with_the_numbers():
    config = ParallelConfig(dp=1, ulysses=2, ring=2)
    with pytest.raises(LongctxError) as info:
        validate_mesh(config, world_size=3)
    message = str(info.value)
    assert "world size 3 is not a multiple of parallel.ulysses x ring = 2 x 2 = 4" in message
    assert "\n" not in message
    with pytest.raises(LongctxError) as info:
        validate_mesh(config, world_size=8)
    message = str(info.value)
    assert "world size 8 does not match parallel.dp x ulysses x ring = 1 x 2 x 2 = 4" in message
    assert "\n" not in message


def test_auto_dp_needs_a_multiple_of_the_sequence_parallel_size():
    with pytest.raises(LongctxError, match="world size 6 is not a multiple of .* = 4"):
        validate_mesh(ParallelConfig(ulysses=2, ring=2), world_size=6)


def test_auto_dp_is_world_over_sp():
    assert validate_mesh(ParallelConfig(ulysses=2, ring=2), world_size=8).dp == 2


def test_coordinates_put_ulysses_innermost_then_ring_then_dp():
    config = ParallelConfig(dp=2, ulysses=2, ring=3)
    coords = [mesh_coordinates(rank, config) for rank in range(12)]
    assert coords[:6] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]
    assert coords[6] == (1, 0, 0)
    assert len(set(coords)) == 12


@pytest.mark.parametrize(("ulysses", "ring"), [(1, 2), (2, 1), (2, 2), (3, 2)])
def test_sequence_shards_cover_the_padded_sequence_once(ulysses, ring):
    """Every token lands on exactly one rank, with its true global index in seq_positions, and
    a ring rank's Ulysses pieces concatenate to its zigzag shard (what Ulysses gathers)."""
    seq_len = 45  # pads to a multiple of 2 x ulysses x ring
    batch = {
        "input_ids": torch.arange(seq_len).repeat(2, 1) + 1000,
        "labels": torch.randint(0, 50, (2, seq_len), generator=torch.Generator().manual_seed(0)),
    }
    multiple = 2 * ulysses * ring
    padded_len = -(-seq_len // multiple) * multiple
    seen = []
    for r in range(ring):
        pieces = [sequence_shard(batch, r, ring, u, ulysses) for u in range(ulysses)]
        for piece in pieces:
            real = piece["seq_positions"] < seq_len
            assert (piece["input_ids"][:, real] == piece["seq_positions"][real] + 1000).all()
            assert (piece["labels"][:, ~real] == -100).all()
            seen.append(piece["seq_positions"])
        gathered = torch.cat([p["seq_positions"] for p in pieces])
        expected = zigzag_shard(torch.arange(padded_len), 0, r, ring)
        assert gathered.tolist() == expected.tolist()
    assert sorted(torch.cat(seen).tolist()) == list(range(padded_len))


def _mesh_groups(rank, world):
    """Group membership (global ranks) of two layouts of the same 4 ranks."""
    layouts = {}
    for dp, ulysses, ring in [(2, 1, 2), (1, 2, 2)]:
        mesh = build_mesh(ParallelConfig(dp=dp, ulysses=ulysses, ring=ring))
        layouts[(dp, ulysses, ring)] = {
            name: dist.get_process_group_ranks(getattr(mesh, f"{name}_group"))
            for name in ("dp", "sp", "ring", "ulysses")
        } | {"sp_rank": dist.get_rank(mesh.sp_group), "describe": mesh.describe()}
    return layouts


def test_groups_on_four_ranks():
    results = run_on_ranks(_mesh_groups, 4)
    dp2_ring2 = [r[(2, 1, 2)] for r in results]
    assert [g["sp"] for g in dp2_ring2] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g["ring"] for g in dp2_ring2] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g["dp"] for g in dp2_ring2] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [g["ulysses"] for g in dp2_ring2] == [[0], [1], [2], [3]]
    hybrid = [r[(1, 2, 2)] for r in results]
    assert [g["ulysses"] for g in hybrid] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g["ring"] for g in hybrid] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(g["sp"] == [0, 1, 2, 3] for g in hybrid)
    assert [g["sp_rank"] for g in hybrid] == [0, 1, 2, 3]
    assert hybrid[3]["describe"] == (
        "dp 1 x ulysses 2 x ring 2 = 4 ranks; rank 3 = dp 0, ring 1, ulysses 1"
    )
