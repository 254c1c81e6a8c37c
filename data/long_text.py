"""Long evaluation sequences of real text: documents joined into a token stream and cut to an
exact token length.

A pretrained model's context extension is judged on real prose much longer than any single
document of a small corpus: the builtin ``pydoc_data.topics`` (79 topics, about 110k SmolLM2
tokens, the longest about 25k) or a user directory of ``.txt`` / ``.jsonl`` files (read by
``longctx.data.sources``). The documents are shuffled by the seed, each tokenized as
``[bos] + text + [eos]`` (the same form as the training corpus, ``text_document``), and joined
into one stream; when ``count * length`` tokens need more than the corpus holds, the stream
continues with the documents in a new shuffled order (the next "epoch"). The stream is cut into
``count`` consecutive windows of exactly ``length`` tokens, so every window is real text with
document boundaries marked by the tokenizer's eos, and the same seed gives the same windows.

``long_text_documents`` returns the stream as ``TokenDocument`` pieces (the input of the
evaluator's ``position_perplexity``, which cuts windows itself) and ``long_text_sequences`` the
``[count, length]`` tensor of windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from longctx.data.packing import TokenDocument, text_document
from longctx.data.sources import read_documents
from longctx.data.tokenizer import Tokenizer
from longctx.errors import LongctxError

_STREAM_LONG_TEXT = 0x10C7  # seeds the document order, apart from the other data streams


def long_text_documents(
    tokenizer: Tokenizer,
    length: int,
    count: int,
    *,
    sources: Sequence[str] = ("builtin",),
    seed: int = 0,
) -> list[TokenDocument]:
    """Tokenized documents of ``sources`` in seeded order (repeating in new orders as needed)
    holding at least ``count * length`` tokens; the last one is cut so that they hold exactly
    that many. Duplicate texts are dropped (first copy kept)."""
    if length < 2 or count < 1:
        raise LongctxError(
            f"long-text sequences need length >= 2 and count >= 1 (got length={length}, "
            f"count={count})"
        )
    texts = list(dict.fromkeys(doc.text for doc in read_documents(list(sources))))
    corpus = [
        text_document(ids, tokenizer.bos_id, tokenizer.eos_id)
        for ids in tokenizer.encode_batch(texts)
    ]
    needed = count * length
    rng = np.random.default_rng([seed, _STREAM_LONG_TEXT])
    chosen: list[TokenDocument] = []
    total = 0
    while total < needed:
        for index in rng.permutation(len(corpus)):
            document = corpus[index]
            take = min(len(document), needed - total)
            chosen.append(document if take == len(document) else document.slice(0, take))
            total += take
            if total == needed:
                break
    return chosen


def long_text_sequences(
    tokenizer: Tokenizer,
    length: int,
    count: int,
    *,
    sources: Sequence[str] = ("builtin",),
    seed: int = 0,
) -> Tensor:
    """``count`` consecutive windows of exactly ``length`` tokens of the seeded document stream
    (see the module docstring): ``[count, length]`` int64."""
    documents = long_text_documents(tokenizer, length, count, sources=sources, seed=seed)
    stream = np.concatenate([document.ids for document in documents])  # [count * length]
    return torch.from_numpy(stream.astype(np.int64)).view(count, length)
