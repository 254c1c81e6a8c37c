"""The recipe turned into the plain settings the lower layers take (they never read a recipe).

``transform_plan``: what ``apply_transforms`` does to the model (``parallel/apply.py``);
``batch_transform_for``: what ``prepare_batch`` does to every batch before it is sharded
(``parallel/batch.py``), for training, the loss evaluation and the sequence scorer alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from longctx.attention.registry import core_class
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
        checkpoint_mode=cfg.activation_checkpointing_mode,
        offload_activations=cfg.offload_activations,
    )


def batch_transform_for(recipe: Recipe) -> BatchTransform:
    """The attention core's ``transform_batch`` hook bound to the recipe (Landmark inserts its
    tokens; every other core returns the batch as it is)."""
    core = core_class(recipe.attention, recipe.positional)
    shape, attention = recipe.model.attention_shape(0), recipe.attention

    def transform(batch):
        return core.transform_batch(batch, shape, attention)

    return transform
