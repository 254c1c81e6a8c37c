"""The one batch path: what every batch goes through before the model sees it.

Training (``trainer/loop.py``), the in-training loss evaluation and the sequence scorer
(perplexity, passkey, needles, algorithmic tasks: ``eval/sequence_scorer.py``) all call
``prepare_batch``, so a model is fed the same way whatever the caller:

1. the attention core's batch transform (``transform``: e.g. Landmark inserts its landmark
   tokens; the identity for most cores) runs on the WHOLE sequence, since what it adds is
   defined on global positions;
2. ``rope_seq_len``, the length RoPE's length-dependent scalings (dynamic NTK, LongRoPE) see,
   is read from the whole sequence: ``position_ids.max() + 1`` over the batch, exactly what the
   unsharded forward computes when it is not given one (with packed documents, whose
   ``position_ids`` restart, that is the longest document's length, not ``T``). Computed here,
   before sharding and padding, no collective is needed and every rank of a
   sequence-parallel group uses the same frequencies as the unsharded model;
3. under sequence parallelism (``mesh`` with ``ulysses x ring > 1``) the batch is cut to this
   rank's tokens (``ParallelMesh.shard_batch``: padding, zigzag over ring, contiguous over
   Ulysses, ``seq_positions``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from longctx.parallel.mesh import ParallelMesh

Batch = dict[str, Any]  # [B, T] tensors, plus seq_positions [T] and the int rope_seq_len
BatchTransform = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def rope_seq_len(batch: dict[str, Tensor]) -> int:
    """The sequence length the unsharded forward gives RoPE for ``batch``: ``max(position_ids)
    + 1`` over every row (``T`` when the batch has no ``position_ids``: they default to
    ``arange(T)``)."""
    position_ids = batch.get("position_ids")
    if position_ids is None:
        return batch["input_ids"].shape[1]
    return int(position_ids.max()) + 1


def prepare_batch(
    batch: dict[str, Tensor],
    *,
    mesh: ParallelMesh | None = None,
    transform: BatchTransform | None = None,
) -> Batch:
    """This rank's model inputs from a packed ``batch`` of its sequence-parallel group.

    ``batch``: ``input_ids`` and optionally ``labels``, ``position_ids``, ``doc_ids``, each
    ``[B, T]``. Returns the keyword arguments of ``ModelWithLoss.forward`` /
    ``Transformer.forward_hidden``: the (transformed, sharded) fields, ``position_ids`` (filled
    with ``arange(T)`` when absent, so shards carry their global positions), ``seq_positions``
    ``[n]`` under a mesh, and ``rope_seq_len`` (see the module docstring for the order).
    """
    if transform is not None:
        batch = transform(batch)
    if "position_ids" not in batch:
        rows, length = batch["input_ids"].shape
        positions = torch.arange(length, device=batch["input_ids"].device)
        batch = {**batch, "position_ids": positions.expand(rows, length)}
    length = rope_seq_len(batch)
    if mesh is not None and mesh.config.sp > 1:
        batch = mesh.shard_batch(batch)
    return {**batch, "rope_seq_len": length}
