"""The recipe turned into the plain settings the lower layers take (they never read a recipe).

``transform_plan``: what ``apply_transforms`` does to the model (``parallel/apply.py``);
``batch_transform_for``: what ``prepare_batch`` does to every batch before it is sharded
(``parallel/batch.py``), for training, the loss evaluation and the sequence scorer alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from longctx.attention.landmark import batch_transform
from longctx.parallel.apply import TransformPlan
from longctx.parallel.batch import BatchTransform

if TYPE_CHECKING:
    from longctx.config.recipe import Recipe, TrainerConfig
    from longctx.parallel.mesh import ParallelMesh


def transform_plan(cfg: TrainerConfig, mesh: ParallelMesh | None = None) -> TransformPlan:
    """The model transforms of a run: its mesh (sequence parallelism) and memory options."""
    return TransformPlan(
        mesh=mesh,
        tiled_mlp_chunk=cfg.tiled_mlp_chunk,
        activation_checkpointing=cfg.activation_checkpointing,
        offload_activations=cfg.offload_activations,
    )


def batch_transform_for(recipe: Recipe) -> BatchTransform:
    """The attention core's batch transform (Landmark's token insertion, else the identity)."""
    return batch_transform(recipe.attention, recipe.model.vocab_size)
