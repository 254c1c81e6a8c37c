"""Answer accuracy on counting, selective copy and flip-flop (eval/task_accuracy.py).

Reference model: a real Transformer made into a "successor table". Its layers add nothing
(o_proj and down_proj zero), its embedding rows have unit norm, and ``lm_head`` row ``f(t)`` is
token t's embedding, so the argmax after token t is ``f(t)`` for a permutation f of the
vocabulary. Under teacher forcing its prediction at answer position k is therefore
``f(prompt[-1])`` for k = 0 and ``f(answer[k - 1])`` after, a formula computed here from the
generated examples alone. f is chosen to answer parts of one example of each task, so the
accuracies are not all zero (flip-flop: every example with that example's bit is right).
"""

from __future__ import annotations

import json

import pytest
import torch
from matplotlib.pyplot import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from trainer_helpers import TOKENIZER_VOCAB, make_data

from longctx.config.recipe import Recipe
from longctx.data import load_tokenizer, make_eval_example
from longctx.errors import LongctxError
from longctx.eval.evaluate import ALGORITHMIC_TASKS
from longctx.eval.report import (
    EvalPlan,
    TrainingEvaluator,
    eval_scalars,
    format_results,
    log_eval_tensorboard,
    plan_from_recipe,
    results_json,
    run_eval_suite,
    write_eval_outputs,
)
from longctx.eval.task_accuracy import task_accuracy
from longctx.launch.cli import build_parser
from longctx.model import ModelConfig, Transformer

LENGTHS = (256, 512)
SAMPLES = 4
SEED = 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    _, path = make_data(tmp_path_factory.mktemp("task_accuracy"))
    return load_tokenizer(str(path))


def successor_model(successor: torch.Tensor) -> Transformer:
    """The model whose argmax after token t is ``successor[t]`` (see the module docstring)."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    model = Transformer(config)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding = model.embed_tokens.weight
        embedding /= embedding.norm(dim=1, keepdim=True)  # unit rows: e_t . e_t is the maximum
        model.lm_head.weight[successor] = embedding
    return model.eval()


@pytest.fixture(scope="module")
def successor(tokenizer):
    """A permutation f of the vocabulary that answers the first example of each task where it
    can: each (input, answer) pair of those examples sets f(input) = answer unless the input or
    the answer token is taken already (every answer starts with the same space token, so only
    flip-flop's is answered in full); the other tokens map to the unused ids."""
    prescribed: dict[int, int] = {}
    for task in ("flip_flop", "counting", "selective_copy"):  # flip-flop first: fully answered
        example = make_eval_example(task, tokenizer, LENGTHS[0], seed=SEED)
        inputs = [example.prompt_ids[-1], *example.answer_ids[:-1]]
        for source, target in zip(inputs, example.answer_ids):
            if source not in prescribed and target not in prescribed.values():
                prescribed[source] = target
    unused = iter([t for t in reversed(range(TOKENIZER_VOCAB)) if t not in prescribed.values()])
    table = torch.tensor(
        [prescribed[t] if t in prescribed else next(unused) for t in range(TOKENIZER_VOCAB)]
    )
    assert torch.equal(table.sort().values, torch.arange(TOKENIZER_VOCAB))
    return table


def expected_predictions(successor, prompt_ids, answer_ids):
    """The successor model's teacher-forced argmax at each answer position."""
    inputs = [prompt_ids[-1], *answer_ids[:-1]]
    return [int(successor[token]) for token in inputs]


@pytest.mark.parametrize("task", ALGORITHMIC_TASKS)
def test_accuracy_follows_the_successor_formula(tokenizer, successor, task):
    model = successor_model(successor)
    result = task_accuracy(model, tokenizer, task, LENGTHS, samples=SAMPLES, seed=SEED)
    assert result.lengths == list(LENGTHS) and len(result.examples) == len(LENGTHS) * SAMPLES
    for index, length in enumerate(LENGTHS):
        exact, hits, tokens = 0, 0, 0
        for k in range(SAMPLES):
            example = make_eval_example(task, tokenizer, length, seed=SEED + k)
            assert len(example) <= length
            expected = expected_predictions(successor, example.prompt_ids, example.answer_ids)
            scored = result.examples[index * SAMPLES + k]
            assert scored["answer"] == example.answer and scored["seed"] == SEED + k
            assert scored["predicted_ids"] == expected
            right = sum(p == a for p, a in zip(expected, example.answer_ids))
            exact += right == len(expected)
            hits, tokens = hits + right, tokens + len(expected)
        assert result.accuracy[index] == pytest.approx(exact / SAMPLES, abs=1e-12)
        assert result.token_accuracy[index] == pytest.approx(hits / tokens, abs=1e-12)
    assert max(result.token_accuracy) > 0  # f answers (the start of) one example per task
    if task == "flip_flop":  # the one task whose answer f can fully give (see ``successor``)
        assert max(result.accuracy) > 0


def test_answer_nll_is_the_full_logits_cross_entropy(tokenizer, successor):
    model = successor_model(successor)
    result = task_accuracy(model, tokenizer, "counting", LENGTHS[:1], samples=2, seed=SEED)
    for scored in result.examples:
        example = make_eval_example("counting", tokenizer, LENGTHS[0], seed=scored["seed"])
        ids = torch.tensor([example.prompt_ids + example.answer_ids])
        with torch.no_grad():
            logits = model(ids)[0, len(example.prompt_ids) - 1 : -1].double()  # [A, V]
        expected = torch.nn.functional.cross_entropy(
            logits, torch.tensor(example.answer_ids), reduction="sum"
        )
        assert scored["answer_nll"] == pytest.approx(float(expected), rel=1e-5)


def test_a_length_too_short_for_the_task_is_one_line(tokenizer, successor):
    with pytest.raises(LongctxError, match="too short for task 'selective_copy'") as error:
        task_accuracy(successor_model(successor), tokenizer, "selective_copy", [256, 24])
    assert "\n" not in str(error.value)
    plan = EvalPlan(tasks=("counting",), lengths=(24,), depths=(0.5,))
    with pytest.raises(LongctxError, match="too short for task 'counting'"):
        plan.check(tokenizer, None)


def test_the_suite_writes_json_png_and_tensorboard(tokenizer, successor, tmp_path):
    plan = EvalPlan(tasks=("flip_flop", "counting"), lengths=LENGTHS, depths=(0.5,), samples=2)
    plan.check(tokenizer, None)
    results = run_eval_suite(successor_model(successor).train(), tokenizer, plan, None)
    direct = task_accuracy(successor_model(successor), tokenizer, "flip_flop", LENGTHS, samples=2)
    assert results["flip_flop"].to_dict() == direct.to_dict()
    written = write_eval_outputs(results, tmp_path / "out", {"step": 3})
    names = ["counting.json", "counting.png", "flip_flop.json", "flip_flop.png"]
    assert sorted(path.name for path in written) == names
    for task in ("flip_flop", "counting"):
        saved = json.loads((tmp_path / "out" / f"{task}.json").read_text())
        assert saved == {"step": 3, **json.loads(json.dumps(results_json(results, task)))}
        assert imread(tmp_path / "out" / f"{task}.png").shape[0] > 100
    assert "flip_flop |   exact  tokens" in format_results(results)

    with SummaryWriter(str(tmp_path / "tb")) as writer:
        log_eval_tensorboard(results, writer, step=3)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    scalars = eval_scalars(results)
    assert "eval_counting/L512/token_accuracy" in scalars
    assert set(events.Tags()["scalars"]) == set(scalars)
    assert set(events.Tags()["images"]) == {
        "eval_flip_flop/accuracy_by_length",
        "eval_counting/accuracy_by_length",
    }


def test_training_evaluator_runs_the_recipe_tasks(tokenizer, successor, tmp_path):
    recipe = Recipe.model_validate(
        {"trainer": {"eval_tasks": ["selective_copy"], "eval_lengths": [512], "eval_samples": 2}}
    )
    plan = plan_from_recipe(recipe)
    model = successor_model(successor)
    evaluator = TrainingEvaluator(model, tokenizer, plan, None, tmp_path, is_writer=True)
    scalars = evaluator(7, None)
    saved = json.loads((tmp_path / "eval" / "step_000007" / "selective_copy.json").read_text())
    assert saved["lengths"] == [512] and saved["samples"] == 2
    assert scalars["eval_selective_copy/token_accuracy"] == saved["mean_token_accuracy"]


def test_the_cli_offers_the_tasks():
    args = build_parser().parse_args(["eval", "run", "--task", "counting", "flip_flop", "ppl"])
    assert args.task == ["counting", "flip_flop", "ppl"]
