"""Elastic resume: a checkpoint written at dp 2 x ring 1 under ZeRO-2 continues at dp 1 x ring 2
under ZeRO-0, and at dp 2 under ZeRO-3, with the loss of the uninterrupted run and the same
data position.

Reference: the uninterrupted dp 2 x ring 1 ZeRO-2 run. Each data-parallel rank reads one row per
micro-batch, so the uninterrupted step consumes rows ``2s`` and ``2s + 1`` of the epoch's
permutation and averages their per-row mean losses. The ring run has one data-parallel group
that accumulates two micro-batches of one row each: the same rows, the same average, computed
over a sequence split between two ranks. The checkpoint stores the full fp32 weights and AdamW
moments (per-rank shards, resharded on load), so the continuation starts from exactly the saved state;
summation orders differ between layouts, hence the fp32 tolerance 1e-5 on the losses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import run_on_ranks
from trainer_helpers import deepspeed_environment, job, make_data, rank_train, tiny_recipe

from longctx.checkpoint.full_state import translate_data_cursor
from longctx.checkpoint.store import load_model_state_dict
from longctx.data import PackedLoader, build_datasets, load_tokenizer
from longctx.errors import LongctxError

HALF = 3  # steps before the checkpoint the elastic runs start from
LOSS_RTOL = 1e-5
RANKS_TIMEOUT_S = 1800  # generous: a loaded machine may first rebuild DeepSpeed's comm op


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("elastic")
    corpus, tokenizer = make_data(root / "data")

    def recipe(name: str, **trainer):
        fields = {"steps": 2 * HALF, "ckpt_every": HALF, "eval_every": 0, "micro_batch_size": 1}
        return tiny_recipe(corpus, tokenizer, root / name, **{**fields, **trainer})

    straight = recipe("straight", zero_stage=2, grad_accum=1)
    ring = recipe("ring", zero_stage=0, grad_accum=2)
    ring = ring.model_copy(update={"parallel": ring.parallel.model_copy(update={"ring": 2})})
    zero3 = recipe("zero3", zero_stage=3, grad_accum=1)
    checkpoint = str(root / "straight" / "checkpoints" / f"step_{HALF:06d}")
    jobs = [job(straight), job(ring, resume=checkpoint), job(zero3, resume=checkpoint)]
    with deepspeed_environment():
        results = run_on_ranks(rank_train, 2, jobs, timeout=RANKS_TIMEOUT_S)
    return {"root": root, "results": results[0], "checkpoint": Path(checkpoint)}


def _losses(result: dict) -> dict[int, float]:
    assert "error" not in result, result.get("error")
    return {metrics["step"]: metrics["loss"] for metrics, _ in result["reports"]}


def _manifest(root: Path, name: str, step: int) -> dict:
    import json

    return json.loads(
        (root / name / "checkpoints" / f"step_{step:06d}" / "manifest.json").read_text()
    )


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("index, name", [(1, "ring"), (2, "zero3")])
def test_elastic_run_continues_with_the_uninterrupted_losses(runs, index, name):
    straight = _losses(runs["results"][0])
    elastic = _losses(runs["results"][index])
    assert sorted(elastic) == list(range(HALF + 1, 2 * HALF + 1)), name  # started at step N
    for step, loss in elastic.items():
        assert loss == pytest.approx(straight[step], rel=LOSS_RTOL), (name, step)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("name", ["ring", "zero3"])
def test_elastic_run_ends_at_the_same_data_position_and_token_count(runs, name):
    """The final cursors name the same global row: next_batch x dp x micro_batch_size."""
    straight = _manifest(runs["root"], "straight", 2 * HALF)
    elastic = _manifest(runs["root"], name, 2 * HALF)
    assert elastic["tokens_seen"] == straight["tokens_seen"]
    cursor, reference = elastic["data_cursor"], straight["data_cursor"]
    assert cursor["epoch"] == reference["epoch"]
    assert (
        cursor["next_batch"] * cursor["dp_size"] * cursor["micro_batch_size"]
        == reference["next_batch"] * reference["dp_size"] * reference["micro_batch_size"]
    )


@pytest.mark.slow
@pytest.mark.heavy
def test_ring_run_resumed_at_dp_one(runs):
    manifest = _manifest(runs["root"], "ring", 2 * HALF)
    assert manifest["data_cursor"]["dp_size"] == 1
    assert manifest["sequence_parallel"] == {"ulysses": 1, "ring": 2}
    assert manifest["zero_stage"] == 0


@pytest.mark.slow
@pytest.mark.heavy
def test_elastic_final_weights_are_close_to_the_uninterrupted_ones(runs):
    straight = load_model_state_dict(runs["root"] / "straight" / "checkpoints" / "step_000006")
    for name in ("ring", "zero3"):
        elastic = load_model_state_dict(runs["root"] / name / "checkpoints" / "step_000006")
        assert elastic.keys() == straight.keys()
        for key, tensor in straight.items():
            assert elastic[key].allclose(tensor, rtol=1e-4, atol=1e-6), (name, key)


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
    corpus, tokenizer = make_data(tmp_path_factory.mktemp("split"))
    recipe = tiny_recipe(corpus, tokenizer, tmp_path_factory.mktemp("unused"))
    return build_datasets(recipe.data, load_tokenizer(str(tokenizer))).train


def _rows(batch) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for row in batch["input_ids"]]


@pytest.mark.parametrize("old, new", [((2, 1), (1, 1)), ((2, 2), (1, 4)), ((1, 4), (4, 1))])
def test_translated_cursor_continues_with_the_same_global_rows(train_split, old, new):
    """Reference: the old layout's loaders (one per data-parallel rank) advanced by hand; the
    rows each rank reads next, taken round-robin over the ranks, are the global order the new
    layout's loaders must continue with from the translated cursor."""
    (old_dp, old_batch), (new_dp, new_batch) = old, new
    old_loaders = [PackedLoader(train_split, old_batch, r, old_dp) for r in range(old_dp)]
    consumed = 5
    for loader in old_loaders:
        for _ in range(consumed):
            next(iter(loader))
    following = [
        _rows(old_loaders[r].batch(0, consumed + i)) for i in range(2) for r in range(old_dp)
    ]
    expected = []  # row j of micro-batch i on rank r is global row (i x B + j) x dp + r
    for i in range(2):
        for j in range(old_batch):
            expected += [following[i * old_dp + r][j] for r in range(old_dp)]
    cursor = translate_data_cursor(old_loaders[0].state_dict(), new_dp, new_batch)
    new_loaders = [PackedLoader(train_split, new_batch, r, new_dp) for r in range(new_dp)]
    for loader in new_loaders:
        loader.load_state_dict(cursor)
    batches_needed = len(expected) // (new_dp * new_batch)
    got_by_rank = [
        [_rows(b) for b, _ in zip(iter(loader), range(batches_needed))] for loader in new_loaders
    ]
    got = []
    for i in range(batches_needed):
        for j in range(new_batch):
            got += [got_by_rank[r][i][j] for r in range(new_dp)]
    assert got == expected


def test_a_cursor_with_no_exact_equivalent_is_refused_in_one_line(train_split):
    loader = PackedLoader(train_split, 1, 0, 2)
    for _ in range(3):
        next(iter(loader))  # global row 6: not a multiple of 4 rows per batch at dp 4
    with pytest.raises(LongctxError, match="has no exact equivalent at dp 4 x micro") as caught:
        translate_data_cursor(loader.state_dict(), 4, 1)
    assert "\n" not in str(caught.value)
