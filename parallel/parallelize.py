"""Apply sequence parallelism to a plain single-device model (the torchtitan ``parallelize``).

The model file has no distributed code: every attention layer delegates its inner attention to
one seam, ``layers[i].self_attn.core`` (``(q, k, v, ctx) -> out``). ``parallelize`` swaps that
core, in place, for one with the same signature that computes the same attention over the
sequence-parallel group:

    ring > 1                 RingAttention(core, ring_group)
    ulysses > 1              UlyssesAttention(core, ulysses_group)
    ulysses > 1 and ring > 1 UlyssesAttention(RingAttention(core, ring_group), ulysses_group)

Ulysses sits outside ring: its all-to-all gives each rank the ring shard of a head subset, and
ring attention then runs across ring ranks on it (``ParallelMesh.shard_batch`` lays the tokens
out to match). Data parallelism needs nothing here: DeepSpeed sees every rank as data parallel.
Everything is validated before any layer changes, so a bad combination leaves the model intact.
"""

from __future__ import annotations

from torch import nn

from longctx.attention.dense import DenseAttention
from longctx.errors import LongctxError
from longctx.parallel.config import ParallelConfig
from longctx.parallel.mesh import ParallelMesh
from longctx.parallel.ring import RingAttention
from longctx.parallel.ulysses import ContextGather, UlyssesAttention, check_ulysses_heads

SEQUENCE_PARALLEL_CORES = (RingAttention, UlyssesAttention)
# Cores that never read ctx.hidden: Ulysses need not gather the layer input for them.
CORES_WITHOUT_HIDDEN = (DenseAttention, RingAttention)


def _check_supported(model: nn.Module, mesh: ParallelMesh) -> None:
    """One-line LongctxError for a model/mesh pair that sequence parallelism cannot serve."""
    config = mesh.config
    if config.ulysses > 1:
        check_ulysses_heads(model.config.num_attention_heads, model.config.kv_heads, config.ulysses)
    for index, layer in enumerate(model.layers):
        core = layer.self_attn.core
        if isinstance(core, SEQUENCE_PARALLEL_CORES):
            raise LongctxError(
                f"layer {index} attention is already sequence parallel ({type(core).__name__}); "
                "call parallelize once per model"
            )
        if config.ring > 1 and not isinstance(core, DenseAttention):
            raise LongctxError(
                f"attention core {type(core).__name__} of layer {index} does not support ring "
                f"attention (parallel.ring {config.ring}); use parallel.ulysses for this "
                "variant or attention.variant: dense"
            )


def parallelize(model: nn.Module, parallel_config: ParallelConfig, mesh: ParallelMesh) -> nn.Module:
    """Swap every layer's attention core for its sequence-parallel form; returns ``model``.

    ``model`` is a ``longctx.model.Transformer`` (anything with ``config`` and
    ``layers[i].self_attn.core``); ``mesh`` comes from ``build_mesh(parallel_config)`` on every
    rank (its ulysses and ring degrees must be ``parallel_config``'s). With
    ``ulysses = ring = 1`` the model is returned unchanged. The model must then be fed this
    rank's tokens from ``mesh.shard_batch`` (with their ``seq_positions``), and its loss taken
    with ``tiled_cross_entropy(..., group=mesh.sp_group)``.
    """
    config = mesh.config
    if (parallel_config.ulysses, parallel_config.ring) != (config.ulysses, config.ring):
        raise LongctxError(
            f"parallel config ulysses {parallel_config.ulysses} x ring {parallel_config.ring} "
            f"differs from the mesh's ulysses {config.ulysses} x ring {config.ring}; build the "
            "mesh from the same parallel config"
        )
    if config.ulysses == 1 and config.ring == 1:
        return model
    _check_supported(model, mesh)
    context_gather = ContextGather(mesh.ulysses_group) if config.ulysses > 1 else None
    for layer in model.layers:
        core = layer.self_attn.core
        if config.ring > 1:
            core = RingAttention(core, mesh.ring_group)
        if config.ulysses > 1:
            core = UlyssesAttention(
                core,
                mesh.ulysses_group,
                num_heads=model.config.num_attention_heads,
                num_kv_heads=model.config.kv_heads,
                gather_hidden=not isinstance(core, CORES_WITHOUT_HIDDEN),
                context_gather=context_gather,
            )
        layer.self_attn.core = core
    return model
