"""Elastic resume: a checkpoint written at dp 2 x ring 1 under ZeRO-2 on 2 ranks continues on
other layouts with the loss of the uninterrupted run and the same data position:

- 2 ranks: dp 1 x ring 2 under ZeRO-0, and dp 2 under ZeRO-3 (ZeRO 2 -> 3);
- 1 rank (W 2 -> 1): dp 1 under ZeRO-2, two micro-batches accumulated;
- 4 ranks (W 2 -> 4, oversubscribed): dp 2 x ring 2 under ZeRO-2 (the flat partitions cut
  over 4 ranks instead of 2);
- ring -> Ulysses: the ring run's own checkpoint continues at dp 1 x ulysses 2.

Reference: the uninterrupted dp 2 x ring 1 ZeRO-2 run. Each data-parallel rank reads one row per
micro-batch, so the uninterrupted step consumes rows ``2s`` and ``2s + 1`` of the epoch's
permutation and averages their per-row mean losses. A dp 1 run accumulates two micro-batches of
one row each: the same rows, the same average (computed over a sequence split between two ranks
under sequence parallelism). The checkpoint stores the full fp32 weights and AdamW moments
(per-rank shards, resharded on load), so the continuation starts from exactly the saved state;
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
END = 3 * HALF  # every run's last step: the cosine LR schedule spans the same steps in all
LOSS_RTOL = 1e-5
RANKS_TIMEOUT_S = 1800  # generous: a loaded machine may first rebuild DeepSpeed's comm op


def _recipe(root: Path, corpus: Path, tokenizer: Path, name: str, **fields):
    """The tiny recipe under ``root / name`` (END steps, a checkpoint every HALF); ``fields`` may
    set ``ring`` / ``ulysses`` and trainer fields."""
    layout = {key: fields.pop(key) for key in ("ring", "ulysses") if key in fields}
    trainer = {"steps": END, "ckpt_every": HALF, "eval_every": 0, "micro_batch_size": 1}
    recipe = tiny_recipe(corpus, tokenizer, root / name, **{**trainer, "keep_last": 3, **fields})
    return recipe.model_copy(update={"parallel": recipe.parallel.model_copy(update=layout)})


def _checkpoint(root: Path, name: str, step: int) -> str:
    return str(root / name / "checkpoints" / f"step_{step:06d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """On 2 ranks: the uninterrupted run, then the runs resumed from its step HALF on other
    2-rank layouts, and the ring run's step 2 x HALF resumed under Ulysses."""
    root = tmp_path_factory.mktemp("elastic")
    corpus, tokenizer = make_data(root / "data")
    straight = _recipe(root, corpus, tokenizer, "straight", zero_stage=2, grad_accum=1)
    ring = _recipe(root, corpus, tokenizer, "ring", zero_stage=0, grad_accum=2, ring=2)
    zero3 = _recipe(root, corpus, tokenizer, "zero3", zero_stage=3, grad_accum=1)
    ulysses = _recipe(root, corpus, tokenizer, "ulysses", zero_stage=0, grad_accum=2, ulysses=2)
    checkpoint = _checkpoint(root, "straight", HALF)
    jobs = [
        job(straight),
        job(ring, resume=checkpoint),
        job(zero3, resume=checkpoint),
        job(ulysses, resume=_checkpoint(root, "ring", 2 * HALF)),
    ]
    with deepspeed_environment():
        results = run_on_ranks(rank_train, 2, jobs, timeout=RANKS_TIMEOUT_S)
    return {
        "root": root,
        "corpus": corpus,
        "tokenizer": tokenizer,
        "results": results[0],
        "checkpoint": Path(checkpoint),
    }


@pytest.fixture(scope="module")
def resized(runs) -> dict:
    """The uninterrupted run's step HALF resumed on 1 rank (dp 1, ZeRO-2) and on 4 ranks
    (dp 2 x ring 2, ZeRO-2); per name, rank 0's result."""
    root, corpus, tokenizer = runs["root"], runs["corpus"], runs["tokenizer"]
    one = _recipe(root, corpus, tokenizer, "world1", zero_stage=2, grad_accum=2)
    four = _recipe(root, corpus, tokenizer, "world4", zero_stage=2, grad_accum=1, ring=2)
    checkpoint = str(runs["checkpoint"])
    results = {}
    with deepspeed_environment():
        for name, recipe, world in (("world1", one, 1), ("world4", four, 4)):
            ranks = run_on_ranks(
                rank_train, world, [job(recipe, resume=checkpoint)], timeout=RANKS_TIMEOUT_S
            )
            results[name] = ranks[0][0]
    return results


def _losses(result: dict) -> dict[int, float]:
    assert "error" not in result, result.get("error")
    return {metrics["step"]: metrics["loss"] for metrics, _ in result["reports"]}


def _manifest(root: Path, name: str, step: int) -> dict:
    import json

    return json.loads(
        (root / name / "checkpoints" / f"step_{step:06d}" / "manifest.json").read_text()
    )


def _assert_continues(straight: dict, elastic: dict, first: int, last: int, name: str) -> None:
    assert sorted(elastic) == list(range(first, last + 1)), name  # started at the checkpoint
    for step, loss in elastic.items():
        assert loss == pytest.approx(straight[step], rel=LOSS_RTOL), (name, step)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("index, name", [(1, "ring"), (2, "zero3")])
def test_elastic_run_continues_with_the_uninterrupted_losses(runs, index, name):
    straight = _losses(runs["results"][0])
    _assert_continues(straight, _losses(runs["results"][index]), HALF + 1, END, name)


@pytest.mark.slow
@pytest.mark.heavy
def test_ring_checkpoint_continues_under_ulysses(runs):
    """Ring -> Ulysses: the ring run's own checkpoint (step 2 x HALF, itself resumed from the
    ZeRO-2 run) continues at dp 1 x ulysses 2 with the uninterrupted run's losses."""
    straight = _losses(runs["results"][0])
    _assert_continues(straight, _losses(runs["results"][3]), 2 * HALF + 1, END, "ulysses")
    manifest = _manifest(runs["root"], "ulysses", END)
    assert manifest["sequence_parallel"] == {"ulysses": 2, "ring": 1}


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("name, world", [("world1", 1), ("world4", 4)])
def test_resized_world_continues_with_the_uninterrupted_losses(runs, resized, name, world):
    """W 2 -> 1 and W 2 -> 4: the ZeRO-2 partitions of 2 ranks are re-cut for 1 and 4."""
    straight = _losses(runs["results"][0])
    _assert_continues(straight, _losses(resized[name]), HALF + 1, END, name)
    manifest = _manifest(runs["root"], name, END)
    assert manifest["world_size"] == world
    reference = _manifest(runs["root"], "straight", END)
    assert manifest["tokens_seen"] == reference["tokens_seen"]


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
