"""Long-context evaluation on a tiny real decoder (seeded random weights, 2 layers, vocab 320).

References: the model's full ``[T, vocab]`` logits in float64 for perplexity by position and
for the teacher-forced answer scores; a direct greedy-decoding loop (one full forward per
generated token) for retrieval correctness; TensorBoard's own event reader and matplotlib's PNG
reader for the recorded outputs.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from trainer_helpers import make_data, tiny_recipe

from longctx.data import load_corpus, load_tokenizer, make_eval_example
from longctx.errors import LongctxError
from longctx.eval.evaluate import (
    passkey_accuracy,
    position_buckets,
    position_perplexity,
    retrieval_accuracy,
)
from longctx.eval.report import (
    EvalPlan,
    eval_scalars,
    log_eval_tensorboard,
    results_json,
    run_eval_suite,
    write_eval_outputs,
)
from longctx.model import Transformer

# Passkey examples need >= 165 tokens and niah >= 311 with this tokenizer (no task words).
PASSKEY_LENGTHS = (192, 224)
NIAH_LENGTH = 320


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    corpus, tokenizer_path = make_data(root / "data")
    recipe = tiny_recipe(corpus, tokenizer_path, root / "run")
    tokenizer = load_tokenizer(str(tokenizer_path))
    torch.manual_seed(5)
    model = Transformer(recipe.model, recipe.positional, recipe.attention).eval()
    documents = load_corpus(recipe.data, tokenizer).eval_documents
    return {"model": model, "tokenizer": tokenizer, "documents": documents, "root": root}


def test_position_buckets_double_after_a_first_bucket_scaled_to_the_length():
    k = 1024
    assert position_buckets(8 * k) == [(0, k), (k, 2 * k), (2 * k, 4 * k), (4 * k, 8 * k)]
    assert position_buckets(32 * k)[-2:] == [(8 * k, 16 * k), (16 * k, 32 * k)]
    assert position_buckets(64) == [(0, 8), (8, 16), (16, 32), (32, 64)]
    assert position_buckets(100) == [(0, 12), (12, 24), (24, 48), (48, 96), (96, 100)]
    assert position_buckets(12) == [(0, 2), (2, 4), (4, 8), (8, 12)]  # (0, 1) would be empty


def test_perplexity_buckets_equal_the_full_logits_nll(setup):
    model, documents = setup["model"], setup["documents"]
    length, windows = 96, 3
    result = position_perplexity(model, documents, length, windows=windows)

    stream = np.concatenate([doc.ids for doc in documents])[: windows * length]
    ids = torch.from_numpy(stream).view(windows, length)
    with torch.no_grad():
        logits = model(ids).double()  # [n, L, V]
    nll = -logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # [n, L-1]
    per_position = nll.mean(0)  # predicted token t at index t-1
    assert result.windows == windows
    for bucket in result.buckets:
        expected = per_position[max(bucket["start"], 1) - 1 : bucket["end"] - 1].mean()
        # fp32 logits and log-softmax against float64: ~1e-7 relative.
        assert bucket["nll"] == pytest.approx(float(expected), rel=1e-5)
        assert bucket["ppl"] == pytest.approx(float(expected.exp()), rel=1e-5)
    assert result.mean_nll == pytest.approx(float(per_position.mean()), rel=1e-5)


def test_perplexity_needs_enough_held_out_tokens(setup):
    total = sum(len(doc) for doc in setup["documents"])
    with pytest.raises(LongctxError, match=f"hold {total} tokens, fewer than the eval length"):
        position_perplexity(setup["model"], setup["documents"], total + 1)


def greedy_decode(model: Transformer, prompt: list[int], count: int) -> list[int]:
    """``count`` tokens of greedy decoding, one full forward per token (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "task, lengths, depths",
    [("passkey", PASSKEY_LENGTHS, (0.0, 0.7)), ("niah", (NIAH_LENGTH,), (0.3,))],
)
def test_retrieval_scores_agree_with_full_logits_and_greedy_decoding(setup, task, lengths, depths):
    model, tokenizer = setup["model"], setup["tokenizer"]
    result = retrieval_accuracy(model, tokenizer, task, lengths, depths, samples=1, seed=11)
    assert len(result.examples) == len(lengths) * len(depths)
    for example in result.examples:
        sample = make_eval_example(
            task, tokenizer, example["length"], seed=example["seed"], depth=example["depth"]
        )
        # The answer's content starts after its whitespace-only separator tokens (scored as
        # part of the prompt); the content is what is compared, as text.
        lead = 0
        while not tokenizer.decode(sample.answer_ids[: lead + 1]).strip():
            lead += 1
        prompt, content = sample.prompt_ids + sample.answer_ids[:lead], sample.answer_ids[lead:]
        ids = torch.tensor([prompt + content])
        with torch.no_grad():
            logits = model(ids)[0].double()  # [P + A, V]
        at_answer = logits[len(prompt) - 1 : -1]  # [A, V]
        target = torch.tensor(content)
        assert example["predicted"] == tokenizer.decode(at_answer.argmax(-1).tolist()).strip()
        expected_nll = -at_answer.log_softmax(-1).gather(-1, target[:, None]).sum()
        assert example["answer_nll"] == pytest.approx(float(expected_nll), rel=1e-5)
        greedy = greedy_decode(model, prompt, len(content))
        text = tokenizer.decode(content).strip()
        assert example["correct"] == (tokenizer.decode(greedy).strip() == text)
    cells = np.reshape([e["correct"] for e in result.examples], (len(lengths), len(depths)))
    np.testing.assert_array_equal(result.accuracy, cells.astype(float))


def memorize_answer(model: Transformer, prompt: list[int], answer: list[int]) -> Transformer:
    """A copy of ``model`` trained (Adam, answer tokens only) until it predicts ``answer``."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.tensor([prompt + answer])
    target = torch.tensor(answer)
    for _ in range(60):
        logits = model(ids)[0, len(prompt) - 1 : -1]  # [A, V]
        if bool((logits.argmax(-1) == target).all()):
            break
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_a_memorized_passkey_counts_as_correct_exactly_when_greedy_decoding_finds_it(setup):
    """A real model that learned one example's digits: the True path of the scoring, checked
    against greedy decoding (the other depth holds the same key, placed elsewhere)."""
    tokenizer, length = setup["tokenizer"], PASSKEY_LENGTHS[0]
    sample = make_eval_example("passkey", tokenizer, length, seed=3, depth=0.0)
    model = memorize_answer(setup["model"], sample.prompt_ids, sample.answer_ids)
    result = retrieval_accuracy(
        model, tokenizer, "passkey", [length], [0.0, 0.5], samples=1, seed=3
    )
    assert result.examples[0]["correct"] and result.examples[0]["predicted"] == sample.answer
    for example in result.examples:
        other = make_eval_example(
            "passkey", tokenizer, length, seed=example["seed"], depth=example["depth"]
        )
        greedy = greedy_decode(model, other.prompt_ids, len(other.answer_ids))
        assert example["correct"] == (greedy == other.answer_ids)
    assert result.accuracy == [[float(example["correct"]) for example in result.examples]]


def test_passkey_accuracy_is_the_retrieval_grid_and_keeps_the_training_mode(setup):
    model, tokenizer = setup["model"], setup["tokenizer"]
    model.train()
    table = passkey_accuracy(model, tokenizer, PASSKEY_LENGTHS[:1], (0.5,), samples=1, seed=4)
    assert model.training
    model.eval()
    direct = retrieval_accuracy(model, tokenizer, "passkey", PASSKEY_LENGTHS[:1], (0.5,), seed=4)
    assert table.examples == direct.examples[:1]
    assert table.accuracy == [[float(direct.examples[0]["correct"])]]


def test_plan_check_refuses_a_length_too_short_for_the_task(setup):
    plan = EvalPlan(tasks=("passkey",), lengths=(64,), depths=(0.5,))
    with pytest.raises(LongctxError, match="eval length 64 is too short for task 'passkey'"):
        plan.check(setup["tokenizer"], setup["documents"])


def test_plan_check_refuses_perplexity_without_held_out_text(setup):
    plan = EvalPlan(tasks=("ppl",), lengths=(64,), depths=(0.5,))
    with pytest.raises(LongctxError, match="needs held-out text"):
        plan.check(setup["tokenizer"], [])
    total = sum(len(doc) for doc in setup["documents"])
    plan = EvalPlan(tasks=("ppl",), lengths=(64, total + 1), depths=(0.5,))
    with pytest.raises(LongctxError, match=f"fewer than the eval length {total + 1}"):
        plan.check(setup["tokenizer"], setup["documents"])


def test_outputs_are_json_png_and_tensorboard_scalars_and_images(setup, tmp_path):
    plan = EvalPlan(
        tasks=("ppl", "passkey"), lengths=(PASSKEY_LENGTHS[0],), depths=(0.0, 1.0), ppl_windows=2
    )
    plan.check(setup["tokenizer"], setup["documents"])
    results = run_eval_suite(setup["model"], setup["tokenizer"], plan, setup["documents"])
    written = write_eval_outputs(results, tmp_path / "out", {"step": 7})
    assert sorted(p.name for p in written) == ["passkey.json", "passkey.png", "ppl.json", "ppl.png"]
    for task in ("ppl", "passkey"):
        saved = json.loads((tmp_path / "out" / f"{task}.json").read_text())
        assert saved == {"step": 7, **json.loads(json.dumps(results_json(results, task)))}
        image = imread(tmp_path / "out" / f"{task}.png")  # [H, W, RGBA]
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    with SummaryWriter(str(tmp_path / "tb")) as writer:
        log_eval_tensorboard(results, writer, step=7)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    scalars = eval_scalars(results)
    assert set(events.Tags()["scalars"]) == set(scalars)
    for tag, value in scalars.items():
        (event,) = events.Scalars(tag)
        assert event.step == 7 and event.value == pytest.approx(value, rel=1e-6)
    assert set(events.Tags()["images"]) == {"eval_ppl/loss_by_position", "eval_passkey/heatmap"}
