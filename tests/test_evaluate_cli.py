"""``longctx eval`` on a Hugging Face model directory, with ``--set`` overrides, and its refusals.

The model directory is a seeded tiny decoder written with ``save_hf`` plus the test tokenizer
as ``tokenizer.model`` (what ``longctx export`` and a converted model look like). Reference: the
same weights evaluated in this process by ``run_eval_suite`` (itself checked against float64
logits in ``test_evaluate.py``), built with the override's RoPE scaling where one is given.
Refusals: exit 2, one ``error:`` line, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from trainer_helpers import make_data, tiny_recipe, tree_digest

from longctx.data import load_corpus, load_tokenizer
from longctx.data.long_text import long_text_documents
from longctx.eval.evaluate import held_out_windows, position_perplexity
from longctx.eval.report import EvalPlan, results_json, run_eval_suite
from longctx.launch.cli import main
from longctx.model import Transformer, save_hf

YARN = "{rope_type: yarn, factor: 4.0, original_max_position_embeddings: 32}"
PLAN = EvalPlan(tasks=("ppl", "passkey"), lengths=(192,), depths=(0.5,), samples=1, ppl_windows=1)
PLAN_FLAGS = ["--task", "ppl", "passkey", "--lengths", "192", "--depths", "0.5"]
PLAN_FLAGS += ["--samples", "1", "--windows", "1"]


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluate_cli")
    corpus, tokenizer = make_data(root / "data")
    recipe = tiny_recipe(corpus, tokenizer, root / "run")
    torch.manual_seed(5)
    model = Transformer(recipe.model, recipe.positional, recipe.attention).eval()
    hf_dir = root / "hf model"  # a space in the name: the recipe name is derived from it
    save_hf(model, recipe.model, hf_dir)
    shutil.copyfile(tokenizer, hf_dir / "tokenizer.model")
    data_flags = ["--set", f"data.sources=[{corpus}]", "--set", "data.eval_fraction=0.1"]
    return {"root": root, "recipe": recipe, "model": model, "hf_dir": hf_dir, "data": data_flags}


def in_process(setup: dict, model: Transformer) -> dict:
    """The reference: ``run_eval_suite`` of ``model`` on the recipe's held-out text."""
    recipe = setup["recipe"]
    tokenizer = load_tokenizer(recipe.data.tokenizer.path)
    documents = load_corpus(recipe.data, tokenizer).eval_documents
    results = run_eval_suite(model, tokenizer, PLAN, documents)
    return {task: results_json(results, task) for task in PLAN.tasks}


def written(out: Path) -> dict:
    return {task: json.loads((out / f"{task}.json").read_text()) for task in PLAN.tasks}


def assert_equal_results(ours: dict, reference: dict) -> None:
    for task in PLAN.tasks:
        expected = reference[task]
        if task == "ppl":
            nll = [b["nll"] for b in ours[task]["results"][0]["buckets"]]
            ref = [b["nll"] for b in expected["results"][0]["buckets"]]
            assert nll == pytest.approx(ref, rel=1e-5)
        else:
            assert [e["predicted"] for e in ours[task]["examples"]] == [
                e["predicted"] for e in expected["examples"]
            ]
            assert ours[task]["examples"][0]["answer_nll"] == pytest.approx(
                expected["examples"][0]["answer_nll"], rel=1e-5
            )


def test_eval_of_a_hugging_face_directory_equals_the_in_process_evaluation(setup, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval", str(setup["hf_dir"]), *PLAN_FLAGS, *setup["data"], "--out", str(out)])
    assert code == 0
    assert f"model {setup['hf_dir']}" in capsys.readouterr().out
    ours = written(out)
    assert ours["ppl"]["model"] == str(setup["hf_dir"])
    assert_equal_results(ours, in_process(setup, setup["model"]))


def test_rope_scaling_override_evaluates_the_scaled_model(setup, tmp_path):
    out = tmp_path / "yarn"
    args = ["eval", str(setup["hf_dir"]), *PLAN_FLAGS, *setup["data"], "--out", str(out)]
    assert main([*args, "--set", f"model.rope_scaling={YARN}"]) == 0
    recipe = setup["recipe"]
    config = recipe.model.model_copy(
        update={
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        }
    )
    scaled = Transformer(config, recipe.positional, recipe.attention).eval()
    scaled.load_state_dict(setup["model"].state_dict())
    ours, reference = written(out), in_process(setup, scaled)
    assert_equal_results(ours, reference)
    # The override acted: the result is far closer to the scaled model than to the unscaled one
    # (a random model's loss moves little with RoPE, so the margin is relative).
    mean = ours["ppl"]["results"][0]["mean_nll"]
    unscaled = in_process(setup, setup["model"])["ppl"]["results"][0]["mean_nll"]
    assert abs(mean - unscaled) > 100 * abs(mean - reference["ppl"]["results"][0]["mean_nll"])


def test_long_text_perplexity_scores_the_seeded_stream_of_every_source_document(setup, tmp_path):
    """``trainer.eval_ppl_text=long_text`` (a pretrained model never saw the sources): the
    perplexity text is ``long_text_documents`` of the recipe's sources in seed order, not the
    held-out split; the result equals ``position_perplexity`` on exactly those tokens."""
    out = tmp_path / "long"
    args = ["eval", str(setup["hf_dir"]), *PLAN_FLAGS, *setup["data"], "--out", str(out)]
    assert main([*args, "--set", "trainer.eval_ppl_text=long_text", "--set", "data.seed=3"]) == 0
    recipe = setup["recipe"]
    tokenizer = load_tokenizer(recipe.data.tokenizer.path)
    stream = long_text_documents(tokenizer, 192, 1, sources=recipe.data.sources, seed=3)
    held_out = load_corpus(recipe.data, tokenizer).eval_documents
    assert not torch.equal(held_out_windows(stream, 192, 1), held_out_windows(held_out, 192, 1))
    expected = position_perplexity(setup["model"], stream, 192, windows=1)
    nll = [b["nll"] for b in written(out)["ppl"]["results"][0]["buckets"]]
    assert nll == pytest.approx([b["nll"] for b in expected.buckets], rel=1e-5)


def refused(args: list[str], setup: dict, capsys) -> str:
    before = tree_digest(setup["root"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert tree_digest(setup["root"]) == before
    return err


def test_a_model_directory_needs_an_output_directory(setup, capsys):
    err = refused(["eval", str(setup["hf_dir"]), "--task", "ppl"], setup, capsys)
    assert "pass --out DIR" in err


def test_a_layout_the_heads_cannot_split_is_refused_before_anything_runs(setup, capsys):
    out = setup["root"] / "never"
    args = ["eval", str(setup["hf_dir"]), "--task", "ppl", "--out", str(out)]
    err = refused([*args, "--set", "parallel.ulysses=3"], setup, capsys)
    assert "not divisible by parallel.ulysses=3" in err


def test_workers_that_do_not_fit_the_layout_are_refused(setup, capsys):
    out = setup["root"] / "never"
    args = ["eval", str(setup["hf_dir"]), "--task", "ppl", "--out", str(out), "--workers", "3"]
    err = refused([*args, "--set", "parallel.ring=2"], setup, capsys)
    assert "--workers 3 is not a multiple of parallel.ulysses x ring = 1 x 2" in err


def test_a_recipe_without_pretrained_weights_is_refused(setup, capsys):
    recipe = setup["root"] / "scratch.yaml"
    recipe.write_text("name: scratch\n")
    out = setup["root"] / "never"
    err = refused(["eval", str(recipe), "--task", "ppl", "--out", str(out)], setup, capsys)
    assert "has model.init='scratch'" in err
