"""Exact and elastic resume on prepared corpora, with real 2-rank DeepSpeed workers (gloo).

The corpus: 120 generated paragraphs as JSON lines, prepared by ``longctx data prepare`` into
8 shards (2 processes). Runs (fp32 on CPU, 2 x ``HALF`` steps):

- ``straight``: the prepared directory, uninterrupted, dp 2, ZeRO-2;
- ``prepared``: the same, killed right after its checkpoint at step ``HALF`` (by its own
  report callback, as a preempted worker dies) and resumed with ``--resume latest`` in fresh
  processes: its losses, learning rates, gradient norms and token counts equal the straight
  run's bit for bit;
- ``raw``: the raw JSON-lines file, which the workers prepare on the fly into ``RUN/data``
  (rank 0, then a barrier); interrupted and resumed the same way, its losses equal the straight
  run's bit for bit too (the on-the-fly corpus is the same corpus), and the resume leaves
  every file of ``RUN/data`` with the modification time it had (reused, never re-tokenized);
- ``ring``: the straight run's checkpoint at step ``HALF`` continued at dp 1 x ring 2 under
  ZeRO-0 (elastic: another data-parallel size and sequence layout): the data cursor continues
  on the same rows, so its losses equal the straight run's within fp32 summation order (1e-5)
  and it ends at the same data position.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from harness import run_on_ranks
from test_trainer_resume import _rank_interrupted
from trainer_helpers import deepspeed_environment, job, make_data, rank_train, tiny_recipe

from longctx.data.corpus import PreparedCorpus
from longctx.data.prepare import prepare

pytestmark = pytest.mark.slow  # two rounds of spawned 2-rank DeepSpeed runs

HALF = 3
LOSS_RTOL = 1e-5
RANKS_TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prepared_resume")
    corpus, tokenizer = make_data(root / "data")
    raw = root / "data" / "corpus.jsonl"
    paragraphs = [p for p in corpus.read_text().split("\n\n") if p.strip()]
    raw.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    prepared = root / "data" / "prepared"
    prepare([str(raw)], str(tokenizer), str(prepared), num_proc=2, docs_per_shard=16,
            show_progress=False)  # fmt: skip

    def recipe(name: str, source: Path, **trainer):
        fields = {"steps": 2 * HALF, "ckpt_every": HALF, "eval_every": 0, "micro_batch_size": 1}
        fields.update({"zero_stage": 2, "grad_accum": 1, "keep_last": 3, **trainer})
        return tiny_recipe(source, tokenizer, root / name, **fields)

    straight = recipe("straight", prepared)
    interrupted = [recipe("prepared", prepared), recipe("raw", raw)]
    ring = recipe("ring", prepared, zero_stage=0, grad_accum=2)
    ring = ring.model_copy(update={"parallel": ring.parallel.model_copy(update={"ring": 2})})
    checkpoint = str(root / "straight" / "checkpoints" / f"step_{HALF:06d}")
    with deepspeed_environment():
        stopped = run_on_ranks(_rank_interrupted, 2, [job(r) for r in interrupted])
        before = _stamps(root / "raw" / "data")
        jobs = [job(r, resume="latest") for r in interrupted]
        jobs += [job(straight), job(ring, resume=checkpoint)]
        results = run_on_ranks(rank_train, 2, jobs, timeout=RANKS_TIMEOUT_S)[0]
    prepared_run, raw_run, straight_run, ring_run = results
    return {
        "root": root,
        "prepared": prepared,
        "stopped": stopped,
        "stamps": (before, _stamps(root / "raw" / "data")),
        "runs": {"prepared": prepared_run, "raw": raw_run, "straight": straight_run,
                 "ring": ring_run},
    }  # fmt: skip


def _stamps(root: Path) -> dict[str, int]:
    """Modification time (ns) of every file under ``root`` by relative path."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def _metrics(result: dict) -> dict[int, dict]:
    assert "error" not in result, result.get("error")
    return {metrics["step"]: metrics for metrics, _ in result["reports"]}


def _cursor(root: Path, name: str) -> dict:
    manifest = root / name / "checkpoints" / f"step_{2 * HALF:06d}" / "manifest.json"
    return json.loads(manifest.read_text())["data_cursor"]


def test_the_corpus_is_prepared_in_several_shards(runs):
    corpus = PreparedCorpus(runs["prepared"])
    assert len(corpus.manifest["shards"]) == 8 and corpus.num_documents == 120
    assert runs["stopped"] == [[HALF, HALF]] * 2


@pytest.mark.parametrize("name", ["prepared", "raw"])
def test_resumed_run_repeats_the_uninterrupted_losses_bit_for_bit(runs, name):
    resumed, straight = _metrics(runs["runs"][name]), _metrics(runs["runs"]["straight"])
    assert sorted(resumed) == list(range(HALF + 1, 2 * HALF + 1))
    for step, metrics in resumed.items():
        for key in ("loss", "lr", "grad_norm", "tokens_seen"):
            assert metrics[key] == straight[step][key], (name, step, key)
    assert _cursor(runs["root"], name) == _cursor(runs["root"], "straight")


def test_resume_reuses_the_runs_prepared_raw_sources(runs):
    before, after = runs["stamps"]
    (directory,) = {Path(name).parts[0] for name in before}  # one prepared directory
    assert f"{directory}/manifest.json" in before
    assert before == after
    assert PreparedCorpus(runs["root"] / "raw" / "data" / directory).num_documents == 120


def test_elastic_ring_run_continues_on_the_same_rows(runs):
    ring, straight = _metrics(runs["runs"]["ring"]), _metrics(runs["runs"]["straight"])
    assert sorted(ring) == list(range(HALF + 1, 2 * HALF + 1))
    for step, metrics in ring.items():
        assert metrics["loss"] == pytest.approx(straight[step]["loss"], rel=LOSS_RTOL), step
    cursor, reference = _cursor(runs["root"], "ring"), _cursor(runs["root"], "straight")
    assert cursor["dp_size"] == 1 and cursor["epoch"] == reference["epoch"]
    assert (
        cursor["next_batch"] * cursor["dp_size"] * cursor["micro_batch_size"]
        == reference["next_batch"] * reference["dp_size"] * reference["micro_batch_size"]
    )
    assert np.isfinite([m["loss"] for m in ring.values()]).all()
