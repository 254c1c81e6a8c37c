"""``longctx data prepare``: tokenize sources once into memory-mapped token shards.

Sources (``.txt`` files, ``.jsonl``/``.jsonl.gz``, ``.parquet``, a ``save_to_disk`` directory,
a directory of such files, anything ``datasets.load_dataset`` opens from a local path, or
``builtin``) are read with ``datasets``/pyarrow and cut into shards of about
``docs_per_shard`` rows. Each shard is tokenized by one of ``num_proc`` processes into
``shard_NNNNN.bin`` (text tokens of its documents back to back, ``uint16`` when the vocabulary
fits, else ``uint32``) and ``shard_NNNNN.idx`` (``int64`` offsets, ``[n_docs + 1]``), written
under a temporary name and renamed, so an interrupted run keeps its finished shards and a rerun
with the same ``--out`` only tokenizes the rest. ``manifest.json`` (written last) records the
tokenizer's sha256, the token and document counts and the sha256 of every shard file; see
``longctx.data.corpus.PreparedCorpus`` for the reader.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longctx.data.config import BUILTIN_SOURCE
from longctx.data.corpus import MANIFEST_FORMAT, MANIFEST_NAME
from longctx.data.tokenizer import load_tokenizer
from longctx.errors import LongctxError

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


@functools.lru_cache(maxsize=8)
def open_source(spec: SourceSpec, field: str):
    """The source as a ``datasets.Dataset`` with a string column ``field`` (checked)."""
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


def plan_shards(specs: list[SourceSpec], field: str, docs_per_shard: int) -> list[ShardTask]:
    """Cut every source into row ranges of at most ``docs_per_shard`` rows."""
    tasks: list[ShardTask] = []
    for spec in specs:
        rows = len(open_source(spec, field))
        for start in range(0, rows, docs_per_shard):
            tasks.append(ShardTask(len(tasks), spec, start, min(rows, start + docs_per_shard)))
    return tasks


def shard_names(shard: int) -> tuple[str, str]:
    return f"shard_{shard:05d}.bin", f"shard_{shard:05d}.idx"


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _tokenize_shard(task: ShardTask, field: str, tokenizer_path: str, out: str) -> dict:
    """Tokenize one shard and write its two files (temp name, then rename); returns its record."""
    tokenizer = _load_tokenizer_cached(tokenizer_path)
    dtype = _token_dtype(tokenizer.vocab_size)
    table = open_source(task.source, field)
    tokens_name, index_name = shard_names(task.shard)
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    for start in range(task.start, task.end, _ENCODE_BATCH):
        texts = table[start : min(task.end, start + _ENCODE_BATCH)][field]
        texts = [t for t in texts if t is not None and t.strip()]
        for ids in tokenizer.encode_batch(texts):
            chunks.append(np.asarray(ids, dtype=dtype))
            lengths.append(len(ids))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    index = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    for name, array in ((tokens_name, tokens), (index_name, index)):
        temp = Path(out) / f".{name}.tmp-{os.getpid()}"
        array.tofile(temp)
        os.replace(temp, Path(out) / name)
    return _shard_record(out, task.shard, len(tokens), len(lengths))


@functools.lru_cache(maxsize=2)
def _load_tokenizer_cached(path: str):
    return load_tokenizer(path)


def _shard_record(out: str, shard: int, tokens: int, documents: int) -> dict:
    tokens_name, index_name = shard_names(shard)
    return {
        "tokens_file": tokens_name,
        "index_file": index_name,
        "tokens": tokens,
        "documents": documents,
        "tokens_sha256": file_sha256(Path(out) / tokens_name),
        "index_sha256": file_sha256(Path(out) / index_name),
    }


def _finished_record(out: str, shard: int, itemsize: int) -> dict | None:
    """The record of a shard an earlier run finished (both files present), else None."""
    tokens_name, index_name = shard_names(shard)
    tokens_path, index_path = Path(out) / tokens_name, Path(out) / index_name
    if not (tokens_path.is_file() and index_path.is_file()):
        return None
    index = np.fromfile(index_path, dtype=np.int64)
    if len(index) == 0 or int(index[-1]) * itemsize != tokens_path.stat().st_size:
        return None
    return _shard_record(out, shard, int(index[-1]), len(index) - 1)


def _run_task(args: tuple[ShardTask, str, str, str]) -> dict:
    return _tokenize_shard(*args)


def prepare(
    sources: list[str],
    tokenizer_path: str,
    out: str,
    field: str = "text",
    num_proc: int = 1,
    docs_per_shard: int = 4096,
    show_progress: bool = True,
) -> dict:
    """Prepare ``sources`` into ``out`` (see the module docstring); returns the manifest."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    tokenizer = load_tokenizer(tokenizer_path)
    specs = resolve_sources(sources)
    tasks = plan_shards(specs, field, docs_per_shard)  # opens (and checks) every source
    if not tasks:
        raise LongctxError(f"data sources {sources} hold no rows; add documents to them")
    itemsize = _token_dtype(tokenizer.vocab_size).itemsize
    created = not Path(out).exists()
    Path(out).mkdir(parents=True, exist_ok=True)
    records: dict[int, dict] = {}
    todo = []
    for task in tasks:
        record = _finished_record(out, task.shard, itemsize)
        if record is None:
            todo.append(task)
        else:
            records[task.shard] = record
    started = time.perf_counter()
    new_tokens = 0
    args = [(task, field, tokenizer_path, out) for task in todo]
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
    for record, task in zip(sorted(results, key=lambda r: r["tokens_file"]), todo, strict=True):
        records[task.shard] = record
        new_tokens += record["tokens"]
    elapsed = time.perf_counter() - started
    shards = [records[i] for i in range(len(tasks))]
    documents = sum(s["documents"] for s in shards)
    if documents == 0:
        if created:
            for task in tasks:
                for name in shard_names(task.shard):
                    (Path(out) / name).unlink(missing_ok=True)
            Path(out).rmdir()
        raise LongctxError(
            f"data sources {sources} have no non-blank {field!r} text; add documents to them"
        )
    manifest = {
        "format": MANIFEST_FORMAT,
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
    temp = Path(out) / f".{MANIFEST_NAME}.tmp"
    temp.write_text(json.dumps(manifest, indent=1))
    os.replace(temp, Path(out) / MANIFEST_NAME)
    rate = new_tokens / elapsed if elapsed > 0 else 0.0
    manifest["throughput"] = {"new_tokens": new_tokens, "seconds": elapsed, "tokens_per_s": rate}
    return manifest


def _collect(results, progress, bar):
    for result in results:
        progress.advance(bar)
        yield result
