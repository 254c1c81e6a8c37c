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
from dataclasses import dataclass
from typing import Literal

import numpy as np

from longctx.data.config import DataConfig
from longctx.data.packing import TokenDocument, pack_layout, pack_row, text_document
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


@dataclass(frozen=True)
class Corpus:
    """Tokenized corpus documents (``[bos] + text + [eos]`` each), split into train and held-out
    eval documents. The eval documents also serve perplexity-by-length evaluation."""

    train_documents: list[TokenDocument]
    eval_documents: list[TokenDocument]


def load_corpus(config: DataConfig, tokenizer: Tokenizer) -> Corpus:
    """Read and tokenize ``config.sources`` and hold out about ``eval_fraction`` of its tokens.

    Whole documents are held out, chosen by the seed. A corpus of a single document holds out
    the tail ``eval_fraction`` of its tokens instead, so a one-file corpus still has an eval
    split.
    """
    # Exact duplicates are dropped (first copy kept), so no held-out text is also trained on.
    texts = list(dict.fromkeys(doc.text for doc in read_documents(list(config.sources))))
    documents = [
        text_document(ids, tokenizer.bos_id, tokenizer.eos_id)
        for ids in tokenizer.encode_batch(texts)
    ]
    if config.eval_fraction == 0.0:
        return Corpus(documents, [])
    if len(documents) == 1:
        whole = documents[0]
        cut = len(whole) - max(1, round(config.eval_fraction * len(whole)))
        return Corpus([whole.slice(0, cut)], [whole.slice(cut, len(whole))])
    # Hold out documents in a seeded order until they make ``eval_fraction`` of the tokens.
    order = np.random.default_rng([config.seed, _STREAM_SPLIT]).permutation(len(documents))
    tokens = np.cumsum([len(documents[i]) for i in order])  # [n]
    held_out = int(np.searchsorted(tokens, config.eval_fraction * tokens[-1], side="right"))
    held_out = min(len(documents) - 1, max(1, held_out))
    eval_set = set(order[:held_out].tolist())
    train = [d for i, d in enumerate(documents) if i not in eval_set]
    return Corpus(train, [documents[i] for i in sorted(eval_set)])


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

        self._text_rows: list[list[TokenDocument]] = []
        if text_weight > 0:
            if corpus is None:
                raise ValueError("the mix has text, so PackedDataset needs the corpus")
            self._text_rows = self._pack_text(corpus)
        n_text = len(self._text_rows)
        if n_text:
            n_generated = round(n_text * float(task_weights.sum()) / text_weight)
        elif split == "train":
            n_generated = config.synthetic_rows_per_epoch
        else:
            n_generated = max(1, round(config.eval_fraction * config.synthetic_rows_per_epoch))
        self.num_text_rows = n_text
        self.num_rows = n_text + (n_generated if self.task_names else 0)
        self._check_tasks_fit()

    def _pack_text(self, corpus: Corpus) -> list[list[TokenDocument]]:
        documents = corpus.train_documents if self.split == "train" else corpus.eval_documents
        order = np.random.default_rng(
            [self.config.seed, _STREAM_PACK, self.split_code]
        ).permutation(len(documents))
        documents = [documents[i] for i in order]
        layout = pack_layout([len(d) for d in documents], self.seq_len)
        return [[documents[p.doc].slice(p.start, p.end) for p in pieces] for pieces in layout]

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
            documents = self._text_rows[index]
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
