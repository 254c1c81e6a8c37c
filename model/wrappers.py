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
from collections.abc import Iterator

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


class CheckpointedLayer(LayerWrapper):
    """Recompute the wrapped layer's activations in backward instead of storing them, except
    what the attention kernel returned.

    Between forward and backward the layer keeps its inputs and its attention kernels' outputs
    (out ``[B, H, T, D]`` and the log-sum-exp ``[B, H, T]`` per kernel call: about two more
    ``[B, T, d]`` tensors); backward recomputes the norms, projections, RoPE and MLP but not the
    attention forward, the largest recomputed cost of a long sequence (at 16k tokens the
    4-layer bench/peer.py step dropped from 0.94x to 0.74x of transformers' time with this and
    the fused loss). Non-reentrant ``torch.utils.checkpoint`` with a selective-checkpoint
    policy (composes with ZeRO-3's parameter hooks and with inputs that need no grad), the RNG
    state preserved so the recomputation draws what the forward drew.

    With the tiled MLP (``mlp.seq_chunk`` set) the layer is checkpointed as two regions: the
    attention half as above, then the MLP half (norm, MLP, residual) chunk by chunk, each chunk
    its own checkpoint (``checkpointed_chunks``). Nesting the MLP's chunk checkpoints inside one
    layer checkpoint would run the MLP forward three times (forward, the layer's recompute, the
    chunks' recompute); as two regions it runs twice, for one more kept ``[B, T, d]`` tensor
    (the half-way residual, the chunks' input).
    """

    def forward(self, *args, **kwargs):
        chunk = self.wrapped.mlp.seq_chunk
        whole = self.wrapped if chunk is None else self.wrapped.attention_residual
        out = checkpoint(
            whole,
            *args,
            use_reentrant=False,
            preserve_rng_state=True,
            context_fn=_selective_contexts,
            **kwargs,
        )
        if chunk is None:
            return out
        return checkpointed_chunks(self.wrapped.mlp_residual, out, chunk)  # [B, T, d]


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_attention_outputs)


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


def wrap_layers(model: nn.Module, wrapper: type[LayerWrapper]) -> None:
    """Replace every ``model.layers[i]`` by ``wrapper(model.layers[i])``, in place."""
    for index, layer in enumerate(model.layers):
        model.layers[index] = wrapper(layer)
