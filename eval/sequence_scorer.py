"""Scoring one whole evaluation sequence, in this process or over the sequence-parallel mesh.

The evaluation (``eval/evaluate.py``) asks two things of a sequence ``ids [T]``: the NLL of
every next token (perplexity by position), and the argmax and NLL at a few answer positions
(passkey, needles). ``SequenceScorer`` answers both without ever holding ``[T, vocab]`` logits:

- the sequence goes through the one batch path (``longctx.parallel.batch.prepare_batch``), as a
  training batch does: the attention core's batch transform (``transform``, e.g. Landmark's
  landmark tokens), the whole sequence's RoPE length (``rope_seq_len``: dynamic NTK and
  LongRoPE see the real length on every rank, not a shard's largest position nor the padded
  length) and, with a ``ParallelMesh`` (``parallel.ulysses x ring > 1``, a ``parallelize``d
  model), this rank's shard (zigzag over ring, contiguous over Ulysses, padded at the end to
  ``2 x sp`` chunks) with its global positions;
- the decoder runs ``forward_hidden`` once over it; the language-model head is applied to the
  local hidden states only: per-token NLLs through ``tiled_token_nll`` (``chunk`` positions of
  logits at a time), and argmax/NLL only on the local rows that are answer positions;
- the per-token results (one value per local token) are all-gathered over the SP group with each
  token's global index and put back in global order; the scored tokens are then read back in
  order (tokens a transform inserted carry no label, so they drop out), so every rank returns
  the same values the single-process scorer returns.

Labels are shifted the trainer's way (``labels[t] = ids[t + 1]``, -100 = not scored), so each
shard scores its own tokens without a halo.

Under ZeRO-3 the head weight is partitioned; it is gathered for the head computations of each
sequence (a collective: every rank of the world scores the same sequences, as the in-training
evaluation does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from longctx.parallel.batch import BatchTransform, prepare_batch
from longctx.parallel.loss import IGNORE_INDEX, tiled_token_nll

if TYPE_CHECKING:
    from longctx.model import Transformer
    from longctx.parallel.mesh import ParallelMesh

HEAD_CHUNK = 1024  # positions per lm_head tile: [1024, vocab] logits at a time


class SequenceScorer:
    """Runs ``model`` over one sequence at a time and scores its tokens (see the module).

    ``mesh``: None for a single-process model; else the mesh ``model`` was ``parallelize``d on.
    Every rank of ``mesh.sp_group`` must make the same calls with the same ``ids``.
    ``transform``: the attention core's batch transform (the trainer's ``batch_transform_for``;
    None: the identity).
    """

    def __init__(
        self,
        model: Transformer,
        mesh: ParallelMesh | None = None,
        chunk: int = HEAD_CHUNK,
        *,
        transform: BatchTransform | None = None,
    ):
        self.model = model
        self.mesh = mesh if mesh is not None and mesh.config.sp > 1 else None
        self.chunk = chunk
        self.transform = transform

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @torch.no_grad()
    def token_nll(self, ids: Tensor) -> Tensor:
        """NLL ``[T-1]`` (float64, CPU) of tokens ``1..T-1`` of ``ids [T]``: index ``t`` holds
        the NLL of ``ids[t + 1]`` given ``ids[:t + 1]``."""
        labels = torch.full_like(ids, IGNORE_INDEX)  # [T]
        labels[:-1] = ids[1:]
        hidden, local_labels, positions = self._local_hidden(ids, labels)
        with self._head_weight() as weight:
            nll = tiled_token_nll(hidden, weight, local_labels, self.chunk)  # [n]
        return self._scored(nll.double(), local_labels, positions).cpu()

    @torch.no_grad()
    def answer_scores(self, ids: Tensor, first: int, count: int) -> tuple[list[int], float]:
        """Teacher-forced argmax tokens and summed NLL of the ``count`` tokens after position
        ``first`` of ``ids [T]`` (``ids[first + 1 : first + 1 + count]``, the answer when
        ``first`` is the prompt's last position)."""
        labels = torch.full_like(ids, IGNORE_INDEX)  # [T]
        labels[first : first + count] = ids[first + 1 : first + 1 + count]
        hidden, local_labels, positions = self._local_hidden(ids, labels)
        rows = (local_labels != IGNORE_INDEX).nonzero().squeeze(1)  # local answer rows [a]
        predicted = torch.full_like(local_labels, -1)  # [n]
        nll = torch.zeros(local_labels.shape, dtype=torch.float64, device=hidden.device)  # [n]
        with self._head_weight() as weight:
            logits = (hidden[rows] @ weight.t()).float()  # [a, V]
        predicted[rows] = logits.argmax(dim=-1)
        target = local_labels[rows]  # [a]
        nll[rows] = (
            torch.logsumexp(logits, dim=-1) - logits.gather(1, target[:, None])[:, 0]
        ).double()
        tokens = self._scored(predicted, local_labels, positions)  # [count]
        answer_nll = self._scored(nll, local_labels, positions).sum()
        return tokens.tolist(), float(answer_nll)

    def _local_hidden(self, ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's final hidden states ``[n, d]``, labels ``[n]`` and global token indices
        ``[n]`` for the sequence ``ids [T]`` through the batch path (``prepare_batch``; n = T
        without a mesh or transform, else this rank's tokens of the transformed, padded
        sequence)."""
        batch = {"input_ids": ids[None], "labels": labels[None]}  # [1, T] each
        batch = prepare_batch(batch, mesh=self.mesh, transform=self.transform)
        length = batch["input_ids"].shape[1]
        positions = batch.get("seq_positions", torch.arange(length)).to(self.device)  # [n]
        hidden = self.model.forward_hidden(
            batch["input_ids"].to(self.device),
            batch["position_ids"].to(self.device),
            seq_positions=positions,
            rope_seq_len=batch["rope_seq_len"],
        )[0]  # [n, d]
        return hidden, batch["labels"][0].to(self.device), positions

    def _scored(self, values: Tensor, labels: Tensor, positions: Tensor) -> Tensor:
        """The entries of ``values [n]`` at scored tokens (label != -100) of the whole
        sequence, in sequence order, from every rank of the SP group: the scorer's results."""
        return self._global(values, positions)[self._global(labels, positions) != IGNORE_INDEX]

    def _global(self, values: Tensor, positions: Tensor) -> Tensor:
        """``values [n]`` of this rank's tokens at global ``positions [n]`` -> ``[padded T]``
        in global order, from every rank of the SP group."""
        if self.mesh is None:
            return values
        group = self.mesh.sp_group
        size = dist.get_world_size(group)
        all_values = [torch.empty_like(values) for _ in range(size)]
        all_positions = [torch.empty_like(positions) for _ in range(size)]
        dist.all_gather(all_values, values, group=group)
        dist.all_gather(all_positions, positions, group=group)
        ordered = torch.empty(size * values.shape[0], dtype=values.dtype, device=values.device)
        ordered[torch.cat(all_positions)] = torch.cat(all_values)  # [padded T]
        return ordered

    @contextlib.contextmanager
    def _head_weight(self) -> Iterator[Tensor]:
        """``lm_head.weight [V, d]``, gathered for the block when ZeRO-3 partitions it."""
        weight = self.model.lm_head.weight
        if not hasattr(weight, "ds_id"):
            yield weight
            return
        from longctx.parallel.accelerator import import_deepspeed

        with import_deepspeed().zero.GatheredParameters([weight]):
            yield weight
