"""Corpus sources: plain-text files, JSON-lines files and directories of them, plus a builtin
English corpus that exists on every machine.

A ``.txt`` file is one document (long files stay long: packing splits them into rows). A
``.jsonl`` file holds one JSON object per line whose ``text`` field is a document. A directory
contributes every ``.txt`` / ``.jsonl`` file below it, in sorted path order so that the corpus is
the same on every machine. ``builtin`` is the help text of CPython's ``pydoc_data.topics`` (79
topics, about 460k characters), useful for demos and tests.

Every problem with an input (missing, empty, binary, not UTF-8, JSON without ``text``) raises a
one-line ``LongctxError`` naming the file (and line) and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from longctx.data.config import BUILTIN_SOURCE
from longctx.errors import LongctxError

SUPPORTED_SUFFIXES = (".txt", ".jsonl")
_BINARY_PROBE_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One corpus document: ``name`` says where it came from (``file`` or ``file:line``)."""

    name: str
    text: str


def expand_sources(sources: list[str]) -> list[str]:
    """Resolve directories to their ``.txt``/``.jsonl`` files; keep ``builtin`` as is.

    Returns a list of file paths (as strings) and ``builtin`` markers, in a stable order.
    """
    expanded: list[str] = []
    for source in sources:
        if source == BUILTIN_SOURCE:
            expanded.append(source)
            continue
        path = Path(source)
        if not path.exists():
            raise LongctxError(
                f"data source {source!r} does not exist; check the path "
                f"(or use {BUILTIN_SOURCE!r} for the builtin English corpus)"
            )
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES
            )
            if not files:
                raise LongctxError(
                    f"data directory {source!r} has no .txt or .jsonl files; "
                    "add some or point at another directory"
                )
            expanded.extend(str(p) for p in files)
        elif path.suffix in SUPPORTED_SUFFIXES:
            expanded.append(str(path))
        else:
            raise LongctxError(
                f"data source {source!r} has unsupported type {path.suffix or '(none)'!r}; "
                "use .txt or .jsonl files or a directory of them"
            )
    return expanded


def read_documents(sources: list[str]) -> list[Document]:
    """All documents of ``sources`` (files, directories, ``builtin``), in a stable order."""
    documents: list[Document] = []
    for source in expand_sources(sources):
        if source == BUILTIN_SOURCE:
            documents.extend(builtin_documents())
        elif source.endswith(".jsonl"):
            documents.extend(_read_jsonl(Path(source)))
        else:
            documents.append(Document(source, _read_text_file(Path(source))))
    if not documents:
        raise LongctxError(f"data sources {sources} contain no documents; add text to them")
    return documents


def builtin_documents() -> list[Document]:
    """CPython's pydoc topics (English prose about Python), one document per topic."""
    from pydoc_data.topics import topics

    return [Document(f"{BUILTIN_SOURCE}:{name}", topics[name]) for name in sorted(topics)]


def _read_utf8(path: Path) -> str:
    """The file's text; one-line errors for binary or non-UTF-8 content."""
    raw = path.read_bytes()
    if b"\x00" in raw[:_BINARY_PROBE_BYTES]:
        raise LongctxError(
            f"data file {str(path)!r} looks binary (NUL bytes in its first "
            f"{_BINARY_PROBE_BYTES} bytes); use UTF-8 text (.txt) or JSON lines (.jsonl)"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LongctxError(
            f"data file {str(path)!r} is not valid UTF-8 (byte {err.start}: "
            f"{raw[err.start : err.start + 1]!r}); re-encode it as UTF-8, e.g. "
            f"`iconv -t UTF-8 {path}`"
        ) from None


def _read_text_file(path: Path) -> str:
    text = _read_utf8(path)
    if not text.strip():
        raise LongctxError(f"data file {str(path)!r} is empty; add text or remove it")
    return text


def json_lines(path: Path, what: str) -> Iterator[tuple[str, object]]:
    """``(where, record)`` of every non-blank line of a JSON-lines file (``where`` is
    ``path:line``); a line that is not JSON is a one-line error naming ``what`` and the line."""
    for line_number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise LongctxError(
                f"{what} line {where!r} is not valid JSON ({err.msg} at column {err.colno}); "
                "write one JSON object per line"
            ) from None


def _read_jsonl(path: Path) -> list[Document]:
    documents = []
    for where, record in json_lines(path, "data file"):
        if not isinstance(record, dict) or "text" not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise LongctxError(
                f"data file line {where!r} has no 'text' field (found {keys}); "
                'each line must be an object like {"text": "..."}'
            )
        text = record["text"]
        if not isinstance(text, str):
            raise LongctxError(
                f"data file line {where!r} has a 'text' of type {type(text).__name__}; "
                "it must be a string"
            )
        if text.strip():
            documents.append(Document(where, text))
    if not documents:
        raise LongctxError(
            f"data file {str(path)!r} is empty (no line with a non-empty 'text'); "
            "add documents or remove it"
        )
    return documents
