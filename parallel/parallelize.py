"""Apply sequence parallelism to a plain single-device model (the torchtitan ``parallelize``).

The model file has no distributed code: every attention layer delegates its inner attention to
one seam, ``layers[i].self_attn.core`` (``(q, k, v, ctx) -> out``). ``parallelize`` swaps that
core, in place, for one with the same signature that computes the same attention over the
sequence-parallel group:

    ring > 1                 RingAttention(core, ring_group)
    ulysses > 1              UlyssesAttention(core, ulysses_group)
    ulysses > 1 and ring > 1 UlyssesAttention(RingAttention(core, ring_group), ulysses_group)

Ring attention needs a core whose softmax merges block by block (``DenseAttention`` and its
block-sparse subclasses). Other cores that opt in (``accepts_gathered_keys``: score-based
position encodings, sparse variants) run under the ring group by key-gather context
parallelism instead (``KeyGatherAttention``: local queries against all-gathered keys).

Ulysses sits outside ring: its all-to-all gives each rank the ring shard of a head subset, and
ring attention then runs across ring ranks on it (``ParallelMesh.shard_batch`` lays the tokens
out to match). Data parallelism needs nothing here: DeepSpeed sees every rank as data parallel.
Everything is validated before any layer changes, so a bad combination leaves the model intact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from longctx.attention.config import AttentionConfig
from longctx.attention.dense import DenseAttention
from longctx.attention.factory import build_attention_core
from longctx.attention.scored import ScoredAttention
from longctx.errors import LongctxError
from longctx.model.state_names import keep_inner_names
from longctx.parallel.config import ParallelConfig
from longctx.parallel.key_gather import KeyGatherAttention, accepts_gathered_keys
from longctx.parallel.mesh import ParallelMesh
from longctx.parallel.ring import RingAttention
from longctx.parallel.ulysses import ContextGather, UlyssesAttention, check_ulysses_heads
from longctx.positional.config import PositionalConfig

if TYPE_CHECKING:  # parallel sits below model; only the config's shape is read here
    from longctx.model.config import ModelConfig

SEQUENCE_PARALLEL_CORES = (RingAttention, UlyssesAttention)
# Cores that never read ctx.hidden: Ulysses need not gather the layer input for them.
CORES_WITHOUT_HIDDEN = (DenseAttention, RingAttention, ScoredAttention)


def check_core_supported(core: nn.Module, config: ParallelConfig, layer_index: int) -> None:
    """One-line LongctxError when one layer's attention core cannot run under ``config``.

    The one owner of the rule "which cores sequence parallelism serves": ring attention runs
    only over ``DenseAttention`` (it merges partial softmaxes block by block); Ulysses runs any
    core on the full sequence of a head subset. A core that is already sequence parallel means
    ``parallelize`` ran twice.
    """
    if isinstance(core, SEQUENCE_PARALLEL_CORES):
        raise LongctxError(
            f"layer {layer_index} attention is already sequence parallel ({type(core).__name__}); "
            "call parallelize once per model"
        )
    if config.ring > 1 and not accepts_gathered_keys(core):
        raise LongctxError(
            f"attention core {type(core).__name__} of layer {layer_index} does not support ring "
            f"attention (parallel.ring {config.ring}); use parallel.ulysses for this "
            "variant or attention.variant: dense"
        )


def _ring_core(core: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """The ring-group form of ``core``: ring attention for dense cores, key gather otherwise."""
    if isinstance(core, DenseAttention):
        return keep_inner_names(RingAttention(core, mesh.ring_group), "local")
    gather_hidden = getattr(core, "reads_key_hidden", False)
    wrapper = KeyGatherAttention(core, mesh.ring_group, gather_hidden=gather_hidden)
    return keep_inner_names(wrapper, "inner")


def check_recipe_supported(
    model_config: ModelConfig,
    attention: AttentionConfig,
    positional: PositionalConfig,
    config: ParallelConfig,
) -> None:
    """The checks ``parallelize`` makes, from the recipe alone (before any rank starts).

    The launcher and each worker call it so that a bad combination is a one-line error (exit 2)
    instead of a failure after the workers started. Layer 0's core is built by the attention
    factory (the core's type depends only on the variant and the position encoding, so one layer
    stands for all) and checked with ``check_core_supported``; the heads with
    ``check_ulysses_heads``.
    """
    if config.ulysses > 1:
        check_ulysses_heads(model_config.num_attention_heads, model_config.kv_heads, config.ulysses)
    if config.ring > 1:
        core = build_attention_core(
            model_config,
            attention,
            positional,
            layer_index=0,
            sliding_window=model_config.sliding_window,
        )
        check_core_supported(core, config, 0)


def _check_supported(model: nn.Module, mesh: ParallelMesh) -> None:
    """One-line LongctxError for a model/mesh pair that sequence parallelism cannot serve."""
    config = mesh.config
    if config.ulysses > 1:
        check_ulysses_heads(model.config.num_attention_heads, model.config.kv_heads, config.ulysses)
    for index, layer in enumerate(model.layers):
        check_core_supported(layer.self_attn.core, config, index)


def _reads_hidden(core: nn.Module) -> bool:
    """Whether ``core`` (or the core a key-gather wrapper holds) reads ``ctx.hidden``: Ulysses
    all-gathers the layer input only for those."""
    if isinstance(core, KeyGatherAttention):
        core = core.inner
    return not isinstance(core, CORES_WITHOUT_HIDDEN)


def _restrict_to_rank_heads(core: nn.Module, num_heads: int, mesh: ParallelMesh) -> None:
    """A core with per-head parameters (``restrict_to_heads``: BAM, per-head CoPE, NSA's gates,
    MoSA's dense/routed split and routers) computes, on a Ulysses rank, the contiguous block of
    query heads the all-to-all hands that rank."""
    if hasattr(core, "restrict_to_heads"):
        per_rank = num_heads // mesh.config.ulysses
        core.restrict_to_heads(mesh.ulysses_rank * per_rank, (mesh.ulysses_rank + 1) * per_rank)


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
    for layer in model.layers:
        core = layer.self_attn.core
        if config.ulysses > 1:  # on the core itself, before a ring wrapper hides it
            _restrict_to_rank_heads(core, model.config.num_attention_heads, mesh)
        if config.ring > 1:
            core = _ring_core(core, mesh)
        if config.ulysses > 1:
            core = UlyssesAttention(
                core,
                mesh.ulysses_group,
                num_heads=model.config.num_attention_heads,
                num_kv_heads=model.config.kv_heads,
                gather_hidden=_reads_hidden(core),
                context_gather=context_gather,
            )
            keep_inner_names(core, "exchange.local_attn.core")
        layer.self_attn.core = core
    return model
