"""Packed rows of a split: corpus text rows and generated task rows, each a pure function of
(config, tokenizer, split, epoch, row index).

An epoch of a split has ``num_rows`` rows. Rows ``[0, n_text)`` are the corpus documents of the
split (shuffled once by the seed, concatenated, cut into ``seq_len`` rows by ``pack_layout``);
rows ``[n_text, num_rows)`` are generated: each one draws a task by weight and packs samples of
it with lengths in ``task_length_range * seq_len``. With text in the mix, the generated rows
number ``n_text * (task weight / text weight)``, so weights are fractions of rows; without text
an epoch has ``synthetic_rows_per_epoch`` generated rows (scaled by ``eval_fraction`` for the
eval split). Generated rows are drawn afresh each epoch; text rows are the same rows every
epoch, in a new order (the loader permutes row indices).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from longctx.data.config import DataConfig
from longctx.data.corpus import InMemoryCorpus, PreparedCorpus, TokenCorpus, is_prepared
from longctx.data.packing import TokenDocument, pack_row, text_document
from longctx.data.prepare import tokenizer_sha256
from longctx.data.sample import TargetTooShort
from longctx.data.sources import read_documents
from longctx.data.tasks import Task, build_task
from longctx.data.tokenizer import Tokenizer
from longctx.errors import LongctxError

Split = Literal["train", "eval"]
# Stream ids keep the random streams of different purposes apart for one seed.
_STREAM_SPLIT, _STREAM_PACK, _STREAM_TASKS, _STREAM_FIT_CHECK = 0x5B1, 0x9AC, 0x7A5, 0xF17
_FIT_CHECK_DRAWS = 8
_SPLIT_CODE = {"train": 0, "eval": 1}


class CorpusDocuments(Sequence[TokenDocument]):
    """A lazy sequence of corpus documents: item ``k`` is tokens ``starts[k]:ends[k]`` of
    ``[bos] + tokens.document(doc_ids[k]) + [eos]``. Only these index arrays (one entry per
    document) live in memory; the tokens are read from ``tokens`` (a memory map for a prepared
    corpus) when an item is built."""

    def __init__(
        self,
        tokens: TokenCorpus,
        doc_ids: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        bos_id: int | None,
        eos_id: int,
    ):
        self.tokens, self.doc_ids, self.starts, self.ends = tokens, doc_ids, starts, ends
        self.bos_id, self.eos_id = bos_id, eos_id

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        whole = text_document(self.tokens.document(int(self.doc_ids[k])), self.bos_id, self.eos_id)
        return whole.slice(int(self.starts[k]), int(self.ends[k]))

    def lengths(self) -> np.ndarray:
        """Token count of every item, ``[len(self)]`` int64."""
        return (self.ends - self.starts).astype(np.int64)


@dataclass(frozen=True)
class Corpus:
    """Corpus documents (``[bos] + text + [eos]`` each), split into train and held-out eval
    documents. The eval documents also serve perplexity-by-length evaluation."""

    train_documents: CorpusDocuments
    eval_documents: CorpusDocuments


def corpus_tokens(config: DataConfig, tokenizer: Tokenizer) -> TokenCorpus:
    """The token documents of ``config.sources``: a prepared directory is memory-mapped (after
    checking it was tokenized by ``tokenizer``); raw sources are read and tokenized in memory,
    exact duplicates dropped (first copy kept) so no held-out text is also trained on."""
    sources = list(config.sources)
    prepared = [s for s in sources if is_prepared(s)]
    if prepared:
        if len(sources) != 1:
            raise LongctxError(
                f"data.sources {sources} mixes a prepared corpus with other sources; use one "
                "prepared directory, or prepare all sources into one with `longctx data prepare`"
            )
        corpus = PreparedCorpus(prepared[0])
        corpus.check_tokenizer(
            tokenizer_sha256(tokenizer.model_bytes()), f"the run's tokenizer {tokenizer.path!r}"
        )
        return corpus
    texts = list(dict.fromkeys(doc.text for doc in read_documents(sources)))
    return InMemoryCorpus(tokenizer.encode_batch(texts))


def load_corpus(config: DataConfig, tokenizer: Tokenizer) -> Corpus:
    """The corpus of ``config.sources`` with about ``eval_fraction`` of its tokens held out.

    Whole documents are held out, chosen by the seed. A corpus of a single document holds out
    the tail ``eval_fraction`` of its tokens instead, so a one-file corpus still has an eval
    split. Only per-document index arrays are built, so this costs O(documents), not O(tokens).
    """
    tokens = corpus_tokens(config, tokenizer)
    extra = 1 + (tokenizer.bos_id is not None)
    lengths = tokens.document_lengths() + extra  # [n] with bos/eos
    n = len(lengths)

    def documents(ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> CorpusDocuments:
        return CorpusDocuments(tokens, ids, starts, ends, tokenizer.bos_id, tokenizer.eos_id)

    everything = np.arange(n, dtype=np.int64)
    if config.eval_fraction == 0.0:
        return Corpus(documents(everything, np.zeros(n, np.int64), lengths), documents(*_none()))
    if n == 1:
        cut = int(lengths[0]) - max(1, round(config.eval_fraction * int(lengths[0])))
        zero, one = np.zeros(1, np.int64), np.ones(1, np.int64)
        return Corpus(documents(zero, zero, cut * one), documents(zero, cut * one, lengths.copy()))
    # Hold out documents in a seeded order until they make ``eval_fraction`` of the tokens.
    order = np.random.default_rng([config.seed, _STREAM_SPLIT]).permutation(n)
    cumulative = np.cumsum(lengths[order])  # [n]
    held_out = int(np.searchsorted(cumulative, config.eval_fraction * cumulative[-1], "right"))
    held_out = min(n - 1, max(1, held_out))
    is_eval = np.zeros(n, dtype=bool)
    is_eval[order[:held_out]] = True
    train_ids, eval_ids = everything[~is_eval], everything[is_eval]
    return Corpus(
        documents(train_ids, np.zeros(len(train_ids), np.int64), lengths[train_ids]),
        documents(eval_ids, np.zeros(len(eval_ids), np.int64), lengths[eval_ids]),
    )


def _none() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    empty = np.zeros(0, dtype=np.int64)
    return empty, empty, empty


class PackedDataset:
    """The rows of one split; ``row(epoch, index)`` builds row ``index`` of ``epoch``."""

    def __init__(
        self, config: DataConfig, tokenizer: Tokenizer, split: Split, corpus: Corpus | None
    ):
        if split == "eval" and config.eval_fraction == 0.0:
            raise LongctxError(
                "the eval split is empty because data.eval_fraction is 0; set it above 0 "
                "(e.g. 0.05) or skip evaluation"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.split = split
        self.split_code = _SPLIT_CODE[split]
        self.seq_len = config.seq_len
        weights = config.active_tasks()
        text_weight = weights.pop("text", 0.0)
        self.task_names = sorted(weights)
        task_weights = np.asarray([weights[name] for name in self.task_names], dtype=np.float64)
        self.task_probs = task_weights / task_weights.sum() if self.task_names else task_weights
        self.tasks: dict[str, Task] = {
            name: build_task(name, config.task_params) for name in self.task_names
        }
        low, high = config.task_length_range
        self.task_min_tokens = max(1, math.ceil(low * self.seq_len))
        self.task_max_tokens = max(self.task_min_tokens, math.floor(high * self.seq_len))

        n_text = 0
        if text_weight > 0:
            if corpus is None:
                raise ValueError("the mix has text, so PackedDataset needs the corpus")
            n_text = self._pack_text(corpus)
        if n_text:
            n_generated = round(n_text * float(task_weights.sum()) / text_weight)
        elif split == "train":
            n_generated = config.synthetic_rows_per_epoch
        else:
            n_generated = max(1, round(config.eval_fraction * config.synthetic_rows_per_epoch))
        self.num_text_rows = n_text
        self.num_rows = n_text + (n_generated if self.task_names else 0)
        self._check_tasks_fit()

    def _pack_text(self, corpus: Corpus) -> int:
        """Shuffle the split's documents once and cut their concatenation into rows of
        ``seq_len`` (the rows ``pack_layout`` makes); returns the row count. Only the order and
        the cumulative ends (one int64 each per document) are kept; ``_text_row`` finds a
        row's pieces by binary search."""
        documents = corpus.train_documents if self.split == "train" else corpus.eval_documents
        order = np.random.default_rng(
            [self.config.seed, _STREAM_PACK, self.split_code]
        ).permutation(len(documents))
        self._text_documents = documents
        self._text_order = order  # [n]
        self._text_ends = np.cumsum(documents.lengths()[order])  # [n]
        total = int(self._text_ends[-1]) if len(order) else 0
        return -(-total // self.seq_len)

    def _text_row(self, index: int) -> list[TokenDocument]:
        """The pieces of text row ``index``: stream tokens ``[index*seq_len, +seq_len)``."""
        low = index * self.seq_len
        high = min(low + self.seq_len, int(self._text_ends[-1]))
        pieces = []
        k = int(np.searchsorted(self._text_ends, low, side="right"))
        while low < high:
            doc_end = int(self._text_ends[k])
            doc_start = int(self._text_ends[k - 1]) if k else 0
            take_end = min(high, doc_end)
            document = self._text_documents[int(self._text_order[k])]
            pieces.append(document.slice(low - doc_start, take_end - doc_start))
            low, k = take_end, k + 1
        return pieces

    def _check_tasks_fit(self) -> None:
        """Generate each task a few times at the row length, so a seq_len too short for a task
        fails now with the task's one-line error instead of in the middle of training. (A
        task's fixed text varies a little with its random content, hence several draws.)"""
        for task in self.tasks.values():
            for draw in range(_FIT_CHECK_DRAWS):
                rng = np.random.default_rng([self.config.seed, _STREAM_FIT_CHECK, draw])
                task.sample(rng, self.seq_len, self.tokenizer)

    def row(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """Row ``index`` of ``epoch``: ``{input_ids, labels, position_ids, doc_ids}``, each
        ``[seq_len]`` int64 (see ``longctx.data.packing``)."""
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} outside [0, {self.num_rows})")
        if index < self.num_text_rows:
            documents = self._text_row(index)
        else:
            documents = self._generated_row(epoch, index - self.num_text_rows)
        return pack_row(documents, self.seq_len, self.tokenizer.eos_id)

    def _generated_row(self, epoch: int, index: int) -> list[TokenDocument]:
        """Samples of one task (drawn by weight) packed until no further sample fits.

        A target length below what a drawn sample's fixed text needs (short rows, or a low
        ``task_length_range``) is retried at the needed length with fresh content; the row
        stops when even that does not fit.
        """
        rng = np.random.default_rng(
            [self.config.seed, _STREAM_TASKS, self.split_code, epoch, index]
        )
        task = self.tasks[self.task_names[int(rng.choice(len(self.task_names), p=self.task_probs))]]
        documents: list[TokenDocument] = []
        room = self.seq_len
        while room >= self.task_min_tokens:
            target = int(rng.integers(self.task_min_tokens, min(self.task_max_tokens, room) + 1))
            sample = None
            while sample is None:
                try:
                    sample = task.sample(rng, target, self.tokenizer)
                except TargetTooShort as short:
                    if short.needed > room:
                        if documents:
                            return documents
                        raise
                    target = short.needed
            documents.append(sample.document(self.tokenizer.eos_id, self.config.task_prompt_loss))
            room -= len(sample)
        return documents


@dataclass(frozen=True)
class DataSplits:
    """The train rows, the eval rows (None when ``eval_fraction`` is 0) and the corpus they were
    packed from (None without text in the mix; perplexity evaluation reads its eval documents)."""

    train: PackedDataset
    eval: PackedDataset | None
    corpus: Corpus | None


def build_datasets(config: DataConfig, tokenizer: Tokenizer) -> DataSplits:
    """Both splits of ``config``; the corpus is read and tokenized once for both."""
    corpus = load_corpus(config, tokenizer) if config.active_tasks().get("text") else None
    train = PackedDataset(config, tokenizer, "train", corpus)
    held_out = PackedDataset(config, tokenizer, "eval", corpus) if config.eval_fraction else None
    return DataSplits(train, held_out, corpus)
