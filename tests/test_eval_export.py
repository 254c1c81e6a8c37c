"""Evaluation inside training, ``longctx eval`` and ``longctx export`` on checkpoints written by
real (tiny, one-rank) DeepSpeed training runs.

Two runs are trained once for the module, in one spawned rank: a plain RoPE run (ZeRO-0) whose
recipe asks for perplexity and passkey evaluation at every eval step, and a YaRN
``rope_scaling`` run (ZeRO-3 with perplexity evaluation; export consolidates its shards). References: transformers loading
the export (logits, fp32, 1e-4), the in-training evaluation against the standalone one of the
same checkpoint, TensorBoard's event reader, and directory snapshots for the refused inputs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hf_fixtures import hf_logits, load_with_transformers, random_tokens
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trainer_helpers import job, make_data, tiny_recipe, train_on_ranks, tree_digest

from longctx.checkpoint.saved_model import export_hf, load_trained_model, open_checkpoint
from longctx.config.recipe import Recipe
from longctx.launch.cli import main

# two real DeepSpeed trainings in a spawned rank (~30 s); one thread (tests/conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

EVAL_LENGTH = 192  # passkey examples need >= 165 tokens with this tokenizer
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def yarn_recipe(base: Recipe, run_dir: Path) -> Recipe:
    """``base`` with a YaRN rope_scaling, ZeRO-3 (sharded parameters, gathered by DeepSpeed's
    hooks inside each forward, also the evaluation's), perplexity evaluation only, and its own
    run directory."""
    raw = base.model_dump(mode="json")
    raw["name"] = "yarn-run"
    raw["model"]["rope_scaling"] = YARN
    raw["trainer"] |= {"run_dir": str(run_dir), "zero_stage": 3, "steps": 2, "eval_tasks": ["ppl"]}
    return Recipe.model_validate(raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval_export")
    corpus, tokenizer = make_data(root / "data")
    plain = tiny_recipe(
        corpus,
        tokenizer,
        root / "plain",
        steps=4,
        eval_every=2,
        ckpt_every=2,
        eval_tasks=["ppl", "passkey"],
        eval_lengths=[EVAL_LENGTH],
        eval_depths=[0.0, 1.0],
        eval_samples=1,
        eval_ppl_windows=2,
    )
    yarn = yarn_recipe(plain, root / "yarn")
    results = train_on_ranks([job(plain), job(yarn)], world=1)[0]
    assert all("summary" in result for result in results), results
    return {"root": root, "plain": root / "plain", "yarn": root / "yarn", "results": results}


def test_training_writes_eval_json_png_and_tensorboard_at_each_eval_step(runs):
    for step in (2, 4):
        directory = runs["plain"] / "eval" / f"step_{step:06d}"
        names = sorted(path.name for path in directory.iterdir())
        assert names == ["passkey.json", "passkey.png", "ppl.json", "ppl.png"]
        assert json.loads((directory / "passkey.json").read_text())["step"] == step
    events = EventAccumulator(str(runs["plain"] / "tensorboard")).Reload()
    nll = events.Scalars(f"eval_ppl/L{EVAL_LENGTH}/nll")
    assert [event.step for event in nll] == [2, 4]
    assert [e.step for e in events.Scalars("eval_passkey/accuracy")] == [2, 4]
    reported = [metrics for metrics, _ in runs["results"][0]["reports"] if "eval_loss" in metrics]
    assert reported[-1][f"eval_ppl/L{EVAL_LENGTH}/nll"] == pytest.approx(nll[-1].value, rel=1e-6)


def test_zero3_training_evaluates_with_its_sharded_parameters(runs, tmp_path, capsys):
    assert main(["eval", str(runs["yarn"]), "--task", "ppl", "--out", str(tmp_path)]) == 0
    ours = json.loads((tmp_path / "ppl.json").read_text())["results"][0]["buckets"]
    in_training = runs["yarn"] / "eval" / "step_000002" / "ppl.json"
    theirs = json.loads(in_training.read_text())["results"][0]["buckets"]
    assert [b["nll"] for b in ours] == pytest.approx([b["nll"] for b in theirs], rel=1e-6)


def test_standalone_eval_reproduces_the_in_training_evaluation(runs, tmp_path, capsys):
    code = main(["eval", str(runs["plain"]), "--task", "ppl", "passkey", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity by position at length 192" in printed and "passkey |" in printed
    in_training = runs["plain"] / "eval" / "step_000004"
    ppl = json.loads((tmp_path / "ppl.json").read_text())["results"][0]
    expected = json.loads((in_training / "ppl.json").read_text())["results"][0]
    assert [b["end"] for b in ppl["buckets"]] == [b["end"] for b in expected["buckets"]]
    for ours, theirs in zip(ppl["buckets"], expected["buckets"]):
        # Same weights and forward, in another process: equal up to float summation order.
        assert ours["nll"] == pytest.approx(theirs["nll"], rel=1e-6)
    passkey = json.loads((tmp_path / "passkey.json").read_text())
    trained = json.loads((in_training / "passkey.json").read_text())
    assert passkey["accuracy"] == trained["accuracy"]
    for ours, theirs in zip(passkey["examples"], trained["examples"]):
        assert ours["predicted"] == theirs["predicted"]
        assert ours["answer_nll"] == pytest.approx(theirs["answer_nll"], rel=1e-6)


@pytest.mark.parametrize("run", ["plain", "yarn"])
def test_transformers_loads_the_export_with_longctx_logits(runs, tmp_path, run):
    out = export_hf(runs[run], tmp_path / "hf")
    saved = open_checkpoint(runs[run])
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == saved.recipe.model.max_position_embeddings
    assert config["rope_scaling"] == saved.recipe.model.rope_scaling
    assert (out / "tokenizer.model").read_bytes() == (
        saved.directory / "tokenizer.model"
    ).read_bytes()

    reference = load_with_transformers(out)
    input_ids = random_tokens(2, 128, vocab=saved.recipe.model.vocab_size)  # past YaRN's 32
    with torch.no_grad():
        ours = load_trained_model(saved)(input_ids)
    torch.testing.assert_close(hf_logits(reference, input_ids), ours, rtol=1e-4, atol=1e-4)


def test_export_streams_into_sharded_safetensors_that_transformers_loads(runs, tmp_path, capsys):
    """``longctx export --max-shard-size``: several shards with transformers' index, every
    shard within the size (one tensor may exceed it alone), equal logits (1e-4)."""
    out = tmp_path / "hf"
    assert main(["export", str(runs["yarn"]), "--hf", str(out), "--max-shard-size", "40KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    saved = open_checkpoint(runs["yarn"])
    model = load_trained_model(saved)
    params = dict(model.named_parameters())
    assert index["metadata"]["total_size"] == sum(4 * p.numel() for p in params.values())
    largest = max(4 * p.numel() for p in params.values())
    assert all(shard.stat().st_size <= max(40_000, largest) + 8_192 for shard in shards)
    assert not list(tmp_path.glob(".hf-export-*"))  # the staging directory was renamed
    reference = load_with_transformers(out)
    input_ids = random_tokens(2, 96, vocab=saved.recipe.model.vocab_size)
    with torch.no_grad():
        ours = model(input_ids)
    torch.testing.assert_close(hf_logits(reference, input_ids), ours, rtol=1e-4, atol=1e-4)


def test_export_with_a_bad_shard_size_exits_2_and_creates_nothing(runs, tmp_path, capsys):
    argv = ["export", str(runs["plain"]), "--hf", str(tmp_path / "hf"), "--max-shard-size", "0"]
    assert main(argv) == 2
    assert "not a positive size" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_yarn_export_differs_from_the_unscaled_model(runs, tmp_path):
    """Guards the parity test above: the scaling changes the logits at these lengths."""
    saved = open_checkpoint(runs["yarn"])
    input_ids = random_tokens(1, 128, vocab=saved.recipe.model.vocab_size)
    scaled = load_trained_model(saved)
    raw = saved.recipe.model_dump(mode="json")
    raw["model"]["rope_scaling"] = None
    unscaled = load_trained_model(replace(saved, recipe=Recipe.model_validate(raw)))
    with torch.no_grad():
        gap = (scaled(input_ids) - unscaled(input_ids)).abs().max()
    assert gap > 1e-3  # 10x the parity tolerance (measured: 6e-3)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, needle: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_eval_of_a_missing_run_exits_2(tmp_path, capsys):
    code, err = run_cli(["eval", str(tmp_path / "nope"), "--task", "ppl"], capsys)
    assert_refused(code, err, "does not exist")
    assert not (tmp_path / "nope").exists()


def test_eval_of_a_run_without_checkpoint_exits_2_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: run\n")
    before = tree_digest(tmp_path)
    code, err = run_cli(["eval", str(tmp_path / "run"), "--task", "passkey"], capsys)
    assert_refused(code, err, "checkpoints/latest is missing")
    assert tree_digest(tmp_path) == before


def test_eval_of_a_damaged_checkpoint_exits_2_and_writes_nothing(runs, tmp_path, capsys):
    checkpoint = Path(
        shutil.copytree(runs["plain"] / "checkpoints" / "step_000004", tmp_path / "c")
    )
    damaged = checkpoint / "recipe.yaml"
    damaged.write_text(damaged.read_text() + "# edited\n")
    before = tree_digest(tmp_path)
    code, err = run_cli(["eval", str(checkpoint), "--task", "ppl"], capsys)
    assert_refused(code, err, "sha256 of recipe.yaml")
    assert tree_digest(tmp_path) == before


def test_eval_length_too_short_exits_2_before_writing(runs, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(
        ["eval", str(runs["plain"]), "--task", "passkey", "--lengths", "64", "--out", str(out)],
        capsys,
    )
    assert_refused(code, err, "eval length 64 is too short for task 'passkey'")
    assert not out.exists()


def test_eval_depth_outside_0_1_exits_2(runs, capsys):
    code, err = run_cli(
        ["eval", str(runs["plain"]), "--task", "passkey", "--depths", "1.5"], capsys
    )
    assert_refused(code, err, "1.5 is not a fraction in [0, 1]")


def test_export_into_an_existing_checkpoint_exits_2_and_leaves_it(runs, tmp_path, capsys):
    out = export_hf(runs["plain"], tmp_path / "hf")
    before = tree_digest(out)
    code, err = run_cli(["export", str(runs["yarn"]), "--hf", str(out)], capsys)
    assert_refused(code, err, "refusing to overwrite")
    assert tree_digest(out) == before


def test_export_of_a_missing_run_exits_2_and_creates_nothing(tmp_path, capsys):
    code, err = run_cli(["export", str(tmp_path / "nope"), "--hf", str(tmp_path / "hf")], capsys)
    assert_refused(code, err, "does not exist")
    assert not (tmp_path / "hf").exists()
