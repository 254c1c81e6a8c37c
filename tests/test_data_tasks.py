"""Generated long-context tasks: each is deterministic from its seed, fits its token budget,
and its answer is correct by an independent check on the decoded prompt text (a parser or a
simulation written here, not the generator's own bookkeeping)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from longctx.data.config import NiahParams, TaskParams
from longctx.data.filler import filler_sentences
from longctx.data.tasks import GENERATED_TASKS, build_task, make_eval_example
from longctx.data.tokenizer import load_tokenizer, task_vocabulary_texts, train_tokenizer
from longctx.errors import LongctxError

PLACED = ("passkey", "niah", "kv_retrieval")  # tasks that take a depth


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(["builtin"], 1000, str(out), extra_texts=tuple(task_vocabulary_texts(0)))
    return load_tokenizer(str(out))


def _prompt_text(tokenizer, sample) -> str:
    return tokenizer.decode(sample.prompt_ids)


def test_filler_is_deterministic_and_never_looks_like_a_fact():
    first = filler_sentences(np.random.default_rng(4), 2000)
    assert first == filler_sentences(np.random.default_rng(4), 2000)
    assert first != filler_sentences(np.random.default_rng(5), 2000)
    text = " ".join(first)
    assert not re.search(r"\d", text)
    assert all(phrase not in text for phrase in ("pass key", "secret number", "Key ", "List:"))
    assert len(set(first)) > 1500  # varied: few repeated sentences


@pytest.mark.parametrize("task", GENERATED_TASKS)
def test_same_seed_same_sample_other_seed_other_sample(tokenizer, task):
    first = make_eval_example(task, tokenizer, 600, seed=5)
    again = make_eval_example(task, tokenizer, 600, seed=5)
    other = make_eval_example(task, tokenizer, 600, seed=6)
    assert first == again
    assert first.prompt_ids != other.prompt_ids


@pytest.mark.parametrize("task", GENERATED_TASKS)
@pytest.mark.parametrize("length", [512, 4096])
def test_sample_fits_and_nearly_fills_its_length(tokenizer, task, length):
    sample = make_eval_example(task, tokenizer, length, seed=1)
    assert length * 0.95 <= len(sample) <= length
    if tokenizer.bos_id is not None:
        assert sample.prompt_ids[0] == tokenizer.bos_id
    assert tokenizer.decode(sample.answer_ids) == sample.answer


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_digits_sit_at_the_requested_depth(tokenizer, depth):
    sample = make_eval_example("passkey", tokenizer, 4096, seed=3, depth=depth)
    text = _prompt_text(tokenizer, sample)
    found = re.findall(r"The pass key is (\d+), remember it\. (\d+) is the pass key\.", text)
    assert found == [(sample.answer, sample.answer)] and len(sample.answer) == 5
    # Depth measured on the text between the instruction and the question, in characters.
    haystack_start = text.index("remember it.") + len("remember it.")
    haystack_end = text.index("What is the pass key?")
    needle_at = text.index("The pass key is")
    measured = (needle_at - haystack_start) / (haystack_end - haystack_start)
    # One filler sentence is ~2% of a 4k-token haystack: the insertion lands on a boundary.
    assert abs(measured - depth) < 0.03
    start, end = sample.fact_spans[0]
    assert tokenizer.decode(sample.prompt_ids[start:end]).startswith("The pass key is")


@pytest.mark.parametrize(
    "params", [NiahParams(), NiahParams(num_keys=6, num_values=2, num_queries=3)]
)
def test_niah_answer_lists_the_queried_values_in_order(tokenizer, params):
    for seed in range(4):
        sample = make_eval_example(
            "niah", tokenizer, 2048, seed=seed, params=TaskParams(niah=params)
        )
        text = _prompt_text(tokenizer, sample)
        needles = re.findall(r"The secret number for the ([a-z]+ [a-z]+) is (\d+)\.", text)
        assert len(needles) == params.num_keys * params.num_values
        asked = re.search(r"secret numbers for the (.+)\? In order", text).group(1)
        queried = set(re.split(r", | and ", asked))
        assert len(queried) == params.num_queries
        expected = ", ".join(value for key, value in needles if key in queried)
        assert sample.answer == expected


def test_kv_retrieval_answer_is_the_value_of_the_asked_key(tokenizer):
    for seed in range(4):
        sample = make_eval_example("kv_retrieval", tokenizer, 2048, seed=seed)
        text = _prompt_text(tokenizer, sample)
        pairs = re.findall(r"Key ([0-9a-f]{8}) has value ([0-9a-f]{8})\.", text)
        table = dict(pairs)
        assert len(table) == len(pairs) > 20  # keys are unique
        asked = re.search(r"What is the value of key ([0-9a-f]{8})\?", text).group(1)
        assert sample.answer == table[asked]


def test_counting_answer_equals_the_count_in_the_list(tokenizer):
    counts = set()
    for seed in range(12):
        sample = make_eval_example("counting", tokenizer, 1024, seed=seed)
        text = _prompt_text(tokenizer, sample)
        words = text.split("List:")[1].split("End of list.")[0].split()
        word = re.search(r"does the word (\w+) appear", text).group(1)
        assert sample.answer == str(words.count(word))
        counts.add(words.count(word))
    assert len(counts) > 3  # the count varies with the seed


def test_selective_copy_answer_is_the_words_among_the_dashes(tokenizer):
    for seed in range(4):
        sample = make_eval_example("selective_copy", tokenizer, 1024, seed=seed)
        text = _prompt_text(tokenizer, sample)
        stream = text.split("Sequence:")[1].split("End of sequence.")[0].split()
        assert sample.answer.split() == [item for item in stream if item != "-"]
        assert stream.count("-") > 100


def _simulate_flip_flop(instructions: list[str]) -> int:
    """Run the instructions; assert that every answered read is right; return the final read."""
    memory = None
    for op, bit in zip(instructions[0::2], instructions[1::2]):
        if op == "w":
            memory = int(bit)
        elif op == "r":
            assert int(bit) == memory
        else:
            assert op == "i"
    return memory


def test_flip_flop_answer_is_the_last_written_bit(tokenizer):
    answers = set()
    for seed in range(10):
        sample = make_eval_example("flip_flop", tokenizer, 1024, seed=seed)
        text = _prompt_text(tokenizer, sample)
        instructions = text.split("Instructions:")[1].split()
        assert instructions[0] == "w" and instructions[-1] == "r"
        assert sample.answer == str(_simulate_flip_flop(instructions[:-1]))
        answers.add(sample.answer)
    assert answers == {"0", "1"}


@pytest.mark.parametrize("task", sorted(set(GENERATED_TASKS) - set(PLACED)))
def test_depth_is_refused_by_tasks_without_a_fact(tokenizer, task):
    with pytest.raises(LongctxError, match="does not apply"):
        make_eval_example(task, tokenizer, 512, seed=0, depth=0.5)


@pytest.mark.parametrize("task", GENERATED_TASKS)
def test_too_short_target_is_a_one_line_error(tokenizer, task):
    with pytest.raises(LongctxError) as err:
        build_task(task).sample(np.random.default_rng(0), 8, tokenizer)
    assert "\n" not in str(err.value) and "raise data.seq_len" in str(err.value)


@pytest.mark.parametrize("task", GENERATED_TASKS)
def test_32k_token_sample_is_cheap(tokenizer, task):
    start = time.perf_counter()
    sample = make_eval_example(task, tokenizer, 32768, seed=0)
    elapsed = time.perf_counter() - start
    assert len(sample) > 32768 * 0.99
    assert elapsed < 2.0  # measured 1-50 ms; generous for a loaded 2-core machine


def test_niah_and_kv_place_the_asked_fact_at_the_requested_depth(tokenizer):
    params = TaskParams(niah=NiahParams(num_keys=5, num_values=2, num_queries=2))
    niah = make_eval_example("niah", tokenizer, 2048, seed=2, depth=0.0, params=params)
    text = _prompt_text(tokenizer, niah)
    needles = re.findall(r"The secret number for the ([a-z]+ [a-z]+) is (\d+)\.", text)
    asked = set(re.split(r", | and ", re.search(r"numbers for the (.+)\? In", text).group(1)))
    assert {key for key, _ in needles[:4]} == asked  # the 2 x 2 asked needles come first
    assert "Remember them. The secret number for" in text  # right after the instruction
    kv = make_eval_example("kv_retrieval", tokenizer, 2048, seed=2, depth=1.0)
    text = _prompt_text(tokenizer, kv)
    asked_key = re.search(r"What is the value of key ([0-9a-f]{8})\?", text).group(1)
    last_pair = re.findall(r"Key ([0-9a-f]{8}) has value", text)[-1]
    assert last_pair == asked_key


def test_target_too_short_survives_pickling_with_its_message():
    import pickle

    from longctx.data.sample import TargetTooShort

    error = TargetTooShort("passkey", 40, 12)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.needed == 40
