"""Sentencepiece tokenizers: train one on a corpus, or load a ``tokenizer.model`` (also the one
inside a Hugging Face checkpoint directory).

Trained tokenizers are BPE with byte fallback (any UTF-8 text encodes, no unknown tokens) and
``split_digits`` (every digit is its own token, so passkeys and counts are spelled digit by
digit); ids 0/1/2 are unk/bos/eos, as in Llama's tokenizer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm

from longctx.data.config import DataConfig
from longctx.data.filler import filler_sentences
from longctx.data.sources import read_documents
from longctx.errors import LongctxError

TOKENIZER_FILENAME = "tokenizer.model"
# Sentencepiece skips lines longer than this many bytes; documents are cut into lines first.
_MAX_LINE_BYTES = 4096
_SENTENCE_SAMPLE = 300_000  # lines sampled for training: bounds time and memory on big corpora
_PIECE_CACHE_LIMIT = 1 << 16


class Tokenizer:
    """A loaded sentencepiece model with the few things the data pipeline needs.

    ``encode`` never adds bos/eos (the packer adds them per document); ``encode_piece`` is a
    memoised ``encode`` for the short strings task generators repeat thousands of times.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, path: str):
        self.processor = processor
        self.path = path
        self.vocab_size = processor.vocab_size()
        bos, eos = processor.bos_id(), processor.eos_id()
        if eos < 0:
            raise LongctxError(
                f"tokenizer {path!r} defines no end-of-sequence token; packing needs one to "
                "separate documents: train one with `longctx tokenizer train`"
            )
        self.bos_id: int | None = bos if bos >= 0 else None
        self.eos_id: int = eos
        self._piece_cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos)."""
        return self.processor.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no bos/eos); one call into sentencepiece for the batch."""
        return self.processor.encode(texts)

    def encode_piece(self, text: str) -> list[int]:
        """``encode(text)``, memoised (bounded cache) for short strings that repeat."""
        ids = self._piece_cache.get(text)
        if ids is None:
            ids = self.processor.encode(text)
            if len(self._piece_cache) < _PIECE_CACHE_LIMIT:
                self._piece_cache[text] = ids
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; bos/eos are dropped."""
        return self.processor.decode([int(i) for i in ids])

    def model_bytes(self) -> bytes:
        """The serialized model, e.g. to store next to a checkpoint."""
        return self.processor.serialized_model_proto()

    def save(self, out: str) -> str:
        """Write the model to ``out`` (a file path); returns it."""
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(self.model_bytes())
        return out


def load_tokenizer(path: str) -> Tokenizer:
    """Load a sentencepiece ``tokenizer.model``, or the one in directory ``path`` (e.g. a Hugging
    Face checkpoint such as Llama or Mistral that ships one)."""
    target = Path(path)
    if target.is_dir():
        inner = target / TOKENIZER_FILENAME
        if not inner.is_file():
            has_json = (target / "tokenizer.json").is_file()
            hint = " (it has tokenizer.json, a format longctx does not read)" if has_json else ""
            raise LongctxError(
                f"directory {path!r} has no {TOKENIZER_FILENAME}{hint}; point data.tokenizer.path "
                "at a sentencepiece model or train one with `longctx tokenizer train`"
            )
        target = inner
    if not target.is_file():
        raise LongctxError(
            f"tokenizer {path!r} does not exist; give the path of a {TOKENIZER_FILENAME} "
            "or train one with `longctx tokenizer train`"
        )
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(target))
    except (RuntimeError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LongctxError(
            f"tokenizer {str(target)!r} is not a sentencepiece model ({first_line}); "
            "give a tokenizer.model file"
        ) from None
    return Tokenizer(processor, str(target))


def train_tokenizer(
    inputs: list[str],
    vocab_size: int,
    out: str,
    *,
    extra_texts: tuple[str, ...] = (),
    num_threads: int = 2,
) -> str:
    """Train a BPE sentencepiece model on ``inputs`` (files, directories or ``builtin``) plus
    ``extra_texts``, write it to ``out`` and return ``out``.

    Refuses to overwrite an existing ``out``. Input problems (missing, empty, binary, not UTF-8)
    raise the one-line errors of ``longctx.data.sources``.
    """
    out_path = Path(out)
    if out_path.exists():
        raise LongctxError(
            f"tokenizer output {out!r} already exists; choose another --out or delete it first"
        )
    if vocab_size <= 0:
        raise LongctxError(f"vocab size {vocab_size} must be positive; use e.g. 2048")
    texts = [doc.text for doc in read_documents(list(inputs))] + list(extra_texts)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".tokenizer-") as workdir:
        corpus = Path(workdir) / "corpus.txt"
        corpus.write_text("\n".join(_training_lines(texts)) + "\n", encoding="utf-8")
        prefix = Path(workdir) / "model"
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type="bpe",
                byte_fallback=True,
                split_digits=True,
                # Every digit is a piece even when the corpus has few numbers (no byte tokens).
                user_defined_symbols=list("0123456789"),
                character_coverage=0.9995,
                input_sentence_size=_SENTENCE_SAMPLE,
                shuffle_input_sentence=True,
                max_sentence_length=_MAX_LINE_BYTES * 2,
                num_threads=num_threads,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                minloglevel=2,
            )
        except RuntimeError as err:
            reason = " ".join(str(err).split())
            raise LongctxError(
                f"tokenizer training with vocab size {vocab_size} failed: {reason}; "
                "lower --vocab-size or add more text"
            ) from None
        # Rename inside the output directory: a crash never leaves a half-written ``out``.
        os.replace(f"{prefix}.model", out_path)
    return out


def resolve_tokenizer(config: DataConfig, run_dir: str) -> Tokenizer:
    """The tokenizer a run uses: ``config.tokenizer.path`` if set; else ``run_dir/tokenizer.model``
    if an earlier attempt of the run trained it; else train it there now on the sources plus
    generated task text (so filler and task words get their own tokens)."""
    if config.tokenizer.path is not None:
        return load_tokenizer(config.tokenizer.path)
    out = Path(run_dir) / TOKENIZER_FILENAME
    if not out.exists():
        train_tokenizer(
            list(config.sources),
            config.tokenizer.vocab_size,
            str(out),
            extra_texts=tuple(task_vocabulary_texts(config.seed)),
        )
    return load_tokenizer(str(out))


def task_vocabulary_texts(seed: int, sentences: int = 2000) -> list[str]:
    """Generated text covering the filler grammar and the task phrases, for tokenizer training."""
    # Imported here: the task modules import this module for ``Tokenizer``.
    from longctx.data.tasks import task_phrases

    rng = np.random.default_rng([seed, 0x70C])
    return filler_sentences(rng, sentences) + task_phrases()


def _training_lines(texts: list[str]) -> list[str]:
    """Non-empty lines of ``texts``, cut to at most ``_MAX_LINE_BYTES`` bytes each."""
    lines = []
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            while line:
                head = line.encode("utf-8")[:_MAX_LINE_BYTES].decode("utf-8", errors="ignore")
                lines.append(head)
                line = line[len(head) :].strip()
    return lines
