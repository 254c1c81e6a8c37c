"""The data-parallel, exactly resumable loader of packed micro-batches.

Order: in epoch ``e`` the row indices ``0..N-1`` of the split are permuted by a generator seeded
with ``(seed, split, e)``. Data-parallel rank ``r`` of ``dp_size`` takes the permuted indices
``r, r + dp_size, r + 2*dp_size, ...`` (so ranks never share a row in an epoch), truncated to a
whole number of micro-batches that is the same on every rank (at most ``dp_size *
micro_batch_size - 1`` rows of an epoch are skipped, different ones each epoch). Micro-batch
``b`` of rank ``r`` is its rows ``b*B .. b*B+B-1``.

Because every row is a pure function of (config, tokenizer, split, epoch, index), the loader's
whole state is the pair (epoch, next micro-batch): ``state_dict()`` saves it, and a loader given
it by ``load_state_dict()`` yields exactly the micro-batches the uninterrupted loader would have.
All ranks of a run hold the same state, so saving rank 0's is enough. Sequence-parallel ranks
of one data-parallel group build the same loader (same ``dp_rank``) and shard the ``[B, T]``
batch afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from longctx.data.dataset import PackedDataset
from longctx.data.packing import collate
from longctx.errors import LongctxError

_STREAM_ORDER = 0x0DE


class PackedLoader:
    """Micro-batches ``{input_ids, labels, position_ids, doc_ids}`` (``[B, T]`` LongTensors) of
    one split for one data-parallel rank.

    Iterating continues from the current state and runs through epochs without end; the state
    advances before each batch is handed out, so ``state_dict()`` taken after receiving a batch
    resumes at the batch after it.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if micro_batch_size <= 0:
            raise LongctxError(
                f"micro_batch_size={micro_batch_size} must be positive; use 1 or more"
            )
        if not 0 <= dp_rank < dp_size:
            raise LongctxError(
                f"dp_rank={dp_rank} is outside [0, dp_size={dp_size}); give a rank below dp_size"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        rows_per_rank = dataset.num_rows // dp_size
        self.batches_per_epoch = rows_per_rank // micro_batch_size
        if self.batches_per_epoch == 0:
            raise LongctxError(
                f"the {dataset.split} split has {dataset.num_rows} rows of {dataset.seq_len} "
                f"tokens, fewer than dp_size * micro_batch_size = {dp_size * micro_batch_size}; "
                "add data, or lower micro_batch_size or data.seq_len"
            )
        self.epoch = 0
        self.next_batch = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def rank_rows(self, epoch: int) -> np.ndarray:
        """Row indices this rank reads in ``epoch``, in order: ``[batches_per_epoch * B]``."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            seed = [self.dataset.config.seed, _STREAM_ORDER, self.dataset.split_code, epoch]
            order = np.random.default_rng(seed).permutation(self.dataset.num_rows)
            count = self.batches_per_epoch * self.micro_batch_size
            self._order_cache = (epoch, order[self.dp_rank :: self.dp_size][:count])
        return self._order_cache[1]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` of ``epoch`` for this rank (does not touch the state)."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} outside [0, {self.batches_per_epoch})")
        size = self.micro_batch_size
        rows = self.rank_rows(epoch)[index * size : (index + 1) * size]
        return collate([self.dataset.row(epoch, int(row)) for row in rows])

    def epoch_batches(self, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """All micro-batches of one epoch, independent of the state (for evaluation passes)."""
        for index in range(self.batches_per_epoch):
            yield self.batch(epoch, index)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self.next_batch >= self.batches_per_epoch:
                self.epoch, self.next_batch = self.epoch + 1, 0
            epoch, index = self.epoch, self.next_batch
            self.next_batch += 1
            yield self.batch(epoch, index)

    def _fingerprint(self) -> dict[str, int | str]:
        """What must match for a saved position to mean the same rows."""
        dataset = self.dataset
        return {
            "split": dataset.split,
            "seed": dataset.config.seed,
            "seq_len": dataset.seq_len,
            "num_rows": dataset.num_rows,
            "dp_size": self.dp_size,
            "micro_batch_size": self.micro_batch_size,
        }

    def state_dict(self) -> dict[str, int | str]:
        """The position (epoch, next micro-batch) and the fingerprint of the data it refers to."""
        return {"epoch": self.epoch, "next_batch": self.next_batch, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        """Continue from ``state``; refuses a state saved for different data or a different
        data-parallel layout (a changed layout cannot resume at the exact sample)."""
        expected = self._fingerprint()
        for key, value in expected.items():
            if state.get(key) != value:
                raise LongctxError(
                    f"data loader state has {key}={state.get(key)!r} but this run has "
                    f"{key}={value!r}; resume with the same data config and parallel layout, "
                    "or start a new run"
                )
        epoch, next_batch = int(state["epoch"]), int(state["next_batch"])
        if epoch < 0 or not 0 <= next_batch <= self.batches_per_epoch:
            raise LongctxError(
                f"data loader state position epoch={epoch}, next_batch={next_batch} is outside "
                f"an epoch of {self.batches_per_epoch} batches; the checkpoint is damaged"
            )
        self.epoch, self.next_batch = epoch, next_batch
