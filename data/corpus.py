"""The token-corpus interface: documents as token-id arrays, addressed by index.

``TokenCorpus`` is what the packing and mixing code needs from a corpus without holding it in
memory: the number of documents, all their lengths at once (``[n]`` int64, to plan rows and
mixtures) and one document's token ids on demand. ``InMemoryCorpus`` implements it over a list
of arrays (raw sources tokenized at launch, chat conversations); a memory-mapped prepared
corpus implements the same three members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class TokenCorpus(Protocol):
    """Documents ``0 .. num_documents - 1`` of token ids."""

    @property
    def num_documents(self) -> int: ...

    def document_lengths(self) -> np.ndarray:
        """``[num_documents]`` int64: the token count of each document."""
        ...

    def document(self, index: int) -> np.ndarray:
        """``[length]`` token ids of document ``index``."""
        ...


class InMemoryCorpus:
    """A ``TokenCorpus`` over token-id arrays held in memory (kept as given, not copied)."""

    def __init__(self, documents: Sequence[np.ndarray]):
        self._documents = list(documents)
        self._lengths = np.asarray([len(d) for d in self._documents], dtype=np.int64)

    @property
    def num_documents(self) -> int:
        return len(self._documents)

    def document_lengths(self) -> np.ndarray:
        return self._lengths

    def document(self, index: int) -> np.ndarray:
        return self._documents[index]
