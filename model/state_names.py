"""Wrappers keep the wrapped module's state-dict names: the one owner of that rule.

Two kinds of wrapper put a module of the plain model one level down: the layer wrappers of
``longctx.model.wrappers`` (activation checkpointing, activation offload) hold a decoder layer
as ``layers.0.wrapped``, and ``parallelize`` puts the attention core inside a sequence-parallel
wrapper (``RingAttention.local``, ``KeyGatherAttention.inner``,
``UlyssesAttention.exchange.local_attn.core``). Left alone, a checkpointed layer would save
``layers.0.wrapped.self_attn.q_proj.weight`` and a core with parameters (BAM slopes, CoPE's
position embeddings, NSA gates, MoSA routers) ``layers.0.self_attn.core.inner.gates.weight``
instead of the plain names, so a checkpoint written under one layout would not load under
another, into a plain model (evaluation, export), or across a stage boundary that changes the
SP degrees or the memory options. ``keep_inner_names`` registers a state-dict post-hook that
drops the wrapper's path from every key and a load pre-hook that puts it back: the wrapped
model's ``state_dict`` has exactly the plain model's names, whatever the layout.
"""

from __future__ import annotations

from torch import nn


def keep_inner_names(wrapper: nn.Module, inner_path: str) -> nn.Module:
    """Make ``wrapper`` save and load the tensors of its submodule at ``inner_path`` (dotted)
    under the wrapper's own prefix; returns ``wrapper``. Nested wrappers compose: the inner
    wrapper's hooks run first on save and last on load."""
    inner_key = inner_path + "."

    def drop_path(module, state_dict, prefix, local_metadata) -> None:
        inner_prefix = prefix + inner_key
        for key in [k for k in state_dict if k.startswith(inner_prefix)]:
            state_dict[prefix + key[len(inner_prefix) :]] = state_dict.pop(key)

    def restore_path(module, state_dict, prefix, *_) -> None:
        inner_prefix = prefix + inner_key
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if not key.startswith(inner_prefix):
                state_dict[inner_prefix + key[len(prefix) :]] = state_dict.pop(key)

    wrapper.register_state_dict_post_hook(drop_path)
    wrapper.register_load_state_dict_pre_hook(restore_path)
    return wrapper
