"""Long-context evaluation on the sequence-parallel mesh equals the single-process evaluation.

Every SP path (ring 2, Ulysses 2) runs on real gloo ranks (``run_on_ranks``), each rank holding
a zigzag shard of every evaluation sequence; the reference is the same evaluation in one process
on the whole sequence (itself checked against full float64 logits and greedy decoding in
``test_evaluate.py``). Equal means: per-bucket NLL and answer NLL to 1e-5 relative (fp32; ring
attention merges softmax blocks in another order) and identical argmax predictions.

Three levels: the scoring itself (a seeded tiny decoder, ``run_eval_suite`` with a mesh), a real
ring-2 DeepSpeed training run whose in-training evaluation is compared with ``longctx eval`` of
its checkpoint in this process, and ``longctx eval --workers 2 --set parallel.ring=2`` on Ray
workers compared with the 1-process command's JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import run_on_ranks
from trainer_helpers import VENV, job, make_data, tiny_recipe, train_on_ranks

from longctx.data import load_corpus, load_tokenizer
from longctx.eval.report import EvalPlan, results_json, run_eval_suite
from longctx.eval.sequence_scorer import SequenceScorer
from longctx.launch.cli import main
from longctx.model import Transformer
from longctx.parallel.config import ParallelConfig
from longctx.parallel.loss import tiled_token_nll

RTOL = 1e-5
# 230 is not a multiple of 2 x sp = 4: the shards are padded, and padding must not leak in.
# Passkey examples need >= 165 tokens with this tokenizer, niah >= 311.
PLAN = EvalPlan(
    tasks=("ppl", "passkey"), lengths=(192, 230), depths=(0.0, 0.6), samples=1, ppl_windows=2
)
NIAH_PLAN = EvalPlan(tasks=("niah",), lengths=(322,), depths=(0.5,), samples=1)
LONGCTX = Path(sys.executable).parent / "longctx"


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval_sp")
    corpus, tokenizer = make_data(root / "data")
    return {"root": root, "corpus": corpus, "tokenizer": tokenizer}


def seeded_model(recipe) -> Transformer:
    torch.manual_seed(5)
    return Transformer(recipe.model, recipe.positional, recipe.attention).eval()


def evaluate(corpus: Path, tokenizer_path: Path, plan: EvalPlan, mesh=None) -> dict:
    """``run_eval_suite`` of the seeded tiny decoder (parallelized on ``mesh`` when given), as
    the JSON each task writes."""
    recipe = tiny_recipe(corpus, tokenizer_path, corpus.parent / "unused")
    tokenizer = load_tokenizer(str(tokenizer_path))
    documents = load_corpus(recipe.data, tokenizer).eval_documents
    model = seeded_model(recipe)
    if mesh is not None:
        from longctx.parallel.parallelize import parallelize

        parallelize(model, mesh.config, mesh)
    results = run_eval_suite(model, tokenizer, plan, documents, mesh=mesh)
    return {task: results_json(results, task) for task in plan.tasks}


def rank_evaluate(rank: int, world: int, corpus, tokenizer, plans, parallel: dict) -> list[dict]:
    """``evaluate`` of each plan on this rank of the ``parallel`` mesh."""
    from longctx.parallel.mesh import build_mesh

    mesh = build_mesh(ParallelConfig(**parallel))
    return [evaluate(corpus, tokenizer, plan, mesh) for plan in plans]


def assert_same_results(ours: dict, reference: dict) -> None:
    """Equal task JSON: identical structure, integers, strings and predictions; floats to
    ``RTOL``."""
    assert ours.keys() == reference.keys()
    for key, expected in reference.items():
        value = ours[key]
        if isinstance(expected, dict):
            assert_same_results(value, expected)
        elif isinstance(expected, list):
            assert len(value) == len(expected), key
            for item, item_expected in zip(value, expected):
                assert_same_results({"item": item}, {"item": item_expected})
        elif isinstance(expected, float):
            assert value == pytest.approx(expected, rel=RTOL), key
        else:
            assert value == expected, key


def test_tiled_token_nll_equals_float64_log_softmax():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator)  # [N, d]
    weight = torch.randn(50, 16, generator=generator)  # [V, d]
    labels = torch.randint(0, 50, (37,), generator=generator)
    labels[[3, 20, 36]] = -100
    nll = tiled_token_nll(hidden, weight, labels, chunk_size=8)  # 37 = 4 chunks of 8 + 5
    log_probs = (hidden.double() @ weight.double().t()).log_softmax(-1)  # [N, V]
    expected = -log_probs.gather(1, labels.clamp_min(0)[:, None])[:, 0] * (labels != -100)
    torch.testing.assert_close(nll.double(), expected, rtol=RTOL, atol=1e-6)


def test_single_process_scorer_answers_equal_the_full_logits(data):
    """The answer path scores only the answer rows; against every row's float64 logits."""
    recipe = tiny_recipe(data["corpus"], data["tokenizer"], data["root"] / "unused")
    model = seeded_model(recipe)
    ids = torch.randint(
        3, recipe.model.vocab_size, (50,), generator=torch.Generator().manual_seed(1)
    )
    predicted, nll = SequenceScorer(model).answer_scores(ids, 40, 6)
    with torch.no_grad():
        log_probs = model(ids[None])[0].double().log_softmax(-1)  # [T, V]
    rows = log_probs[40:46]  # predict ids[41:47]
    assert predicted == rows.argmax(-1).tolist()
    assert nll == pytest.approx(float(-rows.gather(1, ids[41:47, None]).sum()), rel=RTOL)


@pytest.mark.parametrize("parallel", [{"ring": 2}, {"ulysses": 2}], ids=["ring2", "ulysses2"])
def test_sharded_evaluation_equals_the_single_process_evaluation(data, parallel):
    """Perplexity, passkey and multi-key needles (one spawn of 2 ranks for all three)."""
    corpus, tokenizer = data["corpus"], data["tokenizer"]
    plans = [PLAN, NIAH_PLAN]
    references = [evaluate(corpus, tokenizer, plan) for plan in plans]
    for per_plan in run_on_ranks(rank_evaluate, 2, corpus, tokenizer, plans, parallel):
        for ours, reference in zip(per_plan, references):
            assert_same_results(ours, reference)
    # The grid is not trivially equal: the examples hold real, different predictions.
    predictions = [e["predicted"] for e in references[0]["passkey"]["examples"]]
    assert len(predictions) == 4 and len(set(predictions)) > 1


# --- a real ring-2 training run and the `longctx eval` command -------------------------------

EVAL_FIELDS = {
    "eval_tasks": ["ppl", "passkey"],
    "eval_lengths": [192, 230],
    "eval_depths": [0.0, 0.6],
    "eval_samples": 1,
    "eval_ppl_windows": 2,
}


@pytest.fixture(scope="module")
def ring_run(data) -> Path:
    """A 2-step ring-2 ZeRO-3 run on 2 gloo ranks that evaluates (and checkpoints) at step 2."""
    recipe = tiny_recipe(
        data["corpus"],
        data["tokenizer"],
        data["root"] / "ring_run",
        steps=2,
        eval_every=2,
        ckpt_every=2,
        warmup_steps=1,
        zero_stage=3,
        **EVAL_FIELDS,
    )
    recipe = recipe.model_copy(update={"parallel": ParallelConfig(ring=2)})
    results = train_on_ranks([job(recipe)], world=2)
    assert all("summary" in result for (result,) in results), results
    return data["root"] / "ring_run"


def read_outputs(directory: Path) -> dict:
    """Each task's JSON without the fields that name the run (step, checkpoint)."""
    outputs = {}
    for task in ("ppl", "passkey"):
        payload = json.loads((directory / f"{task}.json").read_text())
        outputs[task] = {k: v for k, v in payload.items() if k not in ("step", "checkpoint")}
    return outputs


@pytest.fixture(scope="module")
def one_process_eval(ring_run, tmp_path_factory) -> Path:
    """``longctx eval`` of the ring run's checkpoint in this process (1 rank, no mesh)."""
    out = tmp_path_factory.mktemp("one_process")
    assert main(["eval", str(ring_run), "--task", "ppl", "passkey", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_ring2_in_training_evaluation_equals_one_process_eval_of_its_checkpoint(
    ring_run, one_process_eval
):
    in_training = read_outputs(ring_run / "eval" / "step_000002")
    assert_same_results(in_training, read_outputs(one_process_eval))


@pytest.mark.heavy
def test_eval_on_two_ray_workers_with_ring2_writes_the_one_process_json(
    ring_run, one_process_eval, tmp_path
):
    """``longctx eval --workers 2`` with ring 2 writes the one-process results (``make
    test-heavy``: 24 s of the nearly spent CI budget; CI keeps sharded evaluation on gloo ranks
    and in-training evaluation on Ray workers above)."""
    out = tmp_path / "sharded"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(VENV / "torch_extensions")}
    command = [str(LONGCTX), "eval", str(ring_run), "--task", "ppl", "passkey"]
    command += ["--workers", "2", "--set", "parallel.ring=2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dp 1 x ulysses 1 x ring 2 = 2 ranks" in done.stdout
    assert "passkey |" in done.stdout and "perplexity by position at length 230" in done.stdout
    assert_same_results(read_outputs(out), read_outputs(one_process_eval))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["ppl.json", "ppl.png", "passkey.json", "passkey.png"]
    )
    assert not list(tmp_path.glob(".longctx-eval-*"))  # Ray's run directory is removed


@pytest.mark.slow
def test_an_override_that_changes_the_saved_model_shape_is_refused(ring_run, tmp_path, capsys):
    out = tmp_path / "never"
    args = ["eval", str(ring_run), "--task", "ppl", "--out", str(out)]
    assert main([*args, "--set", "model.intermediate_size=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "changes the shape of the model saved in" in err and "\n" not in err
    assert not out.exists()


# --- memory: no [T, vocab] logits at long length ----------------------------------------------

MEMORY_PROBE = """
import resource, sys, torch
torch.set_num_threads(1)
from longctx.attention.config import AttentionConfig
from longctx.model import Transformer
from longctx.model.config import ModelConfig
from longctx.eval.sequence_scorer import SequenceScorer
T, V = int(sys.argv[1]), int(sys.argv[2])
config = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=T)
torch.manual_seed(0)
scorer = SequenceScorer(Transformer(config, attention=AttentionConfig(chunk_size=512)).eval())
ids = torch.randint(0, V, (T,))
scorer.token_nll(ids[:1100]); scorer.answer_scores(ids[:1100], 1050, 5)  # one full head tile
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
scorer.token_nll(ids); scorer.answer_scores(ids, T - 10, 5)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.slow
def test_long_sequence_scoring_never_holds_the_full_logits():
    """Peak resident memory (a fresh process, after one head tile was already used) grows by far
    less than the [T, vocab] float32 logits (512 MiB here) while scoring 4096 tokens."""
    length, vocab = 4096, 32768
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(length), str(vocab)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grown_bytes = int(done.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux
    assert grown_bytes < length * vocab * 4 / 8
