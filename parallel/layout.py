"""Zigzag sequence layout for causal load balance under ring attention (SPECS 1.3).

With ring size P the sequence is cut into 2P equal chunks and rank r holds chunks r and
2P-1-r, in that order, so every rank gets one early and one late chunk and the causal work is
the same on all ranks (a contiguous split gives the last rank about 2P-1 times the work of the
first). Example P=2, T=8: rank 0 holds positions [0, 1, 6, 7], rank 1 holds [2, 3, 4, 5].

Every rank keeps the GLOBAL sequence index of each token it holds (``zigzag_positions``): the
causal mask and RoPE use them, so attention on a shard is attention on the full sequence.
This module is the one owner of the layout: the loader, ring attention, evaluation and tests
all call it.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from longctx.errors import LongctxError

log = logging.getLogger(__name__)

# What each field of a training batch is padded with when the length must grow.
PAD_VALUES = {"input_ids": 0, "labels": -100, "doc_ids": -1}


def _chunk_len(seq_len: int, world: int) -> int:
    if seq_len % (2 * world):
        raise LongctxError(
            f"sequence length {seq_len} is not divisible by 2 x ring = {2 * world}; "
            f"use a length that is a multiple of {2 * world} or let the loader pad it"
        )
    return seq_len // (2 * world)


def zigzag_positions(seq_len: int, rank: int, world: int) -> Tensor:
    """Global sequence indices held by ``rank`` of ``world``: LongTensor [seq_len / world]."""
    chunk = _chunk_len(seq_len, world)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    last_start = (2 * world - 1 - rank) * chunk
    second = torch.arange(last_start, last_start + chunk)
    return torch.cat([first, second])


def zigzag_shard(x: Tensor, dim: int, rank: int, world: int) -> Tensor:
    """This rank's zigzag shard of ``x`` along ``dim`` (length T -> T / world)."""
    _chunk_len(x.shape[dim], world)
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def zigzag_unshard(shards: list[Tensor], dim: int) -> Tensor:
    """Inverse of ``zigzag_shard``: the full tensor from all ranks' shards (ordered by rank)."""
    world = len(shards)
    ordered: list[Tensor | None] = [None] * (2 * world)
    for rank, shard in enumerate(shards):
        head, tail = shard.chunk(2, dim=dim)
        ordered[rank] = head
        ordered[2 * world - 1 - rank] = tail
    return torch.cat(ordered, dim=dim)


def padded_length(seq_len: int, world: int) -> int:
    """Smallest length >= seq_len that the zigzag layout of ``world`` ranks can split."""
    multiple = 2 * world
    return -(-seq_len // multiple) * multiple


def pad_batch(batch: dict[str, Tensor], world: int) -> dict[str, Tensor]:
    """Pad every [B, T] field at the end so that T divides into 2 x world chunks.

    Padded tokens carry label -100 (no loss) and doc id -1 (they attend only to each other),
    and position ids continue counting; they sit after every real token, so under the causal
    mask no real token can see them. Logs when padding happens.
    """
    seq_len = batch["input_ids"].shape[1]
    target = padded_length(seq_len, world)
    if target == seq_len:
        return batch
    extra = target - seq_len
    log.info(
        "padding sequence length %d -> %d (%d masked tokens) for ring %d",
        seq_len,
        target,
        extra,
        world,
    )
    padded = {}
    for name, value in batch.items():
        if name == "position_ids":
            tail = value[:, -1:] + torch.arange(1, extra + 1, device=value.device)
        else:
            tail = torch.full(
                (value.shape[0], extra),
                PAD_VALUES.get(name, 0),
                dtype=value.dtype,
                device=value.device,
            )
        padded[name] = torch.cat([value, tail], dim=1)
    return padded


def zigzag_shard_batch(batch: dict[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
    """This rank's zigzag shard of a [B, T] batch, plus ``seq_positions`` [T / world].

    Pads first when T is not divisible by 2 x world (see ``pad_batch``).
    """
    batch = pad_batch(batch, world)
    seq_len = batch["input_ids"].shape[1]
    shard = {name: zigzag_shard(value, 1, rank, world) for name, value in batch.items()}
    shard["seq_positions"] = zigzag_positions(seq_len, rank, world).to(batch["input_ids"].device)
    return shard


def causal_work(positions: Tensor) -> int:
    """Number of (query, key) pairs a rank computes under the causal mask: sum of (pos + 1)."""
    return int((positions + 1).sum())
