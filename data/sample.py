"""What a generated task produces, and the token-budget helpers every generator shares.

A task sample is built in token space from separately encoded pieces (a sentence, a needle, an
instruction), so its length is known exactly while it is generated and long samples stay cheap:
a 32k-token passkey sample is a few hundred sentencepiece calls on short strings, no re-encoding
of the whole text. The model sees exactly ``prompt_ids`` then ``answer_ids`` in training and in
evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from longctx.data.packing import TokenDocument
from longctx.data.tokenizer import Tokenizer
from longctx.errors import LongctxError

_FILL_CHUNK = 32  # pieces generated and encoded per sentencepiece call while filling


@dataclass(frozen=True)
class Sample:
    """One task instance.

    ``prompt_ids`` starts with bos (when the tokenizer has one) and ends right before the
    answer; a model is scored on continuing it with ``answer_ids`` (whose text is ``answer``).
    ``fact_spans`` are the ``[start, end)`` token spans in ``prompt_ids`` of the inserted facts
    (passkey line, needles, queried pair), for depth checks and analysis.
    """

    task: str
    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    fact_spans: tuple[tuple[int, int], ...] = ()

    def __len__(self) -> int:
        """Tokens in the training document: prompt, answer and eos."""
        return len(self.prompt_ids) + len(self.answer_ids) + 1

    def document(self, eos_id: int, score_prompt: bool) -> TokenDocument:
        """The training document ``prompt + answer + [eos]``. The answer and the eos are scored
        (the model learns to answer and stop); the prompt only if ``score_prompt``."""
        ids = np.asarray([*self.prompt_ids, *self.answer_ids, eos_id], dtype=np.int64)
        scored = np.ones(len(ids), dtype=bool)
        if not score_prompt:
            scored[: len(self.prompt_ids)] = False
        scored[0] = False
        return TokenDocument(ids, scored)


class PromptBuilder:
    """Appends token pieces to a prompt and returns the span each one occupies."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]

    def add(self, piece: list[int]) -> tuple[int, int]:
        start = len(self.ids)
        self.ids.extend(piece)
        return start, len(self.ids)

    def add_all(self, pieces: list[list[int]]) -> None:
        for piece in pieces:
            self.ids.extend(piece)


class TargetTooShort(LongctxError):
    """A sample's fixed text (instructions, facts, question, answer) needs ``needed`` tokens,
    more than its target length. The packer catches it to draw a sample that fits."""

    def __init__(self, task: str, needed: int, target_tokens: int):
        super().__init__(
            f"task {task!r} needs at least {needed} tokens but the target length is "
            f"{target_tokens}; raise data.seq_len"
        )
        self.needed = needed
        self._args = (task, needed, target_tokens)

    def __reduce__(self):
        # Rebuild from the constructor's arguments so the error survives pickling (Ray sends
        # a worker's exception to the driver) with its real message.
        return (type(self), self._args)


def budget_after(task: str, target_tokens: int, fixed_tokens: int) -> int:
    """Tokens left for filler once ``fixed_tokens`` are placed; ``TargetTooShort`` if none."""
    left = target_tokens - fixed_tokens
    if left < 0:
        raise TargetTooShort(task, fixed_tokens, target_tokens)
    return left


def fill_pieces(
    rng: np.random.Generator,
    tokenizer: Tokenizer,
    budget: int,
    make_texts: Callable[[np.random.Generator, int], list[str]],
) -> list[list[int]]:
    """Encoded pieces from ``make_texts`` (called for ``_FILL_CHUNK`` texts at a time), in order,
    until the next one would exceed ``budget`` tokens. Deterministic in the generator state."""
    pieces: list[list[int]] = []
    used = 0
    while True:
        for piece in tokenizer.encode_batch(make_texts(rng, _FILL_CHUNK)):
            if used + len(piece) > budget:
                return pieces
            pieces.append(piece)
            used += len(piece)


def fill_cached_pieces(
    rng: np.random.Generator, tokenizer: Tokenizer, budget: int, choices: list[str]
) -> list[str]:
    """Words drawn uniformly from ``choices`` until the next would exceed ``budget`` tokens.

    Returns the words; their token ids come from ``tokenizer.encode_piece`` (cached), which is
    what makes million-item symbol streams cheap.
    """
    costs = [len(tokenizer.encode_piece(word)) for word in choices]
    words: list[str] = []
    used = 0
    while True:
        for index in rng.integers(len(choices), size=_FILL_CHUNK * 8):
            if used + costs[index] > budget:
                return words
            words.append(choices[index])
            used += costs[index]


def split_index(piece_lengths: list[int], depth: float) -> int:
    """How many pieces go before an insertion at ``depth`` (fraction of the pieces' tokens):
    the piece boundary closest to ``depth * total``."""
    boundaries = np.concatenate([[0], np.cumsum(piece_lengths)])  # [n+1] token offsets
    return int(np.argmin(np.abs(boundaries - depth * boundaries[-1])))
