"""``longctx data prepare``: tokenize sources once into memory-mapped token shards.

Sources (``.txt`` files, ``.jsonl``/``.jsonl.gz``, ``.parquet``, a ``save_to_disk`` directory,
a directory of such files, anything ``datasets.load_dataset`` opens from a local path, or
``builtin``) are read with ``datasets``/pyarrow and cut into shards of about
``docs_per_shard`` rows. Each shard is tokenized by one of ``num_proc`` processes into
``shard_NNNNN.bin`` (the tokens of its documents back to back, ``uint16`` when the vocabulary
fits, else ``uint32``), ``shard_NNNNN.idx`` (``int64`` offsets, ``[n_docs + 1]``) and
``shard_NNNNN.key`` (``uint64`` per document: a hash of its text, so readers drop exact
duplicates without reading tokens), written under a temporary name and renamed, so an
interrupted run keeps its finished shards and a rerun with the same ``--out`` only tokenizes the
rest. ``manifest.json`` (written last) records the tokenizer's sha256, the token and document
counts and the sha256 of every shard file; see ``longctx.data.corpus.PreparedCorpus`` for the
reader.

Kinds: ``text`` documents hold a text field's tokens only (readers add bos/eos); ``chat``
documents are conversations (the ``messages`` field, ``longctx.data.chat``) rendered with the
tokenizer's chat template, specials included, plus ``shard_NNNNN.mask`` (``uint8`` per token, 1
on the assistant tokens that carry the loss).

``prepare_cached`` is the on-the-fly form a run uses for raw ``data.sources``: it prepares into
``ROOT/<identity>`` once, the identity hashing the sources' paths, sizes and modification times,
the kind and the tokenizer's sha256, and reuses that directory whenever it is asked again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longctx.data.chat import CHAT_FIELD, ChatRenderer, source_conversations
from longctx.data.config import BUILTIN_SOURCE
from longctx.data.corpus import MANIFEST_FORMAT, MANIFEST_NAME, is_prepared, read_manifest
from longctx.data.sources import SourceFile, file_stamps, open_source, resolve_sources
from longctx.data.tokenizer import Tokenizer, load_tokenizer
from longctx.errors import LongctxError

log = logging.getLogger("longctx.data")

_ENCODE_BATCH = 256


@dataclass(frozen=True)
class ShardTask:
    """Rows ``[start, end)`` of source ``source`` become shard ``shard``."""

    shard: int
    source: SourceFile
    start: int
    end: int


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_sha256(model_bytes: bytes) -> str:
    """The tokenizer's identity: sha256 of its serialized files."""
    return hashlib.sha256(model_bytes).hexdigest()


def plan_shards(
    specs: list[SourceFile], field: str, docs_per_shard: int, strings: bool = True
) -> list[ShardTask]:
    """Cut every source into row ranges of at most ``docs_per_shard`` rows."""
    tasks: list[ShardTask] = []
    for spec in specs:
        rows = len(open_source(spec, field, strings))
        for start in range(0, rows, docs_per_shard):
            tasks.append(ShardTask(len(tasks), spec, start, min(rows, start + docs_per_shard)))
    return tasks


SHARD_SUFFIXES = {
    "tokens_file": "bin",
    "index_file": "idx",
    "keys_file": "key",
    "mask_file": "mask",
}


def shard_files(shard: int, kind: str) -> dict[str, str]:
    """The file names of shard ``shard``: manifest key -> name (``mask_file`` for chat only)."""
    keys = [k for k in SHARD_SUFFIXES if kind == "chat" or k != "mask_file"]
    return {key: f"shard_{shard:05d}.{SHARD_SUFFIXES[key]}" for key in keys}


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def document_key(text: str) -> int:
    """The 64-bit key of a document's text that readers deduplicate by."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _shard_documents(task: ShardTask, field: str, kind: str, tokenizer: Tokenizer):
    """``(keys, token arrays, masks or None)`` of the shard's documents, blank ones skipped."""
    dtype = _token_dtype(tokenizer.vocab_size)
    table = open_source(task.source, field, kind == "text")
    keys: list[int] = []
    tokens: list[np.ndarray] = []
    if kind == "chat":
        renderer, masks = ChatRenderer(tokenizer), []
        for conversation in source_conversations(table, task.source.path, task.start, task.end):
            document = renderer.render(conversation)
            keys.append(document_key(json.dumps(conversation.messages, sort_keys=True)))
            tokens.append(document.ids.astype(dtype))
            masks.append(document.scored.astype(np.uint8))
        return keys, tokens, masks
    for start in range(task.start, task.end, _ENCODE_BATCH):
        texts = [t for t in table[start : min(task.end, start + _ENCODE_BATCH)][field] if t.strip()]
        keys += [document_key(t) for t in texts]
        tokens += [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(texts)]
    return keys, tokens, None


def _tokenize_shard(task: ShardTask, field: str, kind: str, tokenizer_path: str, out: str) -> dict:
    """Tokenize one shard and write its files (temp name, then rename); returns its record."""
    tokenizer = _load_tokenizer_cached(tokenizer_path)
    dtype = _token_dtype(tokenizer.vocab_size)
    keys, tokens, masks = _shard_documents(task, field, kind, tokenizer)
    lengths = [len(t) for t in tokens]
    arrays = {
        "tokens_file": np.concatenate(tokens) if tokens else np.zeros(0, dtype=dtype),
        "index_file": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
        "keys_file": np.asarray(keys, dtype=np.uint64),
    }
    if masks is not None:
        arrays["mask_file"] = np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)
    names = shard_files(task.shard, kind)
    for key, array in arrays.items():
        temp = Path(out) / f".{names[key]}.tmp-{os.getpid()}"
        array.tofile(temp)
        os.replace(temp, Path(out) / names[key])
    return _shard_record(out, task.shard, kind, int(arrays["index_file"][-1]), len(lengths))


@functools.lru_cache(maxsize=2)
def _load_tokenizer_cached(path: str):
    return load_tokenizer(path)


def _shard_record(out: str, shard: int, kind: str, tokens: int, documents: int) -> dict:
    names = shard_files(shard, kind)
    record: dict = {"tokens": tokens, "documents": documents, **names}
    for key, name in names.items():
        record[key.replace("_file", "_sha256")] = file_sha256(Path(out) / name)
    return record


def _finished_record(out: str, shard: int, kind: str, itemsize: int) -> dict | None:
    """The record of a shard an earlier run finished (all its files present, sizes agreeing
    with its index), else None."""
    paths = {key: Path(out) / name for key, name in shard_files(shard, kind).items()}
    if not all(path.is_file() for path in paths.values()):
        return None
    index = np.fromfile(paths["index_file"], dtype=np.int64)
    if len(index) == 0:
        return None
    tokens, documents = int(index[-1]), len(index) - 1
    sizes = {"tokens_file": tokens * itemsize, "keys_file": documents * 8, "mask_file": tokens}
    if any(paths[key].stat().st_size != size for key, size in sizes.items() if key in paths):
        return None
    return _shard_record(out, shard, kind, tokens, documents)


def _run_task(args: tuple[ShardTask, str, str, str, str]) -> dict:
    return _tokenize_shard(*args)


def prepare(
    sources: list[str],
    tokenizer_path: str,
    out: str,
    field: str = "text",
    num_proc: int = 1,
    docs_per_shard: int = 4096,
    show_progress: bool = True,
    kind: str = "text",
) -> dict:
    """Prepare ``sources`` into ``out`` (see the module docstring); returns the manifest.
    ``kind`` is ``text`` (documents from ``field``) or ``chat`` (conversations from
    ``messages``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    if kind == "chat":
        field = CHAT_FIELD
    tokenizer = load_tokenizer(tokenizer_path)
    specs = resolve_sources(sources)
    tasks = plan_shards(specs, field, docs_per_shard, kind == "text")  # opens, checks sources
    if not tasks:
        raise LongctxError(f"data sources {sources} hold no rows; add documents to them")
    itemsize = _token_dtype(tokenizer.vocab_size).itemsize
    created = not Path(out).exists()
    Path(out).mkdir(parents=True, exist_ok=True)
    records: dict[int, dict] = {}
    todo = []
    for task in tasks:
        record = _finished_record(out, task.shard, kind, itemsize)
        if record is None:
            todo.append(task)
        else:
            records[task.shard] = record
    started = time.perf_counter()
    new_tokens = 0
    args = [(task, field, kind, tokenizer_path, out) for task in todo]
    try:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not show_progress,
        ) as progress:
            bar = progress.add_task("tokenizing shards", total=len(tasks), completed=len(records))
            if num_proc > 1 and len(todo) > 1:
                with multiprocessing.get_context("fork").Pool(min(num_proc, len(todo))) as pool:
                    results = list(_collect(pool.imap_unordered(_run_task, args), progress, bar))
            else:
                results = list(_collect(map(_run_task, args), progress, bar))
    except LongctxError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    for record, task in zip(sorted(results, key=lambda r: r["tokens_file"]), todo, strict=True):
        records[task.shard] = record
        new_tokens += record["tokens"]
    elapsed = time.perf_counter() - started
    shards = [records[i] for i in range(len(tasks))]
    documents = sum(s["documents"] for s in shards)
    if documents == 0:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise LongctxError(
            f"data sources {sources} have no non-blank {field!r} text; add documents to them"
        )
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "sources": list(sources),
        "field": field,
        "tokenizer": {
            "path": str(tokenizer_path),
            "sha256": tokenizer_sha256(tokenizer.model_bytes()),
            "vocab_size": tokenizer.vocab_size,
        },
        "dtype": _token_dtype(tokenizer.vocab_size).name,
        "tokens": sum(s["tokens"] for s in shards),
        "documents": documents,
        "shards": shards,
    }
    temp = Path(out) / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    temp.write_text(json.dumps(manifest, indent=1))
    os.replace(temp, Path(out) / MANIFEST_NAME)
    rate = new_tokens / elapsed if elapsed > 0 else 0.0
    manifest["throughput"] = {"new_tokens": new_tokens, "seconds": elapsed, "tokens_per_s": rate}
    return manifest


def _collect(results, progress, bar):
    for result in results:
        progress.advance(bar)
        yield result


def source_identity(sources: list[str], kind: str, tokenizer: Tokenizer) -> str:
    """A hex digest naming what ``prepare_cached`` would write: the kind, the tokenizer's
    sha256 and every source file's absolute path, size and modification time (``builtin``:
    the Python version whose pydoc topics it is)."""
    stamps: list[object] = [kind, tokenizer_sha256(tokenizer.model_bytes())]
    for source in sources:
        stamps.append([source, sys.version] if source == BUILTIN_SOURCE else file_stamps(source))
    return hashlib.sha256(json.dumps(stamps).encode("utf-8")).hexdigest()[:24]


def prepare_cached(sources: list[str], kind: str, tokenizer: Tokenizer, root: str | Path) -> Path:
    """``sources`` prepared under ``root`` (module docstring): the existing directory when one
    with the same identity is complete, else prepared now (one process, no progress bar; an
    interrupted earlier attempt's finished shards are kept). Returns the directory."""
    out = Path(root) / source_identity(sources, kind, tokenizer)
    if is_prepared(out) and read_manifest(out).get("kind") == kind:
        log.info("reusing prepared data %s for %s", out, sources)
        return out
    manifest = prepare(sources, tokenizer.path, str(out), show_progress=False, kind=kind)
    log.info(
        "prepared %s into %s: %d documents, %d tokens, %.0f tokens/s",
        sources,
        out,
        manifest["documents"],
        manifest["tokens"],
        manifest["throughput"]["tokens_per_s"],
    )
    return out
