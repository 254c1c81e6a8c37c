"""Corpus sources, read through ``datasets``/pyarrow: the one reader of every source format,
shared by ``longctx data prepare``, the on-the-fly preparation of a run's raw sources, chat
data, tokenizer training and the CLI driver's checks.

A source is a ``.txt`` file (one document: packing splits long files into rows), a ``.jsonl``
or ``.jsonl.gz`` file (one JSON object per line, read by ``datasets``' JSON builder), a
``.parquet`` file, a directory written by ``Dataset.save_to_disk``, a directory of such files
(sorted by path, so the corpus is the same on every machine), any other local directory
``datasets.load_dataset`` opens, or ``builtin``: the help text of CPython's
``pydoc_data.topics`` (79 topics, about 460k characters), for demos and tests. The documents of
a row-based source are the values of its text field (``text`` unless chosen); rows are named
``path:N`` (N counts rows from 1; blank lines of a JSON-lines file are no rows).

Every problem with an input raises a one-line ``LongctxError`` naming the file (and row) and the
fix: missing, unsupported, binary, not UTF-8, not JSON, a field absent or not a string, no
non-blank text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from longctx.data.config import BUILTIN_SOURCE
from longctx.errors import LongctxError

_BINARY_PROBE_BYTES = 8192
_UNSUPPORTED_HINT = (
    "use .txt, .jsonl, .jsonl.gz, .parquet, a datasets save_to_disk directory or a directory "
    "of such files"
)


@dataclass(frozen=True)
class Document:
    """One corpus document: ``name`` says where it came from (``file`` or ``file:row``)."""

    name: str
    text: str


@dataclass(frozen=True)
class SourceFile:
    """One readable source: ``kind`` is txt, json, parquet, disk, hub or builtin."""

    kind: str
    path: str


def _file_kind(path: Path) -> str | None:
    name = path.name
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "txt"
    return None


def resolve_sources(sources: list[str]) -> list[SourceFile]:
    """Each source as one or more ``SourceFile`` in a stable order (directories sorted)."""
    files: list[SourceFile] = []
    for source in sources:
        if source == BUILTIN_SOURCE:
            files.append(SourceFile("builtin", source))
            continue
        path = Path(source)
        if not path.exists():
            raise LongctxError(
                f"data source {source!r} does not exist; check the path (or use "
                f"{BUILTIN_SOURCE!r} for the builtin English corpus)"
            )
        if path.is_dir():
            if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                files.append(SourceFile("disk", source))
                continue
            found = sorted(p for p in path.rglob("*") if p.is_file() and _file_kind(p))
            if found:
                files.extend(SourceFile(_file_kind(p), str(p)) for p in found)
            else:
                files.append(SourceFile("hub", source))
        elif _file_kind(path):
            files.append(SourceFile(_file_kind(path), source))
        else:
            raise LongctxError(
                f"data source {source!r} has unsupported type {path.suffix or '(none)'!r}; "
                + _UNSUPPORTED_HINT
            )
    return files


def file_stamps(source: str) -> tuple[tuple[str, int, int], ...]:
    """(absolute path, size, modification time) of the file ``source`` or of every file below
    the directory ``source``; empty for ``builtin`` or a missing path."""
    path = Path(source).resolve()
    if source == BUILTIN_SOURCE or not path.exists():
        return ()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def open_source(source: SourceFile, field: str, strings: bool = True):
    """The source as a ``datasets.Dataset``. With ``strings`` (text sources) its column
    ``field`` is checked: present, every row a string (the first offending row named), valid
    UTF-8, some non-blank text. Without (chat sources) rows are checked by the caller. Opened
    once per process while the source's files stay unchanged."""
    return _open_source(source, field, strings, file_stamps(source.path))


@functools.lru_cache(maxsize=8)
def _open_source(source: SourceFile, field: str, strings: bool, stamps: tuple):
    table = _load(source, field)
    if strings:
        _check_text_column(table, source, field)
    return table


def _load(source: SourceFile, field: str):
    """``datasets`` reads the source (one-line errors for what it cannot read)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if source.kind == "builtin":
            from pydoc_data.topics import topics

            return datasets.Dataset.from_dict({field: [topics[k] for k in sorted(topics)]})
        if source.kind == "txt":
            return datasets.Dataset.from_dict({field: [_read_text_file(Path(source.path))]})
        if source.kind == "disk":
            table = datasets.load_from_disk(source.path)
        elif source.kind == "hub":
            table = datasets.load_dataset(source.path)
        else:
            table = datasets.load_dataset(source.kind, data_files=source.path, split="train")
    except LongctxError:
        raise
    except Exception as err:  # datasets/pyarrow read errors: bad JSON, bad parquet, no data
        raise _read_error(source, err) from None
    if isinstance(table, datasets.DatasetDict):
        table = table["train"] if "train" in table else table[sorted(table)[0]]
    return table


def _read_error(source: SourceFile, err: Exception) -> LongctxError:
    cause = str(err).splitlines()[0] if str(err) else type(err).__name__
    if err.__cause__ is not None and str(err.__cause__):
        cause = str(err.__cause__).splitlines()[0]
    path = source.path
    if source.kind == "json":
        return LongctxError(
            f"data file {path!r} is not valid JSON lines ({cause}); write one JSON object per "
            "line, each field of one type throughout"
        )
    if source.kind == "hub":
        return LongctxError(
            f"data directory {path!r} has no .txt or .jsonl (or .jsonl.gz, .parquet) files and "
            f"datasets cannot open it ({cause}); add some or point at another directory"
        )
    return LongctxError(f"data source {path!r} could not be read ({cause}); {_UNSUPPORTED_HINT}")


def _read_text_file(path: Path) -> str:
    """A ``.txt`` file's text; one-line errors for binary, non-UTF-8 or blank content."""
    raw = path.read_bytes()
    if b"\x00" in raw[:_BINARY_PROBE_BYTES]:
        raise LongctxError(
            f"data file {str(path)!r} looks binary (NUL bytes in its first "
            f"{_BINARY_PROBE_BYTES} bytes); use UTF-8 text (.txt) or JSON lines (.jsonl)"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LongctxError(
            f"data file {str(path)!r} is not valid UTF-8 (byte {err.start}: "
            f"{raw[err.start : err.start + 1]!r}); re-encode it as UTF-8, e.g. "
            f"`iconv -t UTF-8 {path}`"
        ) from None
    if not text.strip():
        raise LongctxError(f"data file {str(path)!r} is empty; add text or remove it")
    return text


def _check_text_column(table, source: SourceFile, field: str) -> None:
    """One-line errors for a text field that is absent, not a string in some row, not UTF-8,
    or blank in every row (checked on the Arrow column, without building Python strings)."""
    import pyarrow.compute as pc

    path = source.path
    if field not in table.column_names:
        raise LongctxError(
            f"data source {path!r} has no {field!r} field (found {table.column_names}); each "
            f'row needs one, like {{"{field}": "..."}}, or pick another field with --field'
        )
    column = table.data.column(field)
    dtype = getattr(table.features[field], "dtype", None)
    if dtype not in ("string", "large_string") or column.null_count:
        for row, value in enumerate(iter_column(table, field), start=1):
            if not isinstance(value, str):
                where = f"{path}:{row}"
                if value is None:
                    found = sorted(k for k, v in table[row - 1].items() if v is not None)
                    raise LongctxError(
                        f"data file row {where!r} has no {field!r} field (found {found}); "
                        f'each row must be an object like {{"{field}": "..."}}'
                    )
                raise LongctxError(
                    f"data file row {where!r} has a {field!r} of type {type(value).__name__}, "
                    "not strings; make it a string or pick a text field with --field"
                )
    try:  # the JSON reader keeps invalid UTF-8 bytes; a full validation finds them up front
        column.validate(full=True)
    except Exception as err:
        raise LongctxError(
            f"data source {path!r} field {field!r} is not valid UTF-8 text "
            f"({str(err).splitlines()[0]}); re-encode it as UTF-8"
        ) from None
    longest = pc.max(pc.utf8_length(pc.utf8_trim_whitespace(column))).as_py()
    if not longest:
        raise LongctxError(
            f"data file {path!r} is empty (no non-blank {field!r} in any row); add documents "
            "or remove it"
        )


def iter_column(table, field: str, batch_size: int = 1024) -> Iterator[object]:
    """The values of column ``field`` of a ``datasets.Dataset``, read batch by batch."""
    for batch in table.iter(batch_size=batch_size):
        yield from batch[field]


def check_sources(sources: list[str], field: str = "text") -> None:
    """Open and check every source (the errors of ``open_source``) without building
    documents: what the CLI driver runs before any worker starts."""
    for source in resolve_sources(sources):
        open_source(source, field)


def iter_documents(sources: list[str], field: str = "text") -> Iterator[Document]:
    """The non-blank documents of ``sources`` (files, directories, ``builtin``), in order."""
    for source in resolve_sources(sources):
        table = open_source(source, field)
        for row, text in enumerate(iter_column(table, field), start=1):
            if not text.strip():
                continue
            if source.kind == "builtin":
                yield Document(f"{BUILTIN_SOURCE}:{row}", text)
            elif source.kind == "txt":
                yield Document(source.path, text)
            else:
                yield Document(f"{source.path}:{row}", text)


def read_documents(sources: list[str], field: str = "text") -> list[Document]:
    """All documents of ``sources`` (``iter_documents``) in a list."""
    return list(iter_documents(sources, field))


def builtin_documents() -> list[Document]:
    """CPython's pydoc topics (English prose about Python), one document per topic."""
    return read_documents([BUILTIN_SOURCE])
