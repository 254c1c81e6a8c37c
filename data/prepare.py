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

from longctx.data.config import BUILTIN_SOURCE
from longctx.data.corpus import MANIFEST_FORMAT, MANIFEST_NAME, is_prepared, read_manifest
from longctx.data.tokenizer import Tokenizer, load_tokenizer
from longctx.errors import LongctxError

log = logging.getLogger("longctx.data")
CHAT_FIELD = "messages"

FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
_ENCODE_BATCH = 256


@dataclass(frozen=True)
class SourceSpec:
    """One readable source: ``kind`` is txt, json, parquet, disk, hub or builtin."""

    kind: str
    path: str


@dataclass(frozen=True)
class ShardTask:
    """Rows ``[start, end)`` of source ``source`` become shard ``shard``."""

    shard: int
    source: SourceSpec
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


def _file_kind(path: Path) -> str | None:
    name = path.name
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "txt"
    return None


def resolve_sources(sources: list[str]) -> list[SourceSpec]:
    """Each source as one or more ``SourceSpec`` in a stable order (directories sorted)."""
    specs: list[SourceSpec] = []
    for source in sources:
        if source == BUILTIN_SOURCE:
            specs.append(SourceSpec("builtin", source))
            continue
        path = Path(source)
        if not path.exists():
            raise LongctxError(f"data source {source!r} does not exist; check the path")
        if path.is_dir():
            if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                specs.append(SourceSpec("disk", source))
                continue
            files = sorted(p for p in path.rglob("*") if p.is_file() and _file_kind(p))
            if files:
                specs.extend(SourceSpec(_file_kind(p), str(p)) for p in files)
            else:
                specs.append(SourceSpec("hub", source))
        elif _file_kind(path):
            specs.append(SourceSpec(_file_kind(path), source))
        else:
            raise LongctxError(
                f"data source {source!r} has unsupported type; use .txt, .jsonl, .jsonl.gz, "
                ".parquet, a datasets save_to_disk directory or a directory of such files"
            )
    return specs


def _read_txt(path: str) -> str:
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LongctxError(
            f"data file {path!r} is not valid UTF-8 (byte {err.start}); re-encode it as UTF-8, "
            f"e.g. `iconv -t UTF-8 {path}`"
        ) from None


def file_stamps(source: str) -> tuple[tuple[str, int, int], ...]:
    """(absolute path, size, modification time) of the file ``source`` or of every file below
    the directory ``source``; empty for ``builtin`` or a missing path."""
    path = Path(source).resolve()
    if source == BUILTIN_SOURCE or not path.exists():
        return ()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def open_source(spec: SourceSpec, field: str, strings: bool = True):
    """The source as a ``datasets.Dataset`` with a column ``field`` (checked present, and with
    ``strings`` checked to hold valid UTF-8 strings). Opened once per process while its files
    stay unchanged."""
    return _open_source(spec, field, strings, file_stamps(spec.path))


@functools.lru_cache(maxsize=8)
def _open_source(spec: SourceSpec, field: str, strings: bool, stamps: tuple):
    import datasets

    datasets.disable_progress_bars()
    try:
        if spec.kind == "builtin":
            from pydoc_data.topics import topics

            table = datasets.Dataset.from_dict({field: [topics[k] for k in sorted(topics)]})
        elif spec.kind == "txt":
            table = datasets.Dataset.from_dict({field: [_read_txt(spec.path)]})
        elif spec.kind == "disk":
            table = datasets.load_from_disk(spec.path)
        elif spec.kind == "hub":
            table = datasets.load_dataset(spec.path)
        else:
            table = datasets.load_dataset(spec.kind, data_files=spec.path, split="train")
    except LongctxError:
        raise
    except Exception as err:  # datasets/pyarrow read errors: bad JSON, bad UTF-8, bad parquet
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        if err.__cause__ is not None and str(err.__cause__):
            cause = str(err.__cause__).splitlines()[0]
        raise LongctxError(
            f"data source {spec.path!r} could not be read ({cause}); check it is valid UTF-8 "
            f"{spec.kind} data"
        ) from None
    if isinstance(table, datasets.DatasetDict):
        table = table["train"] if "train" in table else table[sorted(table)[0]]
    if field not in table.column_names:
        raise LongctxError(
            f"data source {spec.path!r} has no field {field!r} (found {table.column_names}); "
            "pass --field with one of those"
        )
    if not strings:
        return table
    dtype = getattr(table.features[field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise LongctxError(
            f"data source {spec.path!r} field {field!r} holds {table.features[field]}, not "
            "strings; pick a text field with --field"
        )
    try:  # the json reader keeps invalid UTF-8 bytes; a full validation finds them up front
        table.data.column(field).validate(full=True)
    except Exception as err:
        raise LongctxError(
            f"data source {spec.path!r} field {field!r} is not valid UTF-8 text "
            f"({str(err).splitlines()[0]}); re-encode it as UTF-8"
        ) from None
    return table


def plan_shards(
    specs: list[SourceSpec], field: str, docs_per_shard: int, strings: bool = True
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
    from longctx.data.chat import ChatRenderer, Conversation, check_messages

    dtype = _token_dtype(tokenizer.vocab_size)
    table = open_source(task.source, field, kind == "text")
    renderer = ChatRenderer(tokenizer) if kind == "chat" else None
    keys: list[int] = []
    tokens: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for start in range(task.start, task.end, _ENCODE_BATCH):
        rows = table[start : min(task.end, start + _ENCODE_BATCH)][field]
        if renderer is None:
            texts = [t for t in rows if t is not None and t.strip()]
            keys += [document_key(t) for t in texts]
            tokens += [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(texts)]
            continue
        for row, messages in enumerate(rows, start=start + 1):
            where = f"{task.source.path}:{row}"
            checked = check_messages({CHAT_FIELD: messages}, where)
            document = renderer.render(Conversation(where, checked))
            keys.append(document_key(json.dumps(checked, sort_keys=True)))
            tokens.append(document.ids.astype(dtype))
            masks.append(document.scored.astype(np.uint8))
    return keys, tokens, (masks if renderer is not None else None)


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
