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
from dataclasses import dataclass
from typing import Literal

import numpy as np

from longctx.data.chat import chat_documents
from longctx.data.config import DataConfig
from longctx.data.corpus import InMemoryCorpus
from longctx.data.mixture import plan_mixture
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
    """Tokenized corpus documents (``[bos] + text + [eos]`` each, or rendered conversations of
    chat sources), split into train and held-out eval documents. The eval documents also serve
    perplexity-by-length evaluation. In a mixture (``data.sources`` with weights, or
    ``data.long_upsampling``), ``train_source_ids`` (``[len(train_documents)]`` int64) says which
    source each training document came from (``source_names``); without one it is None."""

    train_documents: list[TokenDocument]
    eval_documents: list[TokenDocument]
    train_source_ids: np.ndarray | None = None
    source_names: tuple[str, ...] = ()


def is_mixture(config: DataConfig) -> bool:
    """Whether the training documents are drawn by ``longctx.data.mixture`` (weights or
    long-document upsampling given) rather than each taken once."""
    weighted = any(spec.weight is not None for spec in config.source_specs())
    return weighted or config.long_upsampling is not None


def load_corpus(config: DataConfig, tokenizer: Tokenizer) -> Corpus:
    """Read and tokenize ``config.sources`` and hold out about ``eval_fraction`` of its tokens.

    Whole documents are held out, chosen by the seed: of the pooled corpus, or in a weighted
    mixture of each source on its own (so every source keeps training documents). A corpus (or
    source) of a single document holds out the tail ``eval_fraction`` of its tokens instead, so
    a one-file corpus still has an eval split.
    """
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
        self.mixture_description: str | None = None
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
        """Rows of the split's documents: the training documents drawn by the mixture when
        there is one (``longctx.data.mixture``), else each document once; in seeded order."""
        documents = corpus.train_documents if self.split == "train" else corpus.eval_documents
        rng = np.random.default_rng([self.config.seed, _STREAM_PACK, self.split_code])
        if self.split == "train" and corpus.train_source_ids is not None:
            documents = self._mixed_documents(corpus, rng)
        else:
            documents = [documents[i] for i in rng.permutation(len(documents))]
        layout = pack_layout([len(d) for d in documents], self.seq_len)
        return [[documents[p.doc].slice(p.start, p.end) for p in pieces] for pieces in layout]

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
