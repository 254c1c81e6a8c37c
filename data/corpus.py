"""Prepared token corpora: ``PreparedCorpus`` is what packing and mixtures read.

``PreparedCorpus`` reads a directory written by ``longctx data prepare`` (or prepared on the fly
for a run's raw sources; see ``longctx.data.prepare``) through memory maps: each shard is a flat
``uint16``/``uint32`` token file (``shard_NNNNN.bin``), an ``int64`` offset index
(``shard_NNNNN.idx``, ``[n_docs + 1]``), a ``uint64`` key per document (``shard_NNNNN.key``, a
hash of its text for deduplication) and, for chat corpora, a ``uint8`` loss mask per token
(``shard_NNNNN.mask``). Opening a corpus reads only the manifest and the small per-document
arrays, so a rank's memory does not grow with the corpus' tokens. Document ids are global:
shard 0's documents first, then shard 1's, and so on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from longctx.errors import LongctxError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "longctx-token-shards-v2"


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
    """A prepared directory, memory-mapped.

    Opening checks that every shard file exists with the size the manifest records (a missing
    or truncated shard is a one-line error); ``verify()`` also checks the sha256 of each file
    (it reads the whole corpus, so the trainer does not call it at every launch). ``kind`` is
    ``text`` (documents are text tokens only; readers add bos/eos) or ``chat`` (rendered
    conversations with a loss mask, ``document_mask``). ``keep_alive`` is an object the corpus
    holds for as long as it lives (the temporary directory of an unnamed on-the-fly corpus).
    """

    def __init__(self, directory: str | Path, keep_alive: object | None = None):
        self.directory = Path(directory)
        self.keep_alive = keep_alive
        self.manifest = read_manifest(self.directory)
        self.kind: str = self.manifest["kind"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokenizer_sha256: str = self.manifest["tokenizer"]["sha256"]
        shards = self.manifest["shards"]
        for shard in shards:
            tokens, documents = shard["tokens"], shard["documents"]
            self._check_file(shard["tokens_file"], tokens * self.dtype.itemsize)
            self._check_file(shard["index_file"], (documents + 1) * 8)
            self._check_file(shard["keys_file"], documents * 8)
            if self.kind == "chat":
                self._check_file(shard["mask_file"], tokens)
        self._tokens = [self._map(s["tokens_file"], self.dtype) for s in shards]
        self._index = [self._map(s["index_file"], np.dtype(np.int64)) for s in shards]
        self._masks = [
            self._map(s["mask_file"], np.dtype(np.uint8)) for s in shards if self.kind == "chat"
        ]
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
        """Token count of every document, ``[num_documents]`` int64."""
        return np.concatenate([np.diff(index) for index in self._index]).astype(np.int64)

    def document_keys(self) -> np.ndarray:
        """The text hash of every document, ``[num_documents]`` uint64 (equal texts, equal
        keys)."""
        keys = [self._map(s["keys_file"], np.dtype(np.uint64)) for s in self.manifest["shards"]]
        return np.concatenate(keys).astype(np.uint64)

    def _locate(self, i: int) -> tuple[int, int, int]:
        """(shard, first token, end token) of document ``i``."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} outside [0, {self.num_documents})")
        shard = int(np.searchsorted(self._first_doc, i, side="right")) - 1
        local = i - int(self._first_doc[shard])
        index = self._index[shard]
        return shard, int(index[local]), int(index[local + 1])

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i``, ``[length]`` (a slice of the memory map)."""
        shard, start, end = self._locate(i)
        return self._tokens[shard][start:end]

    def document_mask(self, i: int) -> np.ndarray:
        """Which tokens of chat document ``i`` carry the loss, ``[length]`` bool."""
        shard, start, end = self._locate(i)
        return self._masks[shard][start:end].astype(bool)

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
            for key in [k for k in shard if k.endswith("_file")]:
                name = shard[key]
                if file_sha256(self.directory / name) != shard[key.replace("file", "sha256")]:
                    raise LongctxError(
                        f"shard file {str(self.directory / name)!r} does not match its sha256 "
                        "in the manifest; delete it and run `longctx data prepare` again"
                    )
