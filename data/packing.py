"""Packing documents into fixed-length rows with document ids, per-document positions and
pre-shifted, boundary-masked labels.

The batch format every consumer relies on (one row shown; a batch stacks rows into ``[B, T]``):

    input_ids[t]     token t of the row
    labels[t]        token t+1 when it belongs to the same document AND is scored, else -100
                     (already shifted: a sequence-parallel shard computes its loss locally)
    position_ids[t]  position of token t inside its document (restarts at 0 per document)
    doc_ids[t]       index of token t's document within the row: 0, 1, 2, ... (non-decreasing)

A document longer than the room left in a row is split: its continuation starts the next row
as a new document (positions restart at 0; no label crosses the row end). Padding at the end of
a row (only when nothing else fits) is one more document of ``pad_id`` tokens with no labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "labels", "position_ids", "doc_ids")


@dataclass(frozen=True)
class TokenDocument:
    """Token ids of one document and which of them are loss targets.

    ``scored[j]`` says whether token ``j`` is predicted (from token ``j-1``) in the loss; token 0
    never is. Corpus text scores everything; a task scores its answer (and the eos after it).
    """

    ids: np.ndarray  # [n] int64
    scored: np.ndarray  # [n] bool

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, start: int, end: int) -> TokenDocument:
        """Tokens ``start:end`` as a document of their own (a piece of a split document)."""
        return TokenDocument(self.ids[start:end], self.scored[start:end])


def text_document(token_ids: Sequence[int], bos_id: int | None, eos_id: int) -> TokenDocument:
    """A corpus document: ``[bos] + tokens + [eos]``, every token after the first scored."""
    head = [] if bos_id is None else [bos_id]
    ids = np.asarray([*head, *token_ids, eos_id], dtype=np.int64)
    return TokenDocument(ids, np.ones(len(ids), dtype=bool))


@dataclass(frozen=True)
class Piece:
    """Tokens ``start:end`` of document ``doc`` placed in a row."""

    doc: int
    start: int
    end: int


def pack_layout(doc_lengths: Sequence[int], seq_len: int) -> list[list[Piece]]:
    """Cut the concatenation of the documents (in the given order) into rows of ``seq_len``.

    Every token lands in exactly one row; only the last row may be shorter than ``seq_len``.
    """
    rows: list[list[Piece]] = []
    current: list[Piece] = []
    room = seq_len
    for doc, length in enumerate(doc_lengths):
        start = 0
        while start < length:
            take = min(room, length - start)
            current.append(Piece(doc, start, start + take))
            start += take
            room -= take
            if room == 0:
                rows.append(current)
                current, room = [], seq_len
    if current:
        rows.append(current)
    return rows


def pack_row(
    documents: Sequence[TokenDocument], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """One row ``{input_ids, labels, position_ids, doc_ids}``, each ``[seq_len]`` int64.

    ``documents`` must fit (total length <= seq_len); the rest of the row is padding.
    """
    lengths = np.asarray([len(d) for d in documents], dtype=np.int64)  # [k]
    used = int(lengths.sum())
    if used > seq_len:
        raise ValueError(f"documents of {used} tokens do not fit a row of {seq_len}")
    pad = seq_len - used
    if pad:
        lengths = np.append(lengths, pad)
    ids = np.concatenate([d.ids for d in documents] + [np.full(pad, pad_id, dtype=np.int64)])
    scored = np.concatenate([d.scored for d in documents] + [np.zeros(pad, dtype=bool)])
    doc_ids = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)  # [T]
    doc_starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # [T]
    position_ids = np.arange(seq_len, dtype=np.int64) - doc_starts  # [T]
    # labels[t] = ids[t+1] where t+1 is a scored token of the same document.
    same_doc_next = doc_ids[1:] == doc_ids[:-1]  # [T-1]
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    keep = same_doc_next & scored[1:]
    labels[:-1][keep] = ids[1:][keep]
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}


def collate(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows into the batch dict of ``[B, T]`` LongTensors."""
    return {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in BATCH_KEYS}
