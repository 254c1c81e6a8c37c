"""Packed rows of a split: corpus text rows and generated task rows, each a pure function of
(config, tokenizer, split, epoch, row index).

An epoch of a split has ``num_rows`` rows. Rows ``[0, n_text)`` are the corpus documents of the
split (shuffled once by the seed, concatenated, cut into ``seq_len`` rows by ``pack_layout``;
in a mixture the training documents are drawn by weight first, ``longctx.data.mixture``);
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

from longctx.data.chat import chat_documents
from longctx.data.config import DataConfig
from longctx.data.corpus import InMemoryCorpus, PreparedCorpus, TokenCorpus, is_prepared
from longctx.data.mixture import plan_mixture
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
    """Corpus documents (``[bos] + text + [eos]`` each, or rendered conversations of chat
    sources), split into train and held-out eval documents. The eval documents also serve
    perplexity-by-length evaluation. Plain text sources give lazy ``CorpusDocuments`` (index
    arrays over a memory-mapped prepared corpus or in-memory tokens); chat sources and
    mixtures give lists of documents. In a mixture (``data.sources`` with weights, or
    ``data.long_upsampling``), ``train_source_ids`` (``[len(train_documents)]`` int64) says which
    source each training document came from (``source_names``); without one it is None."""

    train_documents: Sequence[TokenDocument]
    eval_documents: Sequence[TokenDocument]
    train_source_ids: np.ndarray | None = None
    source_names: tuple[str, ...] = ()


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


def is_mixture(config: DataConfig) -> bool:
    """Whether the training documents are drawn by ``longctx.data.mixture`` (weights or
    long-document upsampling given) rather than each taken once."""
    weighted = any(spec.weight is not None for spec in config.source_specs())
    return weighted or config.long_upsampling is not None


def load_corpus(config: DataConfig, tokenizer: Tokenizer) -> Corpus:
    """The corpus of ``config.sources`` with about ``eval_fraction`` of its tokens held out.

    Whole documents are held out, chosen by the seed: of the pooled corpus, or in a weighted
    mixture of each source on its own (so every source keeps training documents). A corpus (or
    source) of a single document holds out the tail ``eval_fraction`` of its tokens instead, so
    a one-file corpus still has an eval split. Plain text sources (raw or one prepared
    directory) build only per-document index arrays: O(documents), not O(tokens).
    """
    specs = config.source_specs()
    if not is_mixture(config) and all(spec.format != "chat" for spec in specs):
        return _lazy_corpus(config, tokenizer)
    if any(is_prepared(spec.path) for spec in specs):
        raise LongctxError(
            "a prepared corpus cannot be part of a weighted mixture, long_upsampling or chat "
            "data yet; list its raw sources instead, or train on the prepared directory alone"
        )
    groups = _source_documents(config, tokenizer)
    if not any(spec.weight is not None for spec in config.source_specs()):
        pooled = [document for group in groups for document in group]
        train, held_out = _hold_out(pooled, config.eval_fraction, [config.seed, _STREAM_SPLIT])
        if not is_mixture(config):
            return Corpus(train, held_out)
        return Corpus(train, held_out, np.zeros(len(train), dtype=np.int64), ("all sources",))
    train, held_out, source_ids = [], [], []
    for index, group in enumerate(groups):
        part, part_held_out = _hold_out(
            group, config.eval_fraction, [config.seed, _STREAM_SPLIT, index]
        )
        train += part
        held_out += part_held_out
        source_ids += [index] * len(part)
    names = tuple(spec.path for spec in config.source_specs())
    return Corpus(train, held_out, np.asarray(source_ids, dtype=np.int64), names)


def _source_documents(config: DataConfig, tokenizer: Tokenizer) -> list[list[TokenDocument]]:
    """The documents of each entry of ``config.sources``, in order. Exact duplicate texts are
    dropped (first copy kept, across sources), so no held-out text is also trained on."""
    seen: set[str] = set()
    groups = []
    for spec in config.source_specs():
        if spec.format == "chat":
            groups.append(chat_documents([spec.path], tokenizer))
            continue
        texts = [d.text for d in read_documents([spec.path]) if d.text not in seen]
        texts = list(dict.fromkeys(texts))
        seen.update(texts)
        groups.append(
            [
                text_document(ids, tokenizer.bos_id, tokenizer.eos_id)
                for ids in tokenizer.encode_batch(texts)
            ]
        )
    return groups


def _hold_out(
    documents: list[TokenDocument], fraction: float, seed: list[int]
) -> tuple[list[TokenDocument], list[TokenDocument]]:
    """(train, held out) documents: about ``fraction`` of the tokens held out (module
    docstring of ``load_corpus``)."""
    if fraction == 0.0 or not documents:
        return documents, []
    if len(documents) == 1:
        whole = documents[0]
        cut = len(whole) - max(1, round(fraction * len(whole)))
        return [whole.slice(0, cut)], [whole.slice(cut, len(whole))]
    # Hold out documents in a seeded order until they make ``fraction`` of the tokens.
    order = np.random.default_rng(seed).permutation(len(documents))
    tokens = np.cumsum([len(documents[i]) for i in order])  # [n]
    held_out = int(np.searchsorted(tokens, fraction * tokens[-1], side="right"))
    held_out = min(len(documents) - 1, max(1, held_out))
    eval_set = set(order[:held_out].tolist())
    train = [d for i, d in enumerate(documents) if i not in eval_set]
    return train, [documents[i] for i in sorted(eval_set)]


def _lazy_corpus(config: DataConfig, tokenizer: Tokenizer) -> Corpus:
    """``load_corpus`` for plain text sources without a mixture (see there)."""
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
        self.mixture_description: str | None = None
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
        """Order the split's documents (the training documents drawn by the mixture when there
        is one, ``longctx.data.mixture``, else each document once in a seeded shuffle) and cut
        their concatenation into rows of ``seq_len`` (the rows ``pack_layout`` makes); returns
        the row count. Only the order and the cumulative ends (one int64 each per document) are
        kept; ``_text_row`` finds a row's pieces by binary search."""
        documents = corpus.train_documents if self.split == "train" else corpus.eval_documents
        rng = np.random.default_rng([self.config.seed, _STREAM_PACK, self.split_code])
        if self.split == "train" and corpus.train_source_ids is not None:
            documents = self._mixed_documents(corpus, rng)
            order = np.arange(len(documents))
        else:
            order = rng.permutation(len(documents))
        if isinstance(documents, CorpusDocuments):
            lengths = documents.lengths()
        else:
            lengths = np.asarray([len(d) for d in documents], dtype=np.int64)
        self._text_documents = documents
        self._text_order = order  # [n]
        self._text_ends = np.cumsum(lengths[order])  # [n]
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

    def _mixed_documents(self, corpus: Corpus, rng: np.random.Generator) -> list[TokenDocument]:
        """One epoch's draws of the mixture, in order; sets ``mixture_description``."""
        groups: list[list[TokenDocument]] = [[] for _ in corpus.source_names]
        for document, source in zip(corpus.train_documents, corpus.train_source_ids.tolist()):
            groups[source].append(document)
        specs = self.config.source_specs()
        weights = [1.0] if len(groups) == 1 else [spec.weight for spec in specs]
        plan = plan_mixture(
            [InMemoryCorpus([d.ids for d in group]) for group in groups],
            weights,
            self.config.long_upsampling,
            rng,
            corpus.source_names,
        )
        self.mixture_description = plan.describe(corpus.source_names, self.config.long_upsampling)
        return [groups[s][d] for s, d in zip(plan.sources.tolist(), plan.documents.tolist())]

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
