"""CoPE, BAM (with and without SSMax) and TAPA under ring attention equal the unsharded model.

Under ``parallel.ring > 1`` the scored core runs by key-gather context parallelism: each rank
keeps its zigzag queries and receives every key of the ring group (``parallel/key_gather.py``).
On real gloo ranks, through ``parallelize`` on a tiny packed-batch Transformer (the model, batch
and per-rank run of test_positional_sp.py), ring 2, ring 4 and Ulysses 2 x ring 2 give the
unsharded logits and every parameter's gradient, the encodings' own parameters included (fp32,
rtol 1e-5). SSMax's ``log n_i`` must use the GLOBAL number of keys query i sees, not the keys of
its rank: a probe records the counts the BAM score module receives.

One ``train_worker`` run (2 ranks, ring 2, CoPE, 3 steps) logs the 1-rank loss curve.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from harness import run_on_ranks
from test_positional_sp import (
    POSITIONALS,
    B,
    T,
    check_sharded_equals_reference,
    packed_batch,
    positional_model,
    reference_run,
    sharded_run,
)
from trainer_helpers import job, make_data, tiny_recipe, train_on_ranks

from longctx.attention.scored import ScoredAttention
from longctx.parallel.config import ParallelConfig
from longctx.parallel.key_gather import KeyGatherAttention
from longctx.parallel.mesh import build_mesh
from longctx.parallel.parallelize import parallelize
from longctx.positional.config import BAMConfig, PositionalConfig

RTOL, ATOL = 1e-5, 2e-6  # fp32 on both sides, different summation orders
ENCODINGS = {**POSITIONALS, "bam_no_ssmax": PositionalConfig(kind="bam", bam=BAMConfig())}
LAYOUTS = {  # name: (world, ulysses, ring)
    "ring2": (2, 1, 2),
    "ring4": (4, 1, 4),
    "ulysses2_ring2": (4, 2, 2),
}


def _layout_rank(rank, world, layouts):
    """Every encoding under every layout of this world size (one spawn per world size)."""
    results = {}
    for name in layouts:
        _, ulysses, ring = LAYOUTS[name]
        config = ParallelConfig(dp=1, ulysses=ulysses, ring=ring)
        mesh = build_mesh(config)
        for kind, positional in ENCODINGS.items():
            results[name, kind] = sharded_run(positional, config, mesh)
        results[name, "ssmax_counts"] = _ssmax_key_counts(config, mesh)
    return results


def _ssmax_key_counts(config, mesh):
    """(query positions [c], visible-key counts [B, c], number of keys) per call of the first
    layer's BAM core: the ``n_i`` its SSMax takes the log of."""
    model = parallelize(positional_model(POSITIONALS["bam"]), config, mesh)
    core = model.layers[0].self_attn.core
    while not isinstance(core, ScoredAttention):
        core = core.inner
    seen = []
    original = core.visible_key_counts

    def recording_counts(mask):
        counts = original(mask)
        seen.append((mask.q_positions.clone(), counts, mask.k_positions.shape[0]))
        return counts

    core.visible_key_counts = recording_counts
    ids, docs, _ = packed_batch()
    shard = mesh.shard_batch({"input_ids": ids, "doc_ids": docs})
    positions = shard["seq_positions"]
    with torch.no_grad():
        model(shard["input_ids"], positions.expand(B, -1), doc_ids=shard["doc_ids"],
              seq_positions=positions)  # fmt: skip
    return {"positions": positions, "seen": seen, "gathers": _is_key_gather(model)}


def _is_key_gather(model) -> bool:
    """Whether the ring level of layer 0's core is a KeyGatherAttention."""
    core = model.layers[0].self_attn.core
    while not isinstance(core, ScoredAttention):
        if isinstance(core, KeyGatherAttention):
            return True
        core = core.inner
    return False


@functools.cache
def _sharded(world):
    layouts = tuple(name for name, (size, _, _) in LAYOUTS.items() if size == world)
    return run_on_ranks(_layout_rank, world, layouts)


@functools.cache
def _unsharded(kind):
    return reference_run(ENCODINGS[kind])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(ENCODINGS))
def test_ring_equals_unsharded(kind, layout):
    world = LAYOUTS[layout][0]
    results = [r[layout, kind] for r in _sharded(world)]
    check_sharded_equals_reference(results, *_unsharded(kind))


def _expected_key_counts(query_positions):
    """[B, c]: keys query i sees unsharded = its position minus its document's start, plus 1."""
    _, docs, _ = packed_batch()  # [B, T]
    starts = [[int((row == row[p]).nonzero()[0]) for p in query_positions] for row in docs]
    return query_positions[None] - torch.tensor(starts) + 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ssmax_counts_every_visible_key_of_the_sequence(layout):
    world = LAYOUTS[layout][0]
    for result in _sharded(world):
        probe = result[layout, "ssmax_counts"]
        assert probe["gathers"]
        assert probe["seen"]
        seen_queries = torch.cat([positions for positions, _, _ in probe["seen"]])
        # Ulysses hands the core the queries of its whole Ulysses group; ring keeps them local
        assert set(probe["positions"].tolist()) <= set(seen_queries.tolist())
        for positions, counts, num_keys in probe["seen"]:
            assert num_keys == T
            assert torch.equal(counts, _expected_key_counts(positions))


def _loss_curve(reports):
    return [metrics["loss"] for metrics, _ in reports if "loss" in metrics]


@pytest.mark.slow
def test_cope_ring2_training_run_has_the_single_process_loss_curve(tmp_path: Path):
    corpus, tokenizer = make_data(tmp_path / "data")
    common = {"steps": 3, "ckpt_every": 3, "eval_every": 3, "zero_stage": 0, "grad_accum": 1}
    plain = tiny_recipe(corpus, tokenizer, tmp_path / "plain", **common)
    plain = plain.model_copy(update={"positional": PositionalConfig(kind="cope")})
    ring = tiny_recipe(corpus, tokenizer, tmp_path / "ring", **common).model_copy(
        update={
            "positional": plain.positional,
            "parallel": plain.parallel.model_copy(update={"ring": 2}),
        }
    )
    reference = train_on_ranks([job(plain)], world=1)[0][0]
    expected = _loss_curve(reference["reports"])
    assert len(expected) == 3
    for (run,) in train_on_ranks([job(ring)], world=2):
        torch.testing.assert_close(
            torch.tensor(_loss_curve(run["reports"])), torch.tensor(expected), rtol=1e-5, atol=1e-6
        )
        assert run["summary"]["eval_loss"] == pytest.approx(
            reference["summary"]["eval_loss"], rel=1e-5
        )
