"""Sequence parallelism: process mesh, zigzag layout, ring attention, Ulysses, SP-exact loss;
and the two paths every run goes through.

``build_mesh`` lays the world out as dp x ulysses x ring; ``parallelize`` swaps each attention
layer's core for ring / Ulysses / Ulysses-over-ring attention; ``ParallelMesh.shard_batch`` gives
each rank its tokens; ``tiled_cross_entropy`` scores them exactly under sequence parallelism.
``apply_transforms(model, TransformPlan)`` is the one ordered model transform (sequence
parallelism, tiled MLP, activation checkpointing, offload); ``prepare_batch`` the one batch
path (the core's batch transform, ``rope_seq_len``, the shard).
"""

from longctx.parallel.apply import TransformPlan, apply_transforms
from longctx.parallel.batch import prepare_batch
from longctx.parallel.layout import (
    pad_batch,
    zigzag_positions,
    zigzag_shard,
    zigzag_shard_batch,
    zigzag_unshard,
)
from longctx.parallel.loss import tiled_cross_entropy, world_mean_scale
from longctx.parallel.mesh import ParallelMesh, build_mesh, sequence_shard, validate_mesh
from longctx.parallel.parallelize import parallelize
from longctx.parallel.ring import RingAttention, ring_attention
from longctx.parallel.ulysses import UlyssesAttention, check_ulysses_heads

__all__ = [
    "ParallelMesh",
    "RingAttention",
    "TransformPlan",
    "UlyssesAttention",
    "apply_transforms",
    "build_mesh",
    "check_ulysses_heads",
    "pad_batch",
    "parallelize",
    "prepare_batch",
    "ring_attention",
    "sequence_shard",
    "zigzag_shard_batch",
    "tiled_cross_entropy",
    "validate_mesh",
    "world_mean_scale",
    "zigzag_positions",
    "zigzag_shard",
    "zigzag_unshard",
]
