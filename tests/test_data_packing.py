"""Packing invariants: every token lands once, rows carry document ids, per-document positions
and pre-shifted labels masked at document boundaries, all equal to a straightforward
per-document construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longctx.data.packing import (
    IGNORE_INDEX,
    TokenDocument,
    collate,
    pack_layout,
    pack_row,
    text_document,
)
from longctx.data.sample import Sample

PAD_ID = 2


def _random_documents(rng: np.random.Generator, count: int, max_len: int) -> list[TokenDocument]:
    """Documents of random ids (10..999) and random scored masks; lengths 1..max_len."""
    documents = []
    for _ in range(count):
        n = int(rng.integers(1, max_len + 1))
        ids = rng.integers(10, 1000, size=n).astype(np.int64)
        documents.append(TokenDocument(ids, rng.random(n) < 0.7))
    return documents


def _reference_row(documents: list[TokenDocument], seq_len: int) -> dict[str, list[int]]:
    """The row built document by document in plain Python: what packing must equal."""
    row = {"input_ids": [], "labels": [], "position_ids": [], "doc_ids": []}
    for doc_id, doc in enumerate(documents):
        n = len(doc)
        for j in range(n):
            row["input_ids"].append(int(doc.ids[j]))
            row["position_ids"].append(j)
            row["doc_ids"].append(doc_id)
            next_is_target = j + 1 < n and bool(doc.scored[j + 1])
            row["labels"].append(int(doc.ids[j + 1]) if next_is_target else IGNORE_INDEX)
    pad = seq_len - len(row["input_ids"])
    row["input_ids"] += [PAD_ID] * pad
    row["labels"] += [IGNORE_INDEX] * pad
    row["position_ids"] += list(range(pad))
    row["doc_ids"] += [len(documents)] * pad
    return row


@pytest.mark.parametrize("seed", range(5))
def test_pack_row_equals_per_document_construction(seed):
    rng = np.random.default_rng(seed)
    documents = _random_documents(rng, count=int(rng.integers(1, 6)), max_len=40)
    seq_len = sum(map(len, documents)) + int(rng.integers(0, 8))  # sometimes no padding
    packed = pack_row(documents, seq_len, PAD_ID)
    reference = _reference_row(documents, seq_len)
    for key, expected in reference.items():
        assert packed[key].dtype == np.int64
        assert packed[key].tolist() == expected, key


def test_labels_are_next_tokens_and_never_cross_a_document_boundary():
    rng = np.random.default_rng(7)
    documents = [text_document(rng.integers(10, 1000, size=n), 1, 2) for n in (5, 17, 3, 30)]
    row = pack_row(documents, 64, PAD_ID)
    ids, labels, doc_ids = row["input_ids"], row["labels"], row["doc_ids"]
    boundary = np.append(doc_ids[1:] != doc_ids[:-1], True)  # last token of each document
    assert (labels[boundary] == IGNORE_INDEX).all()
    inside = ~boundary & (doc_ids < len(documents))  # text documents score every next token
    np.testing.assert_array_equal(labels[inside], ids[1:][inside[:-1]])
    # Each document's positions restart at 0 where its id changes.
    starts = np.flatnonzero(np.diff(doc_ids, prepend=-1))
    assert (row["position_ids"][starts] == 0).all()


def test_pack_layout_places_every_token_once_in_order():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 300, size=25).tolist()
    seq_len = 128
    rows = pack_layout(lengths, seq_len)
    flat = [(p.doc, t) for pieces in rows for p in pieces for t in range(p.start, p.end)]
    assert flat == [(d, t) for d, n in enumerate(lengths) for t in range(n)]
    sizes = [sum(p.end - p.start for p in pieces) for pieces in rows]
    assert all(size == seq_len for size in sizes[:-1]) and 0 < sizes[-1] <= seq_len


def test_split_document_continues_as_a_new_document_in_the_next_row():
    long_doc = text_document(np.arange(100, 150), 1, 2)  # 52 tokens
    rows = pack_layout([len(long_doc)], 32)
    second = rows[1][0]
    row = pack_row([long_doc.slice(second.start, second.end)], 32, PAD_ID)
    assert row["input_ids"][0] == long_doc.ids[32]
    assert row["position_ids"][:20].tolist() == list(range(20))  # positions restart
    assert row["labels"][19] == IGNORE_INDEX  # last real token: nothing follows in this row


def test_overfull_row_is_refused():
    documents = _random_documents(np.random.default_rng(0), 3, 10)
    with pytest.raises(ValueError, match="do not fit"):
        pack_row(documents, sum(map(len, documents)) - 1, PAD_ID)


def test_collate_stacks_rows_into_long_tensors():
    rng = np.random.default_rng(1)
    rows = [pack_row(_random_documents(rng, 2, 10), 24, PAD_ID) for _ in range(3)]
    batch = collate(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "doc_ids"}
    for key, tensor in batch.items():
        assert tensor.dtype == torch.long and tensor.shape == (3, 24)
        assert tensor[1].tolist() == rows[1][key].tolist()


@pytest.mark.parametrize("score_prompt", [False, True])
def test_task_document_scores_the_answer_and_eos(score_prompt):
    sample = Sample("passkey", prompt_ids=[1, 50, 51, 52], answer_ids=[60, 61], answer="x")
    row = pack_row([sample.document(eos_id=2, score_prompt=score_prompt)], 8, PAD_ID)
    prompt_labels = [50, 51, 52] if score_prompt else [IGNORE_INDEX] * 3
    # Targets: prompt tokens 1..3 (optional), answer 60, 61 and the eos 2; padding has none.
    assert row["labels"].tolist() == prompt_labels + [60, 61, 2, IGNORE_INDEX, IGNORE_INDEX]
