"""Algorithmic long-context tasks (SPECS 4) used to probe position encodings such as CoPE:
counting, selective copy and flip-flop.

Their contexts are streams of short symbols (words, dashes, instructions) whose token ids come
from the tokenizer's piece cache, so a 32k-token sample costs a few list operations per symbol.
Like the retrieval tasks, ``sample(rng, target_tokens, tokenizer, depth=None)`` is a pure
function of the generator state; these tasks have no single fact to place, so ``depth`` must be
None.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from longctx.data.config import CountingParams, FlipFlopParams, SelectiveCopyParams
from longctx.data.sample import (
    PromptBuilder,
    Sample,
    TargetTooShort,
    budget_after,
    fill_cached_pieces,
)
from longctx.data.tokenizer import Tokenizer
from longctx.errors import LongctxError

COUNT_WORDS = (
    "apple",
    "pear",
    "plum",
    "fig",
    "lime",
    "kiwi",
    "melon",
    "grape",
    "mango",
    "peach",
    "cherry",
    "lemon",
    "olive",
    "date",
    "berry",
    "quince",
    "papaya",
    "guava",
    "apricot",
    "banana",
    "orange",
    "coconut",
    "raisin",
    "walnut",
)
COUNT_INTRO = "Count how many times the word {word} appears in the list below."
COUNT_LIST_START = "List:"
COUNT_LIST_END = "End of list."
COUNT_QUESTION = "How many times does the word {word} appear in the list? It appears"

COPY_WORDS = (
    "lamp",
    "kettle",
    "anchor",
    "ribbon",
    "candle",
    "compass",
    "basket",
    "mirror",
    "feather",
    "bottle",
    "hammer",
    "ladder",
    "pillow",
    "saddle",
    "trumpet",
    "umbrella",
    "violin",
    "wagon",
    "blanket",
    "button",
    "helmet",
    "jacket",
    "needle",
    "pencil",
)
COPY_NOISE = "-"
COPY_INTRO = "Copy the words hidden among the dashes, in the order they appear."
COPY_START = "Sequence:"
COPY_END = "End of sequence."
COPY_QUESTION = "The words, in order, are"

FLIP_FLOP_INTRO = (
    "Follow the instructions: w writes its bit, i ignores its bit, r reads the last written bit."
)
FLIP_FLOP_START = "Instructions:"
FLIP_FLOP_READ = "r"
_INSTRUCTION_CHUNK = 256


def _no_depth(task: str, depth: float | None) -> None:
    if depth is not None:
        raise LongctxError(
            f"task {task!r} has no fact to place, so depth={depth} does not apply; "
            "pass depth=None (depth is for passkey, niah and kv_retrieval)"
        )


class CountingTask:
    """A list of words from a small alphabet; the answer is how often the queried word occurs
    (uniform in ``[0, max_count]``, written in decimal)."""

    name = "counting"

    def __init__(self, params: CountingParams):
        self.params = params

    def sample(
        self,
        rng: np.random.Generator,
        target_tokens: int,
        tokenizer: Tokenizer,
        depth: float | None = None,
    ) -> Sample:
        _no_depth(self.name, depth)
        alphabet = list(COUNT_WORDS[: self.params.alphabet_size])
        word = alphabet.pop(int(rng.integers(len(alphabet))))
        count = int(rng.integers(self.params.max_count + 1))
        head = [
            tokenizer.encode_piece(COUNT_INTRO.format(word=word)),
            tokenizer.encode_piece(COUNT_LIST_START),
        ]
        tail = [
            tokenizer.encode_piece(COUNT_LIST_END),
            tokenizer.encode_piece(COUNT_QUESTION.format(word=word)),
        ]
        answer = tokenizer.encode(str(count))
        prompt = PromptBuilder(tokenizer)
        word_ids = tokenizer.encode_piece(word)
        fixed = len(prompt.ids) + sum(map(len, head + tail)) + len(answer) + 1
        fixed += count * len(word_ids)
        others = fill_cached_pieces(
            rng, tokenizer, budget_after(self.name, target_tokens, fixed), alphabet
        )
        stream = others + [word] * count
        # Scatter the counted word: a uniform arrangement of the stream's items.
        stream = [stream[i] for i in rng.permutation(len(stream))]
        prompt.add_all(head)
        prompt.add_all([tokenizer.encode_piece(item) for item in stream])
        prompt.add_all(tail)
        return Sample(self.name, prompt.ids, answer, str(count))


class SelectiveCopyTask:
    """``num_items`` words at random places in a stream of dashes; the answer is the words in
    order, separated by spaces."""

    name = "selective_copy"

    def __init__(self, params: SelectiveCopyParams):
        self.params = params

    def sample(
        self,
        rng: np.random.Generator,
        target_tokens: int,
        tokenizer: Tokenizer,
        depth: float | None = None,
    ) -> Sample:
        _no_depth(self.name, depth)
        items = [COPY_WORDS[i] for i in rng.integers(len(COPY_WORDS), size=self.params.num_items)]
        answer_text = " ".join(items)
        head = [tokenizer.encode_piece(COPY_INTRO), tokenizer.encode_piece(COPY_START)]
        tail = [tokenizer.encode_piece(COPY_END), tokenizer.encode_piece(COPY_QUESTION)]
        item_ids = [tokenizer.encode_piece(item) for item in items]
        noise_ids = tokenizer.encode_piece(COPY_NOISE)
        answer = tokenizer.encode(answer_text)
        prompt = PromptBuilder(tokenizer)
        fixed = len(prompt.ids) + sum(map(len, head + tail + item_ids)) + len(answer) + 1
        noise_count = budget_after(self.name, target_tokens, fixed) // len(noise_ids)
        slots = noise_count + len(items)
        item_slots = np.sort(rng.choice(slots, size=len(items), replace=False))
        stream = [noise_ids] * slots
        for slot, ids in zip(item_slots, item_ids):
            stream[slot] = ids
        prompt.add_all(head)
        prompt.add_all(stream)
        prompt.add_all(tail)
        return Sample(self.name, prompt.ids, answer, answer_text)


class FlipFlopTask:
    """Instructions ``w b`` (write bit b), ``i b`` (ignore) and ``r b`` (read: b is the last
    written bit), starting with a write; the prompt ends with a bare ``r`` and the answer is the
    bit it reads."""

    name = "flip_flop"

    def __init__(self, params: FlipFlopParams):
        self.params = params

    def sample(
        self,
        rng: np.random.Generator,
        target_tokens: int,
        tokenizer: Tokenizer,
        depth: float | None = None,
    ) -> Sample:
        _no_depth(self.name, depth)
        p = self.params
        op_probs = [p.write_prob, p.read_prob, 1.0 - p.write_prob - p.read_prob]
        pieces = {
            (op, bit): tokenizer.encode_piece(f"{op} {bit}") for op in "wri" for bit in (0, 1)
        }
        head = [tokenizer.encode_piece(FLIP_FLOP_INTRO), tokenizer.encode_piece(FLIP_FLOP_START)]
        read = tokenizer.encode_piece(FLIP_FLOP_READ)
        # The answer's tokens depend on the final bit; reserve the longer of the two spellings.
        answer_room = max(len(tokenizer.encode_piece(str(bit))) for bit in (0, 1))
        prompt = PromptBuilder(tokenizer)
        fixed = len(prompt.ids) + sum(map(len, head)) + len(read) + answer_room + 1
        budget = budget_after(self.name, target_tokens, fixed)
        stream: list[list[int]] = []
        memory: int | None = None  # the last written bit
        used = 0
        for op, bit in _instructions(rng, op_probs):
            op = "w" if memory is None else op  # the stream starts with a write
            piece = pieces[(op, memory if op == "r" else bit)]
            if used + len(piece) > budget:
                break
            stream.append(piece)
            used += len(piece)
            if op == "w":
                memory = bit
        if memory is None:  # not even the first write fits
            raise TargetTooShort(self.name, fixed + len(pieces[("w", 0)]), target_tokens)
        prompt.add_all(head)
        prompt.add_all(stream)
        prompt.add(read)
        answer_text = str(memory)
        return Sample(self.name, prompt.ids, tokenizer.encode(answer_text), answer_text)


def _instructions(rng: np.random.Generator, op_probs: list[float]) -> Iterator[tuple[str, int]]:
    """An endless stream of (op, bit) with ops w/r/i drawn with ``op_probs``, bits uniform."""
    while True:
        ops = rng.choice(3, size=_INSTRUCTION_CHUNK, p=op_probs)
        bits = rng.integers(2, size=_INSTRUCTION_CHUNK)
        for op_index, bit in zip(ops, bits):
            yield "wri"[op_index], int(bit)


ALGORITHMIC_PHRASES = (
    COUNT_INTRO.format(word="apple"),
    COUNT_LIST_START,
    " ".join(COUNT_WORDS),
    COUNT_LIST_END,
    COUNT_QUESTION.format(word="apple"),
    COPY_INTRO,
    COPY_START,
    " ".join(COPY_WORDS) + " - - -",
    COPY_END,
    COPY_QUESTION,
    FLIP_FLOP_INTRO,
    FLIP_FLOP_START + " w 0 w 1 i 0 i 1 r 0 r 1",
)
