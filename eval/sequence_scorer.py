"""Scoring one whole evaluation sequence, in this process or over the sequence-parallel mesh.

The evaluation (``eval/evaluate.py``) asks two things of a sequence ``ids [T]``: the NLL of
every next token (perplexity by position), and the argmax and NLL at a few answer positions
(passkey, needles). ``SequenceScorer`` answers both without ever holding ``[T, vocab]`` logits:

- the decoder runs ``forward_hidden`` once over the sequence. Without a mesh this process holds
  all ``T`` tokens; with a ``ParallelMesh`` (``parallel.ulysses x ring > 1``, a ``parallelize``d
  model) each rank of the sequence-parallel group holds its ``mesh.shard_batch`` shard (zigzag
  over ring, contiguous over Ulysses, padded at the end to ``2 x sp`` chunks) with its global
  positions, exactly as in training;
- the language-model head is applied to the local hidden states only: per-token NLLs through
  ``tiled_token_nll`` (``chunk`` positions of logits at a time), and argmax/NLL only on the local
  rows that are answer positions;
- the per-token results (one value per local token) are all-gathered over the SP group with each
  token's global index and put back in global order, so every rank returns the same ``[T]``
  values the single-process scorer returns.

Labels are shifted the trainer's way (``labels[t] = ids[t + 1]``, -100 = not scored), so each
shard scores its own tokens without a halo. RoPE's length-dependent scalings (dynamic NTK,
LongRoPE) see the real length ``T`` on every rank (``rope_seq_len``), not a shard's largest
position nor the padded length.

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

from longctx.parallel.loss import IGNORE_INDEX, tiled_token_nll

if TYPE_CHECKING:
    from longctx.model import Transformer
    from longctx.parallel.mesh import ParallelMesh

HEAD_CHUNK = 1024  # positions per lm_head tile: [1024, vocab] logits at a time


class SequenceScorer:
    """Runs ``model`` over one sequence at a time and scores its tokens (see the module).

    ``mesh``: None for a single-process model; else the mesh ``model`` was ``parallelize``d on.
    Every rank of ``mesh.sp_group`` must make the same calls with the same ``ids``.
    """

    def __init__(
        self, model: Transformer, mesh: ParallelMesh | None = None, chunk: int = HEAD_CHUNK
    ):
        self.model = model
        self.mesh = mesh if mesh is not None and mesh.config.sp > 1 else None
        self.chunk = chunk

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
        return self._global(nll.double(), positions, ids.shape[0])[:-1].cpu()

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
        span = slice(first, first + count)
        tokens = self._global(predicted, positions, ids.shape[0])[span]  # [count]
        answer_nll = self._global(nll, positions, ids.shape[0])[span].sum()
        return tokens.tolist(), float(answer_nll)

    def _local_hidden(self, ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's final hidden states ``[n, d]``, labels ``[n]`` and global token indices
        ``[n]`` for the sequence ``ids [T]`` (n = T without a mesh, else the padded shard)."""
        length = ids.shape[0]
        batch = {
            "input_ids": ids[None].to(self.device),  # [1, T]
            "labels": labels[None].to(self.device),  # [1, T]
            "position_ids": torch.arange(length, device=self.device)[None],  # [1, T]
        }
        if self.mesh is None:
            positions = torch.arange(length, device=self.device)
        else:
            batch = self.mesh.shard_batch(batch)  # every field [1, n], plus seq_positions [n]
            positions = batch["seq_positions"]
        hidden = self.model.forward_hidden(
            batch["input_ids"], batch["position_ids"], seq_positions=positions, rope_seq_len=length
        )[0]  # [n, d]
        return hidden, batch["labels"][0], positions

    def _global(self, values: Tensor, positions: Tensor, length: int) -> Tensor:
        """``values [n]`` of this rank's tokens at global ``positions [n]`` -> ``[length]`` in
        global order, from every rank of the SP group (padding tokens dropped)."""
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
        return ordered[:length]

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
