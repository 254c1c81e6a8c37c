"""Tokenizers: sentencepiece models (trained by longctx or shipped as ``tokenizer.model``) and
Hugging Face ``tokenizer.json`` files (BPE of Llama-3, Qwen2, SmolLM2, ...), behind one interface.

Trained tokenizers are BPE with byte fallback (any UTF-8 text encodes, no unknown tokens) and
``split_digits`` (every digit is its own token, so passkeys and counts are spelled digit by
digit); ids 0/1/2 are unk/bos/eos, as in Llama's tokenizer.

The interface (``Tokenizer``): ``encode`` / ``encode_batch`` / ``encode_piece`` give the ids of a
text as it reads after a space in running text, never with bos/eos: sentencepiece does that with
its dummy ``▁`` prefix, and a byte-level BPE ``tokenizer.json`` (which has no such prefix) gets a
leading space, so pieces encoded one by one and concatenated (how task prompts are assembled)
read as the pieces joined by spaces. ``bos_id`` is the token the tokenizer itself puts before a
sequence (None when it adds none, as SmolLM2's and Qwen2's), ``eos_id`` the end-of-sequence token
that separates packed documents. ``model_bytes`` is the self-contained serialized form a
checkpoint stores (``load_tokenizer`` reads it back from a file of any name).
"""

from __future__ import annotations

import json
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm

from longctx.data.config import DataConfig
from longctx.data.filler import filler_sentences
from longctx.data.sources import read_documents
from longctx.errors import LongctxError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HfTokenizer

TOKENIZER_FILENAME = "tokenizer.model"
JSON_TOKENIZER_FILENAME = "tokenizer.json"
JSON_TOKENIZER_CONFIG = "tokenizer_config.json"
# ``model_bytes`` of a tokenizer.json tokenizer: the file plus its eos token in one JSON.
_JSON_BUNDLE_FORMAT = "longctx-tokenizer-json/1"
# Sentencepiece skips lines longer than this many bytes; documents are cut into lines first.
_MAX_LINE_BYTES = 4096
_SENTENCE_SAMPLE = 300_000  # lines sampled for training: bounds time and memory on big corpora
_PIECE_CACHE_LIMIT = 1 << 16


class Tokenizer(ABC):
    """What the data pipeline and the evaluation need from a tokenizer (see the module
    docstring); the backends implement ``_encode_many``, ``decode``, ``model_bytes`` and
    ``export_files``.

    ``encode_piece`` is a memoised ``encode`` for the short strings task generators repeat
    thousands of times.
    """

    path: str
    vocab_size: int
    bos_id: int | None
    eos_id: int

    def __init__(self) -> None:
        self._piece_cache: dict[str, list[int]] = {}

    @abstractmethod
    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no bos/eos)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; bos/eos are dropped."""

    @abstractmethod
    def model_bytes(self) -> bytes:
        """The serialized tokenizer, e.g. to store next to a checkpoint."""

    @abstractmethod
    def export_files(self, directory: str | Path) -> list[Path]:
        """Write the tokenizer files a Hugging Face model directory holds (what transformers'
        ``AutoTokenizer`` loads) into ``directory``; returns the paths."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos)."""
        return self._encode_many([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no bos/eos); one call into the backend for the batch."""
        return self._encode_many(list(texts))

    def encode_piece(self, text: str) -> list[int]:
        """``encode(text)``, memoised (bounded cache) for short strings that repeat."""
        ids = self._piece_cache.get(text)
        if ids is None:
            ids = self.encode(text)
            if len(self._piece_cache) < _PIECE_CACHE_LIMIT:
                self._piece_cache[text] = ids
        return ids

    def save(self, out: str) -> str:
        """Write ``model_bytes()`` to ``out`` (a file path); returns it."""
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(self.model_bytes())
        return out


class SentencePieceTokenizer(Tokenizer):
    """A loaded sentencepiece model (``processor``)."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str):
        super().__init__()
        self.processor = processor
        self.path = path
        self.vocab_size = processor.vocab_size()
        bos, eos = processor.bos_id(), processor.eos_id()
        if eos < 0:
            raise LongctxError(
                f"tokenizer {path!r} defines no end-of-sequence token; packing needs one to "
                "separate documents: train one with `longctx tokenizer train`"
            )
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = eos

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    def model_bytes(self) -> bytes:
        return self.processor.serialized_model_proto()

    def export_files(self, directory: str | Path) -> list[Path]:
        path = Path(directory) / TOKENIZER_FILENAME
        self.save(str(path))
        return [path]


class JsonTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library (the engine of
    transformers' fast tokenizers, so ids equal theirs).

    ``eos_token`` names the end-of-sequence token (from ``tokenizer_config.json``); ``bos_id`` is
    the token the file's post-processor puts first when special tokens are added (None if none).
    ``prefix_space`` is found by probing: a tokenizer that already encodes ``"a"`` like ``" a"``
    (a sentencepiece-style prefix) gets no extra space. ``chat_template`` is the Jinja chat
    template shipped beside the file (None if none; ``longctx.data.chat`` renders with it).
    """

    def __init__(
        self, backend: HfTokenizer, eos_token: str, path: str, chat_template: str | None = None
    ):
        super().__init__()
        self.path = path
        self.backend = backend
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        eos = self.backend.token_to_id(eos_token)
        if eos is None:
            raise LongctxError(
                f"tokenizer {path!r}: its end-of-sequence token {eos_token!r} is not in the "
                "vocabulary; fix eos_token in tokenizer_config.json"
            )
        self.eos_id = eos
        plain = self.backend.encode("a", add_special_tokens=False).ids
        with_specials = self.backend.encode("a", add_special_tokens=True).ids
        first_added = len(with_specials) > len(plain) and with_specials[: len(plain)] != plain
        self.bos_id = with_specials[0] if first_added else None
        self.prefix_space = plain != self.backend.encode(" a", add_special_tokens=False).ids

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.backend.id_to_token(self.bos_id)

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        if self.prefix_space:
            texts = [text if text[:1].isspace() else " " + text for text in texts]
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def spec(self) -> str:
        """The tokenizer.json text."""
        return self.backend.to_str()

    def model_bytes(self) -> bytes:
        bundle = {
            "format": _JSON_BUNDLE_FORMAT,
            "eos_token": self.eos_token,
            "tokenizer": json.loads(self.spec),
        }
        if self.chat_template is not None:
            bundle["chat_template"] = self.chat_template
        return json.dumps(bundle, ensure_ascii=False).encode("utf-8")

    def export_files(self, directory: str | Path) -> list[Path]:
        """``tokenizer.json`` and a minimal ``tokenizer_config.json`` (its eos, and bos if
        any)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token}
        if self.bos_token is not None:
            config["bos_token"] = self.bos_token
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        files = [directory / JSON_TOKENIZER_FILENAME, directory / JSON_TOKENIZER_CONFIG]
        files[0].write_text(self.spec, encoding="utf-8")
        files[1].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return files


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer: a sentencepiece ``tokenizer.model``, a ``tokenizer.json``, a checkpoint's
    stored tokenizer (``model_bytes``), or the one in directory ``path`` (a Hugging Face
    checkpoint: its ``tokenizer.model`` if it ships one, else its ``tokenizer.json``)."""
    target = Path(path)
    if target.is_dir():
        for name in (TOKENIZER_FILENAME, JSON_TOKENIZER_FILENAME):
            if (target / name).is_file():
                target = target / name
                break
        else:
            raise LongctxError(
                f"directory {path!r} has neither {TOKENIZER_FILENAME} nor "
                f"{JSON_TOKENIZER_FILENAME}; point data.tokenizer.path at a tokenizer file or "
                "train one with `longctx tokenizer train`"
            )
    if not target.is_file():
        raise LongctxError(
            f"tokenizer {path!r} does not exist; give the path of a {TOKENIZER_FILENAME} or "
            f"{JSON_TOKENIZER_FILENAME}, or train one with `longctx tokenizer train`"
        )
    raw = target.read_bytes()
    if raw.lstrip()[:1] == b"{":
        return _load_json_tokenizer(raw, target)
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(target))
    except (RuntimeError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LongctxError(
            f"tokenizer {str(target)!r} is not a sentencepiece model ({first_line}); "
            "give a tokenizer.model file"
        ) from None
    return SentencePieceTokenizer(processor, str(target))


def _load_json_tokenizer(raw: bytes, target: Path) -> JsonTokenizer:
    """A ``tokenizer.json`` (its eos token from the ``tokenizer_config.json`` or ``config.json``
    beside it) or a ``JsonTokenizer.model_bytes`` bundle (which carries its eos token)."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LongctxError(f"tokenizer {str(target)!r} is not valid JSON ({err})") from None
    if isinstance(document, dict) and document.get("format") == _JSON_BUNDLE_FORMAT:
        backend = _parse_tokenizer_json(json.dumps(document["tokenizer"]), target)
        return JsonTokenizer(
            backend, document["eos_token"], str(target), document.get("chat_template")
        )
    backend = _parse_tokenizer_json(raw.decode("utf-8"), target)
    return JsonTokenizer(
        backend, _eos_token_beside(target, document), str(target), _chat_template_beside(target)
    )


def _chat_template_beside(target: Path) -> str | None:
    """The chat template shipped next to a ``tokenizer.json``: ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates of
    which the one named ``default`` is used); None when there is none."""
    jinja = target.parent / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_file = target.parent / JSON_TOKENIZER_CONFIG
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _parse_tokenizer_json(spec: str, target: Path) -> HfTokenizer:
    from tokenizers import Tokenizer as HfTokenizer

    try:
        return HfTokenizer.from_str(spec)
    except Exception as err:  # the Rust library raises plain Exception on a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LongctxError(
            f"tokenizer {str(target)!r} is not a valid tokenizer.json ({reason}); give the "
            "tokenizer.json of a Hugging Face checkpoint"
        ) from None


def _eos_token_beside(target: Path, spec: dict) -> str:
    """The eos token declared next to a ``tokenizer.json``: ``tokenizer_config.json``'s
    ``eos_token``, else the token of ``config.json``'s ``eos_token_id``."""
    config_file = target.parent / JSON_TOKENIZER_CONFIG
    if config_file.is_file():
        eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eos, dict):  # transformers 4.x AddedToken form
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    model_config = target.parent / "config.json"
    if model_config.is_file():
        eos_id = json.loads(model_config.read_text(encoding="utf-8")).get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        for token in spec.get("added_tokens", []):
            if token.get("id") == eos_id:
                return token["content"]
    raise LongctxError(
        f"tokenizer {str(target)!r} names no end-of-sequence token (no eos_token in "
        f"{JSON_TOKENIZER_CONFIG}, no eos_token_id in config.json beside it); packing needs one "
        "to separate documents: add eos_token to tokenizer_config.json"
    )


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
    texts = [doc.text for doc in read_documents(list(inputs))] if inputs else []
    texts += list(extra_texts)
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
    if an earlier attempt of the run trained it; else train it there now on the text sources,
    the chat sources' message contents and generated task text (so filler and task words get
    their own tokens)."""
    if config.tokenizer.path is not None:
        return load_tokenizer(config.tokenizer.path)
    out = Path(run_dir) / TOKENIZER_FILENAME
    if not out.exists():
        from longctx.data.chat import chat_texts  # chat imports this module for Tokenizer

        train_tokenizer(
            config.text_paths(),
            config.tokenizer.vocab_size,
            str(out),
            extra_texts=(*chat_texts(config.chat_paths()), *task_vocabulary_texts(config.seed)),
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
