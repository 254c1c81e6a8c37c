"""The one place a built model is turned into the model a run trains or evaluates.

``apply_transforms(model, plan)`` applies, in a fixed order, every transform of a plain
``Transformer`` that the run's settings (``TransformPlan``, plain values built by the trainer
from the recipe) ask for: sequence parallelism, the tiled MLP, activation checkpointing and
activation offload. The model file knows none of them; each is exact (the transformed model
computes the plain model's function and gradients) and keeps the plain model's state-dict and
parameter names, so checkpoints move between any combination of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import nn

from longctx.errors import LongctxError
from longctx.model.wrappers import CheckpointedLayer, OffloadedLayer, wrap_layers
from longctx.parallel.mesh import ParallelMesh
from longctx.parallel.parallelize import parallelize


@dataclass(frozen=True)
class TransformPlan:
    """What ``apply_transforms`` does to a model (all off by default: the model is unchanged).

    ``mesh``: the sequence-parallel mesh (None, or ``ulysses = ring = 1``: no sequence
    parallelism); ``tiled_mlp_chunk``: tokens per MLP chunk (None: untiled);
    ``activation_checkpointing``: recompute each layer in backward, in ``checkpoint_mode``
    (``CheckpointedLayer``: ``selective`` keeps the attention kernels' outputs, ``full`` only
    the layer inputs); ``offload_activations``:
    keep what each layer saves for backward in CPU memory.
    """

    mesh: ParallelMesh | None = None
    tiled_mlp_chunk: int | None = None
    activation_checkpointing: bool = False
    checkpoint_mode: str = "selective"
    offload_activations: bool = False

    def __post_init__(self) -> None:
        if self.tiled_mlp_chunk is not None and self.tiled_mlp_chunk < 1:
            raise LongctxError(
                f"tiled MLP chunk must be >= 1 token, got {self.tiled_mlp_chunk}; use e.g. 4096"
            )


def apply_transforms(model: nn.Module, plan: TransformPlan) -> nn.Module:
    """Apply ``plan`` to ``model`` (a plain ``longctx.model.Transformer``) in place; returns it.

    Call it once per model, on every rank, before the model is handed to DeepSpeed or an
    evaluator. The order, and why:

    1. **sequence parallelism** (``parallelize``: swaps ``layers[i].self_attn.core`` for its
       ring / Ulysses form). First, because it reaches into the plain layers
       (``layers[i].self_attn.core``) and validates every layer before changing any;
    2. **tiled MLP** (``SwiGLU.seq_chunk`` on every layer's MLP): an attribute of the plain
       layer's MLP, set before any wrapper so the wrappers run the tiled MLP inside them;
    3. **activation checkpointing** (``CheckpointedLayer`` around each decoder layer): it must
       wrap the layer as it will finally compute (SP core, tiled MLP), since backward
       recomputes exactly what the wrapped forward runs;
    4. **activation offload** (``OffloadedLayer`` around the result): outermost, so that with
       checkpointing the tensors it moves to CPU memory are what the checkpointed layer saves,
       its inputs (``[B, T, d]`` per layer); inside the checkpoint it would offload only the
       short-lived recomputed activations.

    Adapters (when they come) go after these: they wrap leaf modules of the final model.
    Applying a plan twice is refused by ``parallelize`` for SP; keep to once per model.
    """
    if plan.mesh is not None:
        parallelize(model, plan.mesh.config, plan.mesh)
    if plan.tiled_mlp_chunk is not None:
        for layer in model.layers:
            layer.mlp.seq_chunk = plan.tiled_mlp_chunk
    if plan.activation_checkpointing:
        wrap_layers(model, partial(CheckpointedLayer, mode=plan.checkpoint_mode))
    if plan.offload_activations:
        wrap_layers(model, OffloadedLayer)
    return model
