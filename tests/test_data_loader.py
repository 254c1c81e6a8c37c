"""The resumable data-parallel loader: a loader restored from a state_dict yields exactly what
the uninterrupted loader yields; data-parallel ranks never share a row in an epoch and together
cover it; the held-out split is disjoint from training; the config validates up front."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from longctx.data.config import DataConfig
from longctx.data.dataset import PackedDataset, build_datasets, load_corpus
from longctx.data.filler import filler_sentences
from longctx.data.loader import PackedLoader
from longctx.data.packing import IGNORE_INDEX
from longctx.data.tokenizer import load_tokenizer, task_vocabulary_texts, train_tokenizer
from longctx.errors import LongctxError

MIXED = {"text": 0.5, "passkey": 0.2, "flip_flop": 0.15, "niah": 0.15}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(["builtin"], 1000, str(out), extra_texts=tuple(task_vocabulary_texts(0)))
    return load_tokenizer(str(out))


def _config(**overrides) -> DataConfig:
    fields = {"seq_len": 512, "tasks": MIXED, "task_length_range": (0.5, 1.0), "seed": 11}
    fields.update(overrides)
    return DataConfig(**fields)


def _batches_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_loader_yields_exactly_the_uninterrupted_batches(tokenizer):
    config = _config()
    uninterrupted = PackedLoader(build_datasets(config, tokenizer).train, 4, dp_rank=1, dp_size=2)
    steps = uninterrupted.batches_per_epoch + 3  # the run crosses an epoch boundary
    interrupted_at = uninterrupted.batches_per_epoch - 2
    expected = list(itertools.islice(iter(uninterrupted), steps))

    # Same data, a fresh process: build everything again, run to the interruption, save.
    first = PackedLoader(build_datasets(config, tokenizer).train, 4, dp_rank=1, dp_size=2)
    before = list(itertools.islice(iter(first), interrupted_at))
    state = first.state_dict()
    resumed = PackedLoader(build_datasets(config, tokenizer).train, 4, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    after = list(itertools.islice(iter(resumed), steps - interrupted_at))

    assert len(before + after) == len(expected)
    assert all(_batches_equal(x, y) for x, y in zip(before + after, expected))
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert uninterrupted.state_dict()["epoch"] == 1


def test_epochs_differ_in_order_and_in_generated_rows(tokenizer):
    loader = PackedLoader(build_datasets(_config(), tokenizer).train, 2)
    assert not np.array_equal(loader.rank_rows(0), loader.rank_rows(1))
    dataset = loader.dataset
    generated = dataset.num_text_rows  # the first generated row index
    assert not np.array_equal(
        dataset.row(0, generated)["input_ids"], dataset.row(1, generated)["input_ids"]
    )
    # Text rows are the same rows every epoch.
    np.testing.assert_array_equal(dataset.row(0, 0)["input_ids"], dataset.row(5, 0)["input_ids"])


@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_ranks_are_disjoint_and_cover_the_epoch(tokenizer, dp_size):
    train = build_datasets(_config(), tokenizer).train
    batch_size = 2
    loaders = [PackedLoader(train, batch_size, rank, dp_size) for rank in range(dp_size)]
    for epoch in (0, 1):
        per_rank = [set(loader.rank_rows(epoch).tolist()) for loader in loaders]
        union = set().union(*per_rank)
        assert sum(map(len, per_rank)) == len(union)  # disjoint
        assert union <= set(range(train.num_rows))
        assert train.num_rows - len(union) < dp_size * batch_size  # covering, up to a remainder
    # And by content: the ranks' first epoch batches hold pairwise different rows.
    rows = [
        tuple(row.tolist())
        for loader in loaders
        for batch in loader.epoch_batches(0)
        for row in batch["input_ids"]
    ]
    assert len(rows) == len(set(rows))


def test_batches_follow_the_batch_format(tokenizer):
    loader = PackedLoader(build_datasets(_config(), tokenizer).train, 3)
    for batch in itertools.islice(iter(loader), 6):
        ids, labels, positions, doc_ids = (
            batch[k] for k in ("input_ids", "labels", "position_ids", "doc_ids")
        )
        assert all(t.shape == (3, 512) and t.dtype == torch.long for t in batch.values())
        same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]
        scored = labels[:, :-1] != IGNORE_INDEX
        assert torch.equal(labels[:, :-1][scored], ids[:, 1:][scored])  # shifted by one
        assert not (scored & ~same_doc).any()  # never across a document boundary
        assert (labels[:, -1] == IGNORE_INDEX).all()
        # Positions count up inside a document and restart at 0 where the document changes.
        step = positions[:, 1:] - positions[:, :-1]
        assert ((step == 1) == same_doc).all() and (positions[:, 1:][~same_doc] == 0).all()


def test_task_rows_score_only_answers_by_default(tokenizer):
    config = _config(tasks={"passkey": 1.0}, synthetic_rows_per_epoch=8)
    row = build_datasets(config, tokenizer).train.row(0, 0)
    targets = row["labels"][row["labels"] != IGNORE_INDEX].tolist()
    pieces = tokenizer.decode([t for t in targets if t != tokenizer.eos_id]).split()
    assert pieces and all(p.isdigit() and len(p) == 5 for p in pieces)  # only passkey digits
    assert targets.count(tokenizer.eos_id) == len(pieces)  # each answer ends with a scored eos


def test_held_out_documents_never_appear_in_training(tokenizer):
    splits = build_datasets(_config(tasks={"text": 1.0}, eval_fraction=0.1), tokenizer)
    train_docs = {tuple(d.ids.tolist()) for d in splits.corpus.train_documents}
    eval_docs = {tuple(d.ids.tolist()) for d in splits.corpus.eval_documents}
    assert eval_docs and not train_docs & eval_docs
    # About 10% of the tokens are held out, short of it by less than one document.
    lengths = [len(d) for d in [*splits.corpus.train_documents, *splits.corpus.eval_documents]]
    held_out = sum(len(d) for d in splits.corpus.eval_documents)
    assert 0.1 * sum(lengths) - max(lengths) < held_out <= 0.1 * sum(lengths)
    eval_loader = PackedLoader(splits.eval, 1)
    train_rows = {
        tuple(splits.train.row(0, i)["input_ids"].tolist()) for i in range(splits.train.num_rows)
    }
    eval_rows = {tuple(b["input_ids"][0].tolist()) for b in eval_loader.epoch_batches(0)}
    assert eval_rows and not train_rows & eval_rows


def test_state_from_another_layout_is_refused(tokenizer):
    train = build_datasets(_config(), tokenizer).train
    state = PackedLoader(train, 2, 0, 2).state_dict()
    with pytest.raises(LongctxError) as err:
        PackedLoader(train, 2, 0, 4).load_state_dict(state)
    assert "\n" not in str(err.value) and "dp_size=2" in str(err.value)


def test_too_little_data_for_the_layout_is_a_one_line_error(tokenizer):
    train = build_datasets(
        _config(tasks={"passkey": 1.0}, synthetic_rows_per_epoch=5), tokenizer
    ).train
    with pytest.raises(LongctxError) as err:
        PackedLoader(train, 3, 0, 2)
    assert "\n" not in str(err.value) and "5 rows" in str(err.value)


def test_too_short_seq_len_for_a_task_fails_when_the_dataset_is_built(tokenizer):
    with pytest.raises(LongctxError, match="task 'niah' needs at least"):
        PackedDataset(_config(seq_len=64, tasks={"niah": 1.0}), tokenizer, "train", None)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"seq_len": 0}, "greater than 0"),
        ({"tasks": {"passky": 1.0}}, "passkey"),
        ({"tasks": {"text": -1.0, "passkey": 1.0}}, "must be >= 0"),
        ({"tasks": {"text": 0.0}}, "sum to 0"),
        ({"tasks": {"text": 1.0}, "sources": []}, "sources is empty"),
        ({"task_length_range": (0.5, 0.2)}, "0 < min <= max <= 1"),
        ({"seqlen": 512}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_bad_values(fields, fragment):
    with pytest.raises(ValidationError, match=fragment):
        DataConfig(**fields)


def test_generated_eval_rows_come_from_their_own_stream(tokenizer):
    config = _config(tasks={"flip_flop": 1.0}, synthetic_rows_per_epoch=40, eval_fraction=0.25)
    splits = build_datasets(config, tokenizer)
    assert (splits.train.num_rows, splits.eval.num_rows) == (40, 10)
    train_rows = {tuple(splits.train.row(0, i)["input_ids"].tolist()) for i in range(40)}
    eval_rows = {tuple(splits.eval.row(0, i)["input_ids"].tolist()) for i in range(10)}
    assert len(eval_rows) == 10 and not train_rows & eval_rows


def test_short_rows_still_hold_whole_task_samples(tokenizer):
    # 0.25 * 128 = 32 tokens is below a passkey sample's fixed text (~50): those targets are
    # redrawn at the needed length, so every row holds at least one complete sample.
    config = _config(seq_len=128, tasks={"passkey": 1.0}, task_length_range=(0.25, 1.0))
    train = build_datasets(config, tokenizer).train
    for index in range(30):
        row = train.row(0, index)
        targets = row["labels"][row["labels"] != IGNORE_INDEX].tolist()
        answers = tokenizer.decode([t for t in targets if t != tokenizer.eos_id]).split()
        assert answers and all(len(a) == 5 and a.isdigit() for a in answers)
        assert targets.count(tokenizer.eos_id) == len(answers)


def test_single_document_corpus_holds_out_its_tail(tokenizer, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(" ".join(filler_sentences(np.random.default_rng(2), 400)))
    config = _config(sources=[str(book)], tasks={"text": 1.0}, eval_fraction=0.2)
    corpus = load_corpus(config, tokenizer)
    (train,), (held_out,) = corpus.train_documents, corpus.eval_documents
    whole = [tokenizer.bos_id, *tokenizer.encode(book.read_text()), tokenizer.eos_id]
    assert [*train.ids.tolist(), *held_out.ids.tolist()] == whole
    assert len(held_out) == round(0.2 * len(whole))


def test_duplicate_documents_are_read_once(tokenizer, tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("the same short document")
    (tmp_path / "c.txt").write_text("a different document")
    corpus = load_corpus(_config(sources=[str(tmp_path)], eval_fraction=0.0), tokenizer)
    assert len(corpus.train_documents) == 2
