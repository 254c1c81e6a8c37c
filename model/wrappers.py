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

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longctx.model.state_names import keep_inner_names

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


class CheckpointedLayer(LayerWrapper):
    """Recompute the wrapped layer's activations in backward instead of storing them.

    Only the layer's inputs stay alive between forward and backward. Non-reentrant
    ``torch.utils.checkpoint`` (composes with ZeRO-3's parameter hooks and with inputs that need
    no grad), with the RNG state preserved so the recomputation draws what the forward drew.
    """

    def forward(self, *args, **kwargs):
        return checkpoint(
            self.wrapped, *args, use_reentrant=False, preserve_rng_state=True, **kwargs
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


def wrap_layers(model: nn.Module, wrapper: type[LayerWrapper]) -> None:
    """Replace every ``model.layers[i]`` by ``wrapper(model.layers[i])``, in place."""
    for index, layer in enumerate(model.layers):
        model.layers[index] = wrapper(layer)
