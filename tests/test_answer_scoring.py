"""Retrieval answers are scored on their content, as RULER compares strings: a byte-level BPE
(SmolLM2, Llama 3, Qwen2) tokenizes " 12345" as a lone space token and five digits, and a model
that continues "The pass key is" with " the 12345" knows the key. The separator token joins the
prompt (teacher-forced) and only the content is compared; token accuracy counts content tokens.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from longctx.data.tokenizer import load_tokenizer
from longctx.eval.evaluate import score_example, separator_tokens

TEXT = [
    "The pass key is 90527. Remember it. What is the pass key? The pass key is 90527.",
    "the grass is green and the sky is blue; the answer is 12345 or 67890 again and again",
]


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory):
    """A tokenizer.json like SmolLM2's: digits split one by one, byte-level BPE, no prefix
    space of its own (longctx adds one before a piece, as for the real models)."""
    backend = HfTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TEXT * 20, trainer)
    directory = tmp_path_factory.mktemp("byte_bpe")
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return load_tokenizer(str(directory))


class TableScorer:
    """Stands in for ``SequenceScorer``: its argmax at each position is the true next token,
    except where ``wrong`` maps a true token to another one (what a real model writes)."""

    def __init__(self, wrong: dict[int, int]):
        self.wrong = wrong
        self.calls: list[tuple[int, int, int]] = []

    def answer_scores(self, ids, first: int, count: int) -> tuple[list[int], float]:
        self.calls.append((len(ids), first, count))
        gold = ids[first + 1 : first + 1 + count].tolist()
        return [self.wrong.get(token, token) for token in gold], 1.5


def test_lone_space_answer_token_is_the_separator(byte_bpe):
    answer = byte_bpe.encode("90527")
    assert byte_bpe.decode(answer[:1]) == " "  # the separator the model need not predict
    assert separator_tokens(byte_bpe, answer) == 1
    assert separator_tokens(byte_bpe, answer[1:]) == 0  # content alone: nothing to move


def test_model_that_writes_the_before_the_key_is_right(byte_bpe):
    prompt = byte_bpe.encode("The pass key is 90527. What is the pass key? The pass key is")
    answer = byte_bpe.encode("90527")
    space, the = answer[0], byte_bpe.encode(" the")[0]
    scorer = TableScorer(wrong={space: the})
    score = score_example(scorer, byte_bpe, prompt, answer)
    assert score.correct and score.predicted == "90527"
    assert (score.hits, score.tokens) == (5, 5)
    # one teacher-forced forward over prompt + separator, scoring the 5 digits after it
    assert scorer.calls == [(len(prompt) + len(answer), len(prompt), 5)]


def test_a_wrong_digit_is_wrong_and_counts_in_token_accuracy(byte_bpe):
    prompt = byte_bpe.encode("What is the pass key? The pass key is")
    answer = byte_bpe.encode("90527")
    seven, one = byte_bpe.encode("7")[-1], byte_bpe.encode("1")[-1]
    score = score_example(TableScorer(wrong={seven: one}), byte_bpe, prompt, answer)
    assert not score.correct and score.predicted == "90521"
    assert (score.hits, score.tokens) == (4, 5)
