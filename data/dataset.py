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
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from longctx.data.config import DataConfig, SourceSpec
from longctx.data.corpus import PreparedCorpus, is_prepared
from longctx.data.mixture import plan_mixture
from longctx.data.packing import TokenDocument, pack_row, text_document
from longctx.data.prepare import prepare_cached, tokenizer_sha256
from longctx.data.sample import TargetTooShort
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
    document ``doc_ids[k]`` of ``corpora[sources[k]]``, a text document being ``[bos] + tokens +
    [eos]`` (every token after the first scored) and a chat document its rendered tokens with
    the assistant mask. Only these index arrays (one int64 entry each per document) live in
    memory; the tokens are read from the corpora's memory maps when an item is built."""

    def __init__(
        self,
        corpora: Sequence[PreparedCorpus],
        sources: np.ndarray,
        doc_ids: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        bos_id: int | None,
        eos_id: int,
    ):
        self.corpora = corpora
        self.sources, self.doc_ids, self.starts, self.ends = sources, doc_ids, starts, ends
        self.bos_id, self.eos_id = bos_id, eos_id

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        corpus, doc = self.corpora[int(self.sources[k])], int(self.doc_ids[k])
        if corpus.kind == "chat":
            ids = np.asarray(corpus.document(doc), dtype=np.int64)
            whole = TokenDocument(ids, corpus.document_mask(doc))
        else:
            whole = text_document(corpus.document(doc), self.bos_id, self.eos_id)
        return whole.slice(int(self.starts[k]), int(self.ends[k]))

    def lengths(self) -> np.ndarray:
        """Token count of every item, ``[len(self)]`` int64."""
        return (self.ends - self.starts).astype(np.int64)

    def subset(self, items: np.ndarray) -> CorpusDocuments:
        """Items ``items`` (``[m]`` int64 positions, repeats allowed) in that order."""
        return self.view(*(getattr(self, name)[items] for name in _ITEM_ARRAYS))

    def view(self, *arrays: np.ndarray) -> CorpusDocuments:
        """Items given by new ``sources, doc_ids, starts, ends`` arrays over the same corpora."""
        return CorpusDocuments(self.corpora, *arrays, self.bos_id, self.eos_id)

    @staticmethod
    def concat(parts: Sequence[CorpusDocuments]) -> CorpusDocuments:
        """The items of ``parts`` (views of the same corpora) one after another."""
        arrays = [np.concatenate([getattr(p, a) for p in parts]) for a in _ITEM_ARRAYS]
        return parts[0].view(*arrays)


_ITEM_ARRAYS = ("sources", "doc_ids", "starts", "ends")


@dataclass(frozen=True)
class Corpus:
    """Corpus documents (``[bos] + text + [eos]`` each, or rendered conversations of chat
    sources), split into train and held-out eval documents. The eval documents also serve
    perplexity-by-length evaluation. Both are lazy ``CorpusDocuments`` over the memory-mapped
    prepared corpora of the sources. In a mixture (``data.sources`` with weights, or
    ``data.long_upsampling``), ``train_source_ids`` (``[len(train_documents)]`` int64) says which
    source each training document came from (``source_names``); without one it is None."""

    train_documents: CorpusDocuments
    eval_documents: CorpusDocuments
    train_source_ids: np.ndarray | None = None
    source_names: tuple[str, ...] = ()


def source_corpus(
    spec: SourceSpec, tokenizer: Tokenizer, data_dir: str | Path | None
) -> PreparedCorpus:
    """The prepared corpus of one ``data.sources`` entry, memory-mapped: a prepared directory
    as it is (after checking it was tokenized by ``tokenizer``), raw sources prepared first
    (``prepare_cached``) into ``data_dir``, or, without one, into a temporary directory that
    lives as long as the corpus."""
    if is_prepared(spec.path):
        corpus = PreparedCorpus(spec.path)
        corpus.check_tokenizer(
            tokenizer_sha256(tokenizer.model_bytes()), f"the run's tokenizer {tokenizer.path!r}"
        )
        return corpus
    if data_dir is not None:
        return PreparedCorpus(prepare_cached([spec.path], spec.format, tokenizer, data_dir))
    scratch = tempfile.TemporaryDirectory(prefix="longctx-data-")
    directory = prepare_cached([spec.path], spec.format, tokenizer, scratch.name)
    return PreparedCorpus(directory, keep_alive=scratch)


def is_mixture(config: DataConfig) -> bool:
    """Whether the training documents are drawn by ``longctx.data.mixture`` (weights or
    long-document upsampling given) rather than each taken once."""
    weighted = any(spec.weight is not None for spec in config.source_specs())
    return weighted or config.long_upsampling is not None


def load_corpus(
    config: DataConfig, tokenizer: Tokenizer, data_dir: str | Path | None = None
) -> Corpus:
    """The corpus of ``config.sources`` with about ``eval_fraction`` of its tokens held out.

    Every source is a memory-mapped prepared corpus (``source_corpus``; raw sources are
    prepared into ``data_dir`` once). Exact duplicate documents are dropped (the first copy
    kept, across sources), so no held-out text is also trained on. Whole documents are held
    out, chosen by the seed: of the pooled corpus, or in a weighted mixture of each source on
    its own (so every source keeps training documents). A corpus (or source) of a single
    document holds out the tail ``eval_fraction`` of its tokens instead, so a one-file corpus
    still has an eval split. Only per-document index arrays are built: O(documents), not
    O(tokens).
    """
    specs = config.source_specs()
    corpora = [source_corpus(spec, tokenizer, data_dir) for spec in specs]
    everything = _unique_documents(corpora, tokenizer)
    if not any(spec.weight is not None for spec in specs):
        train, held_out = _hold_out(everything, config.eval_fraction, [config.seed, _STREAM_SPLIT])
        if not is_mixture(config):
            return Corpus(train, held_out)
        return Corpus(train, held_out, np.zeros(len(train), dtype=np.int64), ("all sources",))
    parts = [
        _hold_out(
            everything.subset(np.flatnonzero(everything.sources == index)),
            config.eval_fraction,
            [config.seed, _STREAM_SPLIT, index],
        )
        for index in range(len(specs))
    ]
    train = CorpusDocuments.concat([part for part, _ in parts])
    held_out = CorpusDocuments.concat([part for _, part in parts])
    return Corpus(train, held_out, train.sources.copy(), tuple(spec.path for spec in specs))


def _unique_documents(corpora: list[PreparedCorpus], tokenizer: Tokenizer) -> CorpusDocuments:
    """Every document of ``corpora`` in order, whole, exact duplicates (equal keys) dropped."""
    keys = np.concatenate([corpus.document_keys() for corpus in corpora])
    sources = np.concatenate(
        [np.full(c.num_documents, s, dtype=np.int64) for s, c in enumerate(corpora)]
    )
    doc_ids = np.concatenate([np.arange(c.num_documents, dtype=np.int64) for c in corpora])
    extra = 1 + (tokenizer.bos_id is not None)
    lengths = np.concatenate(
        [c.document_lengths() + (extra if c.kind == "text" else 0) for c in corpora]
    )
    first = np.sort(np.unique(keys, return_index=True)[1])  # [unique] positions
    return CorpusDocuments(
        corpora,
        sources[first],
        doc_ids[first],
        np.zeros(len(first), dtype=np.int64),
        lengths[first],
        tokenizer.bos_id,
        tokenizer.eos_id,
    )


def _hold_out(
    documents: CorpusDocuments, fraction: float, seed: list[int]
) -> tuple[CorpusDocuments, CorpusDocuments]:
    """(train, held out) documents: about ``fraction`` of the tokens held out (module
    docstring of ``load_corpus``)."""
    n = len(documents)
    if fraction == 0.0 or n == 0:
        return documents, documents.subset(np.zeros(0, dtype=np.int64))
    lengths = documents.lengths()
    if n == 1:
        cut = documents.starts + int(lengths[0]) - max(1, round(fraction * int(lengths[0])))
        head = documents.view(documents.sources, documents.doc_ids, documents.starts, cut)
        return head, documents.view(documents.sources, documents.doc_ids, cut, documents.ends)
    # Hold out documents in a seeded order until they make ``fraction`` of the tokens.
    order = np.random.default_rng(seed).permutation(n)
    cumulative = np.cumsum(lengths[order])  # [n]
    held_out = int(np.searchsorted(cumulative, fraction * cumulative[-1], side="right"))
    held_out = min(n - 1, max(1, held_out))
    is_eval = np.zeros(n, dtype=bool)
    is_eval[order[:held_out]] = True
    return documents.subset(np.flatnonzero(~is_eval)), documents.subset(np.flatnonzero(is_eval))


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
        lengths = documents.lengths()
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

    def _mixed_documents(self, corpus: Corpus, rng: np.random.Generator) -> CorpusDocuments:
        """One epoch's draws of the mixture, in order; sets ``mixture_description``."""
        train, source_ids = corpus.train_documents, corpus.train_source_ids
        members = [np.flatnonzero(source_ids == s) for s in range(len(corpus.source_names))]
        lengths = train.lengths()
        specs = self.config.source_specs()
        weights = [1.0] if len(members) == 1 else [spec.weight for spec in specs]
        plan = plan_mixture(
            [lengths[m] for m in members],
            weights,
            self.config.long_upsampling,
            rng,
            corpus.source_names,
        )
        self.mixture_description = plan.describe(corpus.source_names, self.config.long_upsampling)
        items = np.zeros(len(plan.sources), dtype=np.int64)
        for source, member in enumerate(members):
            drawn = plan.sources == source
            items[drawn] = member[plan.documents[drawn]]
        return train.subset(items)

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


def build_datasets(
    config: DataConfig, tokenizer: Tokenizer, data_dir: str | Path | None = None
) -> DataSplits:
    """Both splits of ``config``; the corpus is opened once for both (raw sources prepared into
    ``data_dir``, ``load_corpus``)."""
    text = config.active_tasks().get("text")
    corpus = load_corpus(config, tokenizer, data_dir) if text else None
    train = PackedDataset(config, tokenizer, "train", corpus)
    held_out = PackedDataset(config, tokenizer, "eval", corpus) if config.eval_fraction else None
    return DataSplits(train, held_out, corpus)
