"""The process mesh of a run: data parallel x Ulysses x ring, validated before any group exists.

The world is ``dp x sp`` with ``sp = ulysses x ring`` (DESIGN section 5). Ranks are numbered
with Ulysses innermost, so the ranks of one all-to-all are neighbours (on a GPU node: the ones
with the fastest links), then ring, then data parallel:

    rank = (dp_index * ring + ring_index) * ulysses + ulysses_index

One sequence-parallel group (``sp`` ranks) shares one sequence. Its tokens are laid out in two
levels (``sequence_shard``): the zigzag layout over the ring cuts the sequence into
``2 x ring`` chunks and ring rank r holds chunks r and 2*ring-1-r (SPECS 1.3); that ring shard is
then cut into ``ulysses`` contiguous pieces, one per Ulysses rank. Ulysses' all-to-all
concatenates the pieces of its group in rank order, so the attention inside it sees exactly the
ring shard, with its global positions, and ring attention runs across ring ranks on top.

The four process groups (dp, sp, ring, ulysses) come from one torch ``DeviceMesh`` over
``(dp, ring, ulysses)`` plus a flat group for each sequence-parallel block. Every rank must build
the mesh (collective group creation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from longctx.errors import LongctxError
from longctx.parallel.config import ParallelConfig
from longctx.parallel.layout import pad_batch, zigzag_shard_batch

MESH_DIMS = ("dp", "ring", "ulysses")


def validate_mesh(config: ParallelConfig, world_size: int) -> ParallelConfig:
    """``config`` with a concrete ``dp`` for ``world_size`` ranks, or a one-line LongctxError
    (``ParallelConfig.resolve``: ``dp: auto`` becomes ``world_size / (ulysses x ring)``, which
    must be a whole number; a concrete ``dp`` must make ``dp x ulysses x ring`` equal it)."""
    return config.resolve(world_size, ranks="world size")


def mesh_coordinates(rank: int, config: ParallelConfig) -> tuple[int, int, int]:
    """``(dp_index, ring_index, ulysses_index)`` of a global rank (Ulysses innermost)."""
    ulysses_index = rank % config.ulysses
    ring_index = (rank // config.ulysses) % config.ring
    dp_index = rank // (config.ulysses * config.ring)
    return dp_index, ring_index, ulysses_index


def sequence_shard(
    batch: dict[str, Tensor], ring_rank: int, ring: int, ulysses_rank: int, ulysses: int
) -> dict[str, Tensor]:
    """The tokens one sequence-parallel rank holds: zigzag over ring, contiguous over Ulysses.

    ``batch`` holds [B, T] fields (input_ids, labels, position_ids, doc_ids, ...). T is padded
    first to a multiple of ``2 x ring x ulysses`` (``pad_batch``: label -100, doc id -1, logged),
    then the ring rank's zigzag shard [B, T / ring] is cut into ``ulysses`` equal pieces. The
    result has every field at [B, T / (ring x ulysses)] plus ``seq_positions``
    [T / (ring x ulysses)]: each local token's index in the global sequence.
    """
    padded = pad_batch(batch, ring * ulysses)
    ring_piece = zigzag_shard_batch(padded, ring_rank, ring)
    positions = ring_piece.pop("seq_positions")  # [T / ring]
    shard = {name: value.chunk(ulysses, dim=1)[ulysses_rank] for name, value in ring_piece.items()}
    shard["seq_positions"] = positions.chunk(ulysses)[ulysses_rank]
    return shard


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's place in the ``dp x ring x ulysses`` mesh and the groups it belongs to.

    ``sp_group`` holds the ``ulysses x ring`` ranks that share one sequence (the tiled loss
    counts tokens over it and scales by its size); ``ring_group`` and ``ulysses_group`` are its
    two factors; ``dp_group`` holds the ranks with the same sequence-parallel coordinates.
    """

    config: ParallelConfig
    rank: int
    device_mesh: DeviceMesh
    dp_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    ulysses_group: dist.ProcessGroup
    sp_group: dist.ProcessGroup

    @property
    def dp_rank(self) -> int:
        return mesh_coordinates(self.rank, self.config)[0]

    @property
    def ring_rank(self) -> int:
        return mesh_coordinates(self.rank, self.config)[1]

    @property
    def ulysses_rank(self) -> int:
        return mesh_coordinates(self.rank, self.config)[2]

    def shard_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's tokens of a [B, T] batch of its sequence-parallel group (``sequence_shard``)."""
        return sequence_shard(
            batch, self.ring_rank, self.config.ring, self.ulysses_rank, self.config.ulysses
        )

    def describe(self) -> str:
        """One log line: the layout and this rank's coordinates in it."""
        return (
            f"{self.config.describe()}; rank {self.rank} = dp {self.dp_rank}, "
            f"ring {self.ring_rank}, ulysses {self.ulysses_rank}"
        )


def build_mesh(config: ParallelConfig) -> ParallelMesh:
    """Validate ``config`` against the initialised default process group and create the groups.

    Collective: every rank of the world calls it, with the same ``config``. The device type
    follows the backend (nccl -> cuda, otherwise cpu).
    """
    if not dist.is_initialized():
        raise LongctxError(
            "parallel mesh needs torch.distributed to be initialised; call "
            "dist.init_process_group (or deepspeed.init_distributed) before build_mesh"
        )
    world_size, rank = dist.get_world_size(), dist.get_rank()
    config = validate_mesh(config, world_size)
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    device_mesh = init_device_mesh(
        device_type, (config.dp, config.ring, config.ulysses), mesh_dim_names=MESH_DIMS
    )
    ranks = torch.arange(world_size).view(config.dp, config.ring * config.ulysses)
    sp_group, _ = dist.new_subgroups_by_enumeration(ranks.tolist())
    return ParallelMesh(
        config=config,
        rank=rank,
        device_mesh=device_mesh,
        dp_group=device_mesh.get_group("dp"),
        ring_group=device_mesh.get_group("ring"),
        ulysses_group=device_mesh.get_group("ulysses"),
        sp_group=sp_group,
    )
