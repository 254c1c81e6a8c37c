"""Decoder-layer wrappers for the memory options: activation checkpointing and activation offload.

Each wrapper is an ``nn.Module`` that holds one decoder layer as its child ``wrapped`` and runs
it inside a context in ``forward`` (the approach of torch's ``checkpoint_wrapper``): nothing is
monkey-patched on the layer, and the wrappers nest (``OffloadedLayer(CheckpointedLayer(layer))``
offloads what the checkpointed layer saves: its inputs).

The wrapped model keeps the plain model's names everywhere a caller looks:

- ``state_dict`` / ``load_state_dict``: ``keep_inner_names`` (``model/state_names.py``, the one
  owner of that rule, shared with the sequence-parallel core wrappers) drops ``wrapped.``;
- ``named_parameters`` / ``named_modules`` / ``parameters``: ``named_modules`` lists the
  wrapped layer under the wrapper's own name, so ``layers.0.self_attn.q_proj.weight`` stays
  that name (gradients, optimizer groups, HF export see the plain names);
- attribute access: a name the wrapper lacks is looked up on the wrapped layer, so
  ``model.layers[0].self_attn.core`` and ``model.layers[0].mlp`` still work.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from longctx.model.state_names import keep_inner_names
from longctx.model.transformer import checkpointed_chunks

WRAPPED = "wrapped"  # the child name of the wrapped layer (never seen in names outside)


class LayerWrapper(nn.Module):
    """Base of the layer wrappers: holds ``wrapped`` and keeps its names (see the module)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.wrapped = layer
        keep_inner_names(self, WRAPPED)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == WRAPPED:
                raise
            return getattr(self.wrapped, name)

    def named_modules(
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        """This wrapper, then the wrapped layer's modules, all under this wrapper's ``prefix``
        (the wrapper adds no path segment to the names of the layer's modules or parameters)."""
        if memo is None:
            memo = set()
        if self in memo:
            return
        if remove_duplicate:
            memo.add(self)
        yield prefix, self
        yield from self.wrapped.named_modules(memo, prefix, remove_duplicate)


@functools.cache
def _attention_kernel_ops() -> frozenset:
    """The fused attention kernels whose outputs a checkpointed layer keeps: torch's SDPA
    backends (CPU flash, CUDA flash, memory-efficient, cuDNN) and flash-attn 2's forward when
    flash-attn has registered it as a torch op."""
    aten = torch.ops.aten
    ops = {
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
    }
    # flash-attn absent (always on CPU) or too old to register its ops: nothing to add
    with contextlib.suppress(AttributeError, RuntimeError):
        ops.add(torch.ops.flash_attn._flash_attn_forward.default)
    return frozenset(ops)


def _keep_attention_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: store the attention kernels' outputs, recompute the rest."""
    kept = op in _attention_kernel_ops()
    return CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_attention_outputs)


CHECKPOINT_MODES = ("selective", "full")


class CheckpointedLayer(LayerWrapper):
    """Recompute the wrapped layer's activations in backward instead of storing them.

    Two modes (``mode``), torchtitan's names:

    - ``selective`` (the default): keep what the attention kernels returned, so that backward
      recomputes the norms, projections, RoPE and MLP but not the attention forward, the
      largest recomputed cost of a long sequence (at 16k tokens the 4-layer bench/peer.py step
      dropped from 0.94x to 0.74x of transformers' time with this and the fused loss). Between
      forward and backward the layer keeps its input x ``[B, T, d]`` and the kernel outputs:
      out (``[B, T, Hq, D]`` in memory) and the log-sum-exp ``[B, Hq, T]`` per kernel call.
    - ``full``: keep only the layer input and recompute everything, attention included: one
      ``[B, T, Hq*D]`` tensor less per layer for one more attention forward per layer (what
      LongLoRA-style runs, whose state is small, trade for memory).

    Non-reentrant ``torch.utils.checkpoint`` (composes with ZeRO-3's parameter hooks and with
    inputs that need no grad), the RNG state preserved so the recomputation draws what the
    forward drew; ``selective`` adds a selective-checkpoint policy.

    With the tiled MLP (``mlp.seq_chunk`` set) a ``selective`` layer is two checkpointed
    regions: the attention heads from x (``attention_heads``), then the rest of the layer
    (``o_proj``, residuals, MLP) chunk by chunk from the two tensors kept anyway, x and the
    heads' output (``rest_from_heads`` through ``checkpointed_chunks``). Nesting the chunks'
    checkpoints in one layer checkpoint would run the MLP forward three times (forward, the
    layer's recompute, the chunks' recompute); two regions run it twice, and chunking from
    (x, heads) rather than from the half-way residual keeps no third ``[B, T, d]`` tensor.
    A core that projects itself (MoSA) has no heads' output to chunk from, so its first region
    ends at the half-way residual, which the chunks then keep. A ``full`` layer is one
    checkpoint around the whole layer, the tiled MLP's chunk checkpoints nested in it (it keeps
    only x, at that third MLP forward).
    """

    def __init__(self, layer: nn.Module, mode: str = "selective"):
        super().__init__(layer)
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint mode must be one of {CHECKPOINT_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.wrapped
        chunk = layer.mlp.seq_chunk
        if self.mode == "full" or chunk is None:
            return self._checkpoint(layer, x, *args, **kwargs)
        if layer.self_attn.core.projects_itself:
            half = self._checkpoint(layer.attention_residual, x, *args, **kwargs)
            return checkpointed_chunks(layer.mlp_residual, chunk, half)  # [B, T, d]
        heads = self._checkpoint(layer.attention_heads, x, *args, **kwargs)  # [B, T, Hq*D]
        return checkpointed_chunks(layer.rest_from_heads, chunk, x, heads)  # [B, T, d]

    def _checkpoint(self, fn, *args, **kwargs) -> torch.Tensor:
        selective = {"context_fn": _selective_contexts} if self.mode == "selective" else {}
        return checkpoint(
            fn, *args, use_reentrant=False, preserve_rng_state=True, **selective, **kwargs
        )


class OffloadedLayer(LayerWrapper):
    """Keep the tensors the wrapped layer saves for backward in CPU memory.

    The layer runs under ``torch.autograd.graph.save_on_cpu``, which copies each saved tensor to
    CPU memory (pinned when CUDA is present) and back when backward needs it. Around a
    ``CheckpointedLayer`` the saved tensors are the layer inputs, ``[B, T, d]`` per layer, so
    GPU activation memory no longer grows with the number of layers; on a CPU run the tensors
    already live in CPU memory and nothing changes but a copy.
    """

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        self.pin_memory = torch.cuda.is_available()

    def forward(self, *args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=self.pin_memory):
            return self.wrapped(*args, **kwargs)


def wrap_layers(model: nn.Module, wrapper: Callable[[nn.Module], LayerWrapper]) -> None:
    """Replace every ``model.layers[i]`` by ``wrapper(model.layers[i])``, in place."""
    for index, layer in enumerate(model.layers):
        model.layers[index] = wrapper(layer)
