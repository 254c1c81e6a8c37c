"""Apply sequence parallelism to a plain single-device model (the torchtitan ``parallelize``).

The model file has no distributed code: every attention layer delegates its inner attention to
one seam, ``layers[i].self_attn.core`` (``(q, k, v, ctx) -> out``). ``parallelize`` swaps that
core, in place, for one with the same signature that computes the same attention over the
sequence-parallel group:

    ring > 1                 RingAttention(core, ring_group)
    ulysses > 1              UlyssesAttention(core, ulysses_group)
    ulysses > 1 and ring > 1 UlyssesAttention(RingAttention(core, ring_group), ulysses_group)

Which wrapper a core gets is read from its class's capabilities (``AttentionCore``): ring
attention for a core whose softmax ``merges_blockwise`` (``DenseAttention`` and its
block-sparse subclasses); key-gather context parallelism (``KeyGatherAttention``: local queries
against all-gathered keys, and the gathered layer input for ``reads_key_hidden``) for one that
``accepts_gathered_keys`` (score-based position encodings, sparse variants). Ulysses gathers
the layer input for cores that declare ``reads_hidden`` and tells every core its heads
(``restrict_to_heads``: cores with per-head parameters narrow them, S2-attn finds its shifted
half; the others ignore it).

Ulysses sits outside ring: its all-to-all gives each rank the ring shard of a head subset, and
ring attention then runs across ring ranks on it (``ParallelMesh.shard_batch`` lays the tokens
out to match). Data parallelism needs nothing here: DeepSpeed sees every rank as data parallel.
Everything is validated before any layer changes, so a bad combination leaves the model intact.
"""

from __future__ import annotations

from torch import nn

from longctx.attention.config import AttentionConfig
from longctx.attention.core import AttentionCore
from longctx.attention.registry import core_class
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.model.state_names import keep_inner_names
from longctx.parallel.config import ParallelConfig
from longctx.parallel.key_gather import KeyGatherAttention
from longctx.parallel.mesh import ParallelMesh
from longctx.parallel.ring import RingAttention
from longctx.parallel.ulysses import ContextGather, UlyssesAttention, check_ulysses_heads
from longctx.positional.config import PositionalConfig

SEQUENCE_PARALLEL_CORES = (RingAttention, UlyssesAttention)


def runs_under_ring(core: type[nn.Module]) -> bool:
    """Whether a core of this class runs under the ring group: ring attention merges its
    softmax block by block, or key gather hands it every key."""
    return issubclass(core, AttentionCore) and (core.merges_blockwise or core.accepts_gathered_keys)


def _check_ring(core: type[nn.Module], config: ParallelConfig, layer_index: int) -> None:
    if config.ring > 1 and not runs_under_ring(core):
        raise LongctxError(
            f"attention core {core.__name__} of layer {layer_index} does not support ring "
            f"attention (parallel.ring {config.ring}); use parallel.ulysses for this "
            "variant or attention.variant: dense"
        )


def check_core_supported(core: nn.Module, config: ParallelConfig, layer_index: int) -> None:
    """One-line LongctxError when one layer's attention core cannot run under ``config``.

    The one owner of the rule "which cores sequence parallelism serves": the ring group runs
    the ``AttentionCore``s that merge blockwise or accept gathered keys (``runs_under_ring``);
    Ulysses runs any ``AttentionCore`` on the full sequence of a head subset. A core that is
    already sequence parallel means ``parallelize`` ran twice.
    """
    if isinstance(core, SEQUENCE_PARALLEL_CORES):
        raise LongctxError(
            f"layer {layer_index} attention is already sequence parallel ({type(core).__name__}); "
            "call parallelize once per model"
        )
    _check_ring(type(core), config, layer_index)
    if not isinstance(core, AttentionCore):
        raise LongctxError(
            f"attention core {type(core).__name__} of layer {layer_index} is not an "
            "AttentionCore, so sequence parallelism cannot read what it needs; subclass "
            "longctx.attention.AttentionCore"
        )


def _ring_core(core: AttentionCore, mesh: ParallelMesh) -> nn.Module:
    """The ring-group form of ``core``: ring attention when its softmax merges blockwise, key
    gather otherwise (with the layer input gathered for ``reads_key_hidden``)."""
    if core.merges_blockwise:
        return keep_inner_names(RingAttention(core, mesh.ring_group), "local")
    wrapper = KeyGatherAttention(core, mesh.ring_group, gather_hidden=core.reads_key_hidden)
    return keep_inner_names(wrapper, "inner")


def check_recipe_supported(
    model_config: ModelConfig,
    attention: AttentionConfig,
    positional: PositionalConfig,
    config: ParallelConfig,
) -> None:
    """The checks ``parallelize`` makes, from the recipe alone (before any rank starts).

    The launcher and each worker call it so that a bad combination is a one-line error (exit 2)
    instead of a failure after the workers started. Every layer's core has the class the
    attention registry gives for the variant and the position encoding, so its capabilities
    decide (reported as layer 0); the heads are checked with ``check_ulysses_heads``.
    """
    if config.ulysses > 1:
        check_ulysses_heads(model_config.num_attention_heads, model_config.kv_heads, config.ulysses)
    _check_ring(core_class(attention, positional), config, 0)


def _check_supported(model: nn.Module, mesh: ParallelMesh) -> None:
    """One-line LongctxError for a model/mesh pair that sequence parallelism cannot serve."""
    config = mesh.config
    if config.ulysses > 1:
        check_ulysses_heads(model.config.num_attention_heads, model.config.kv_heads, config.ulysses)
    for index, layer in enumerate(model.layers):
        check_core_supported(layer.self_attn.core, config, index)


def parallelize(model: nn.Module, parallel_config: ParallelConfig, mesh: ParallelMesh) -> nn.Module:
    """Swap every layer's attention core for its sequence-parallel form; returns ``model``.

    ``model`` is a ``longctx.model.Transformer`` (anything with ``config`` and
    ``layers[i].self_attn.core``); ``mesh`` comes from ``build_mesh(parallel_config)`` on every
    rank (its ulysses and ring degrees must be ``parallel_config``'s). With
    ``ulysses = ring = 1`` the model is returned unchanged. The model must then be fed this
    rank's tokens from ``mesh.shard_batch`` (with their ``seq_positions``), and its loss taken
    with ``tiled_cross_entropy(..., group=mesh.sp_group)``. Its ``state_dict`` keeps the plain
    model's names (``keep_inner_names``), so checkpoints move between layouts.
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
    num_heads = model.config.num_attention_heads
    for layer in model.layers:
        core = inner = layer.self_attn.core
        if config.ulysses > 1:  # before a ring wrapper hides it
            per_rank = num_heads // config.ulysses
            inner.restrict_to_heads(
                mesh.ulysses_rank * per_rank, (mesh.ulysses_rank + 1) * per_rank
            )
        if config.ring > 1:
            core = _ring_core(inner, mesh)
        if config.ulysses > 1:
            core = UlyssesAttention(
                core,
                mesh.ulysses_group,
                num_heads=num_heads,
                num_kv_heads=model.config.kv_heads,
                gather_hidden=inner.reads_hidden,
                context_gather=context_gather,
            )
            keep_inner_names(core, "exchange.local_attn.core")
        layer.self_attn.core = core
    return model
