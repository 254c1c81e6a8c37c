"""The keys of a sparse core in sequence order, whatever layout sequence parallelism chose.

NSA cuts its keys into compression and selection blocks, MoSA ranks every token of the
sequence, Landmark groups keys into blocks of ``block_size + 1``: all three need the WHOLE
sequence of keys, in order, with key ``j`` at global position ``j``. Their queries, though, can
be any subset of the sequence at any global positions (``ctx.seq_positions``):

- unsharded: queries and keys are ``arange(T)``;
- Ulysses (``parallel/ulysses.py``): the core gets every token of a head subset, in the order the
  all-to-all concatenates the ranks' pieces (``arange(T)`` for the mesh's layout, but any
  permutation is handled here);
- key gather (``parallel/key_gather.py``, the ring group): this rank's zigzag queries against
  every key, already sorted by global position;
- both: the Ulysses group's ring shard of a head subset against every key.

``sequence_keys`` returns the keys and their metadata sorted by ``ctx.k_seq_positions`` and
checks that they are exactly positions ``0 .. Tk-1``; the cores then address keys by global
position and measure causality, windows and blocks on the queries' global positions. Under the
ring group this is exact by construction: each rank all-gathers K and V (``B x Hkv x T x D``,
small next to the activations) instead of SPECS 3.1/3.4's "all-gather the summaries, then fetch
the selected raw blocks", and every summary (NSA's compressed keys, Landmark's landmark logits,
MoSA's router scores) is then computed locally from the gathered keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.context import AttentionContext
from longctx.errors import LongctxError


@dataclass(frozen=True)
class SequenceKeys:
    """Keys, values and key metadata of the whole sequence, key j at global position j."""

    k: Tensor  # [B, Hkv, Tk, D]
    v: Tensor  # [B, Hkv, Tk, D]
    doc_ids: Tensor | None  # [B, Tk]
    hidden: Tensor | None  # [B, Tk, d] the layer input at each key (None when not provided)


def sequence_keys(k: Tensor, v: Tensor, ctx: AttentionContext, variant: str) -> SequenceKeys:
    """``k``, ``v`` [B, Hkv, Tk, D] and ``ctx``'s key-side metadata sorted by global position.

    Raises a one-line LongctxError naming ``variant`` when the keys are not the whole sequence
    ``0 .. Tk-1`` (a core handed a shard of the keys: ring attention without key gather).
    """
    positions = ctx.k_seq_positions  # [Tk]
    length = k.shape[2]
    expected = torch.arange(length, device=positions.device)
    docs, hidden = ctx.k_doc_ids, ctx.k_hidden
    if positions.shape == (length,) and torch.equal(positions, expected):
        return SequenceKeys(k, v, docs, hidden)
    order = positions.argsort()  # [Tk]
    if positions.shape != (length,) or not torch.equal(positions[order], expected):
        raise LongctxError(
            f"attention.variant {variant} needs every key of the sequence (global positions "
            f"0..{length - 1}), but this core got a shard of them; run it unsharded, under "
            "parallel.ulysses, or under parallel.ring through key gather (parallelize)"
        )
    order = order.to(k.device)
    return SequenceKeys(
        k=k.index_select(2, order),
        v=v.index_select(2, order),
        doc_ids=None if docs is None else docs.index_select(1, order),
        hidden=None if hidden is None else hidden.index_select(1, order),
    )
