"""Token corpora as documents of token ids: ``TokenCorpus`` is what packing and mixtures read.

``PreparedCorpus`` reads a directory written by ``longctx data prepare`` (see
``longctx.data.prepare``) through memory maps: each shard is a flat ``uint16``/``uint32`` token
file (``shard_NNNNN.bin``) plus an ``int64`` offset index (``shard_NNNNN.idx``, ``[n_docs + 1]``),
so opening a corpus reads only the manifest and the small indexes and a rank's memory does not
grow with the corpus. ``InMemoryCorpus`` wraps token arrays already in memory (small raw runs,
tests). Document ids are global: shard 0's documents first, then shard 1's, and so on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from longctx.errors import LongctxError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "longctx-token-shards-v1"


@runtime_checkable
class TokenCorpus(Protocol):
    """Documents of token ids (text tokens only, no bos/eos), addressed by index."""

    num_documents: int

    def document_lengths(self) -> np.ndarray:
        """Token count of every document, ``[num_documents]`` int64."""

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i``, ``[length]`` (an integer dtype; may be a memory map)."""


class InMemoryCorpus:
    """A ``TokenCorpus`` over token arrays held in memory."""

    def __init__(self, documents: list[np.ndarray] | list[list[int]]):
        self._documents = [np.asarray(d, dtype=np.int64) for d in documents]
        self.num_documents = len(self._documents)

    def document_lengths(self) -> np.ndarray:
        return np.asarray([len(d) for d in self._documents], dtype=np.int64)

    def document(self, i: int) -> np.ndarray:
        return self._documents[i]


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a prepared directory; one-line error when there is none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise LongctxError(
            f"{str(directory)!r} is not a prepared corpus (no {MANIFEST_NAME}); prepare it with "
            f"`longctx data prepare SOURCES --tokenizer PATH --out {directory}`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise LongctxError(
            f"{str(path)!r} has format {manifest.get('format')!r}, expected "
            f"{MANIFEST_FORMAT!r}; prepare the corpus again with this longctx"
        )
    return manifest


def is_prepared(directory: str | Path) -> bool:
    """Whether ``directory`` holds a prepared corpus (a manifest)."""
    return (Path(directory) / MANIFEST_NAME).is_file()


class PreparedCorpus:
    """A ``TokenCorpus`` over a prepared directory, memory-mapped.

    Opening checks that every shard file exists with the size the manifest records (a missing
    or truncated shard is a one-line error); ``verify()`` also checks the sha256 of each file
    (it reads the whole corpus, so the trainer does not call it at every launch).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokenizer_sha256: str = self.manifest["tokenizer"]["sha256"]
        shards = self.manifest["shards"]
        for shard in shards:
            self._check_file(shard["tokens_file"], shard["tokens"] * self.dtype.itemsize)
            self._check_file(shard["index_file"], (shard["documents"] + 1) * 8)
        self._tokens = [self._map(s["tokens_file"], self.dtype) for s in shards]
        self._index = [self._map(s["index_file"], np.dtype(np.int64)) for s in shards]
        counts = np.asarray([s["documents"] for s in shards], dtype=np.int64)
        self._first_doc = np.concatenate([[0], np.cumsum(counts)])  # [n_shards + 1]
        self.num_documents = int(self._first_doc[-1])
        self.num_tokens = int(self.manifest["tokens"])

    def _check_file(self, name: str, expected_bytes: int) -> None:
        path = self.directory / name
        if not path.is_file():
            raise LongctxError(
                f"prepared corpus {str(self.directory)!r} is missing shard file {name!r}; "
                "run `longctx data prepare` again with the same --out to rebuild it"
            )
        size = path.stat().st_size
        if size != expected_bytes:
            raise LongctxError(
                f"shard file {str(path)!r} has {size} bytes, the manifest says "
                f"{expected_bytes} (truncated or replaced); delete it and run "
                "`longctx data prepare` again with the same --out"
            )

    def _map(self, name: str, dtype: np.dtype) -> np.ndarray:
        path = self.directory / name
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def document_lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(index) for index in self._index]).astype(np.int64)

    def document(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} outside [0, {self.num_documents})")
        shard = int(np.searchsorted(self._first_doc, i, side="right")) - 1
        local = i - int(self._first_doc[shard])
        index = self._index[shard]
        return self._tokens[shard][int(index[local]) : int(index[local + 1])]

    def check_tokenizer(self, sha256: str, where: str) -> None:
        """One-line error when the corpus was tokenized by another tokenizer than ``where``'s."""
        if sha256 != self.tokenizer_sha256:
            raise LongctxError(
                f"prepared corpus {str(self.directory)!r} was tokenized with tokenizer "
                f"{self.manifest['tokenizer']['path']!r} (sha256 {self.tokenizer_sha256[:12]}), "
                f"not {where} (sha256 {sha256[:12]}); prepare it again with --tokenizer set "
                "to the run's tokenizer"
            )

    def verify(self) -> None:
        """Check the sha256 of every shard file against the manifest."""
        from longctx.data.prepare import file_sha256

        for shard in self.manifest["shards"]:
            for key in ("tokens_file", "index_file"):
                name = shard[key]
                if file_sha256(self.directory / name) != shard[key.replace("file", "sha256")]:
                    raise LongctxError(
                        f"shard file {str(self.directory / name)!r} does not match its sha256 "
                        "in the manifest; delete it and run `longctx data prepare` again"
                    )
