"""Retrieval tasks (SPECS 4): passkey, needle in a haystack (multi-key / multi-value /
multi-query, as in RULER) and key-value retrieval.

Each task is a deterministic generator: ``sample(rng, target_tokens, tokenizer, depth=None)``
returns a ``Sample`` of at most ``target_tokens`` tokens (prompt + answer + eos) that is a pure
function of the generator state. ``depth`` (a fraction in [0, 1]) places the fact to retrieve
that far into the context, for evaluation grids; None draws it at random.
"""

from __future__ import annotations

import numpy as np

from longctx.data.config import KeyValueParams, NiahParams, PasskeyParams
from longctx.data.filler import ADJECTIVES, PEOPLE, filler_sentences
from longctx.data.sample import PromptBuilder, Sample, budget_after, fill_pieces, split_index
from longctx.data.tokenizer import Tokenizer

PASSKEY_INTRO = "A pass key is hidden somewhere in the long text below. Find it and remember it."
PASSKEY_NEEDLE = "The pass key is {key}, remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NIAH_INTRO = "Secret numbers for a few people are hidden in the text below. Remember them."
NIAH_NEEDLE = "The secret number for the {key} is {value}."
NIAH_QUESTION = "What are the secret numbers for the {keys}? In order of appearance, they are"

KV_INTRO = "Below is a list of keys and their values. Every key appears once."
KV_PAIR = "Key {key} has value {value}."
KV_QUESTION = "What is the value of key {key}? The value is"

_HEX = "0123456789abcdef"


def _random_number(rng: np.random.Generator, digits: int) -> str:
    """A ``digits``-digit decimal number without a leading zero."""
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def _random_hex(rng: np.random.Generator, chars: int) -> str:
    return "".join(_HEX[i] for i in rng.integers(16, size=chars))


def _choose_depth(rng: np.random.Generator, depth: float | None, default: float | None) -> float:
    if depth is not None:
        return depth
    return default if default is not None else float(rng.random())


def _join_names(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class PasskeyTask:
    """Filler text with ``The pass key is NNNNN, remember it.`` at a depth; the model answers
    with the digits."""

    name = "passkey"

    def __init__(self, params: PasskeyParams):
        self.params = params

    def sample(
        self,
        rng: np.random.Generator,
        target_tokens: int,
        tokenizer: Tokenizer,
        depth: float | None = None,
    ) -> Sample:
        key = _random_number(rng, self.params.digits)
        depth = _choose_depth(rng, depth, self.params.depth)
        intro = tokenizer.encode_piece(PASSKEY_INTRO)
        needle = tokenizer.encode(PASSKEY_NEEDLE.format(key=key))
        question = tokenizer.encode_piece(PASSKEY_QUESTION)
        answer = tokenizer.encode(key)
        prompt = PromptBuilder(tokenizer)
        fixed = len(prompt.ids) + len(intro) + len(needle) + len(question) + len(answer) + 1
        filler = fill_pieces(
            rng, tokenizer, budget_after(self.name, target_tokens, fixed), filler_sentences
        )
        before = split_index([len(p) for p in filler], depth)
        prompt.add(intro)
        prompt.add_all(filler[:before])
        needle_span = prompt.add(needle)
        prompt.add_all(filler[before:])
        prompt.add(question)
        return Sample(self.name, prompt.ids, answer, key, (needle_span,))


class NiahTask:
    """Needles ``The secret number for the <key> is <value>.`` in filler: ``num_keys`` keys with
    ``num_values`` values each; the question asks ``num_queries`` keys and the answer lists their
    values in order of appearance, separated by ", "."""

    name = "niah"

    def __init__(self, params: NiahParams):
        self.params = params

    def sample(
        self,
        rng: np.random.Generator,
        target_tokens: int,
        tokenizer: Tokenizer,
        depth: float | None = None,
    ) -> Sample:
        p = self.params
        key_codes = rng.choice(len(ADJECTIVES) * len(PEOPLE), size=p.num_keys, replace=False)
        keys = [f"{ADJECTIVES[c // len(PEOPLE)]} {PEOPLE[c % len(PEOPLE)]}" for c in key_codes]
        queried = [keys[i] for i in rng.choice(p.num_keys, size=p.num_queries, replace=False)]
        values: set[str] = set()
        needles: list[tuple[str, str]] = []  # (key, value), before placement
        for key in keys:
            for _ in range(p.num_values):
                value = _random_number(rng, p.value_digits)
                while value in values:
                    value = _random_number(rng, p.value_digits)
                values.add(value)
                needles.append((key, value))
        # Queried needles go to ``depth`` when one is asked for; the rest (and all without a
        # depth) at uniform depths. A stable sort keeps equal depths in generation order.
        depths = rng.random(len(needles))
        if depth is not None:
            depths[[i for i, (k, _) in enumerate(needles) if k in queried]] = depth
        order = np.argsort(depths, kind="stable")
        needles = [needles[i] for i in order]
        depths = depths[order]

        answer_text = ", ".join(v for k, v in needles if k in queried)
        intro = tokenizer.encode_piece(NIAH_INTRO)
        needle_ids = tokenizer.encode_batch(
            [NIAH_NEEDLE.format(key=k, value=v) for k, v in needles]
        )
        question = tokenizer.encode(NIAH_QUESTION.format(keys=_join_names(queried)))
        answer = tokenizer.encode(answer_text)
        prompt = PromptBuilder(tokenizer)
        fixed = len(prompt.ids) + len(intro) + sum(map(len, needle_ids)) + len(question)
        fixed += len(answer) + 1
        filler = fill_pieces(
            rng, tokenizer, budget_after(self.name, target_tokens, fixed), filler_sentences
        )
        lengths = [len(piece) for piece in filler]
        cuts = [split_index(lengths, float(d)) for d in depths]  # non-decreasing
        prompt.add(intro)
        spans = []
        placed = 0
        for cut, needle in zip(cuts, needle_ids):
            prompt.add_all(filler[placed:cut])
            spans.append(prompt.add(needle))
            placed = cut
        prompt.add_all(filler[placed:])
        prompt.add(question)
        return Sample(self.name, prompt.ids, answer, answer_text, tuple(spans))


class KeyValueTask:
    """A context made only of ``Key <hex> has value <hex>.`` lines; the question names one key
    and the answer is its value."""

    name = "kv_retrieval"

    def __init__(self, params: KeyValueParams):
        self.params = params

    def sample(
        self,
        rng: np.random.Generator,
        target_tokens: int,
        tokenizer: Tokenizer,
        depth: float | None = None,
    ) -> Sample:
        chars = self.params.key_chars
        query_key, query_value = _random_hex(rng, chars), _random_hex(rng, chars)
        seen = {query_key}

        def make_pairs(generator: np.random.Generator, count: int) -> list[str]:
            texts = []
            for _ in range(count):
                key = _random_hex(generator, chars)
                while key in seen:
                    key = _random_hex(generator, chars)
                seen.add(key)
                texts.append(KV_PAIR.format(key=key, value=_random_hex(generator, chars)))
            return texts

        intro = tokenizer.encode_piece(KV_INTRO)
        query_pair = tokenizer.encode(KV_PAIR.format(key=query_key, value=query_value))
        question = tokenizer.encode(KV_QUESTION.format(key=query_key))
        answer = tokenizer.encode(query_value)
        prompt = PromptBuilder(tokenizer)
        fixed = len(prompt.ids) + len(intro) + len(query_pair) + len(question) + len(answer) + 1
        pairs = fill_pieces(
            rng, tokenizer, budget_after(self.name, target_tokens, fixed), make_pairs
        )
        if depth is None:
            before = int(rng.integers(len(pairs) + 1))
        else:
            before = split_index([len(p) for p in pairs], depth)
        prompt.add(intro)
        prompt.add_all(pairs[:before])
        span = prompt.add(query_pair)
        prompt.add_all(pairs[before:])
        prompt.add(question)
        return Sample(self.name, prompt.ids, answer, query_value, (span,))


RETRIEVAL_PHRASES = (
    PASSKEY_INTRO,
    PASSKEY_NEEDLE.format(key="12345"),
    PASSKEY_QUESTION,
    NIAH_INTRO,
    NIAH_NEEDLE.format(key="quiet baker", value="1234567"),
    NIAH_QUESTION.format(keys="quiet baker and brave poet"),
    KV_INTRO,
    KV_PAIR.format(key="0a1b2c3d", value="4e5f6789"),
    KV_QUESTION.format(key="0a1b2c3d"),
)
