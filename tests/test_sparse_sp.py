"""NSA, MoSA and Landmark under sequence parallelism on real gloo ranks equal one device.

Each variant runs in a tiny 2-layer Transformer swapped by ``parallelize`` under ulysses 2,
ring 2, ring 4 and ulysses 2 x ring 2 (world 4), each rank fed its ``mesh.shard_batch`` of a
packed batch (documents, RoPE positions restarting per document). Reference: the same model,
unsharded, in one process. Checked: the logits of every real token and the gradient of every
parameter (q/k/v/o projections, so dq/dk/dv of the core, and the variant's own parameters: NSA's
gates and compressors, MoSA's router), summed over the ranks as data parallelism sums them;
fp32 on both sides, rtol 1e-5 with an absolute floor scaled to each tensor (see RTOL).

What each layout exercises: Ulysses hands the core every token of a head subset (NSA's gates
and MoSA's dense/routed split and router rows sliced to the rank's heads, a rank holding dense
and routed heads); ring runs the core on the rank's zigzag queries against all-gathered keys
(global compression/selection blocks, global top-k from the gathered layer input, landmark
blocks on global positions); the hybrid does both. Landmark's sequence (40 tokens + 13
landmarks = 53) needs layout padding (to 56), which must not change a real token.

Landmark in eval mode retrieves 2 of up to 12 earlier blocks per query: with the default
``reference`` positions the core gets q, k unrotated and the RoPE tables through the wrappers
(Ulysses gathers them with the tokens, key gather with the keys) and re-positions the retrieved
keys; with ``original`` it keeps their own angles. Both equal the unsharded eval output.

Plus: the recipe validator's rules for these variants, and ``train_worker`` with NSA on 2 ranks
in ring mode logging the 1-rank loss curve.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from harness import run_on_ranks
from trainer_helpers import job, make_data, tiny_recipe, train_on_ranks

from longctx.attention.config import AttentionConfig, LandmarkConfig, MoSAConfig, NSAConfig
from longctx.attention.context import AttentionContext
from longctx.attention.landmark import insert_landmarks
from longctx.config.recipe import Recipe, load_recipe
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.model.transformer import Transformer
from longctx.parallel.config import ParallelConfig
from longctx.parallel.layout import zigzag_positions
from longctx.parallel.mesh import build_mesh
from longctx.parallel.parallelize import parallelize

B, T, VOCAB = 2, 32, 37
LANDMARK_TOKENS = 40  # regular tokens; 13 landmarks (block 3) make 53, which needs padding
# fp32 on both sides, the same terms summed in another order: rtol 1e-5 with an absolute floor
# of 1e-6 x the largest entry of the compared quantity (the logits; all of the model's
# gradients, which reach ~50: entries that are sums with cancellation carry the rounding of their
# largest terms, and some are exactly 0 in exact arithmetic, e.g. the compressed keys' output
# bias shifts every compressed logit of a query alike). In float64 both sides agree to 1e-14.
RTOL, ATOL_SCALE = 1e-5, 1e-6
MODEL = ModelConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
    initializer_range=0.2,
)  # fmt: skip
# Small blocks so that 32 tokens hold 15 compressed blocks and 8 selection blocks of which 3
# are kept (importance decides), and a window shorter than the sequence.
NSA = NSAConfig(compress_block=4, compress_stride=2, select_block=4, select_top_n=3, window=6)
VARIANTS = {
    "nsa": AttentionConfig(variant="nsa", chunk_size=8, nsa=NSA),
    # 2 dense heads of 8: a Ulysses rank of 4 heads holds 2 dense and 2 routed heads.
    "mosa": AttentionConfig(
        variant="mosa", chunk_size=8, mosa=MoSAConfig(dense_heads=2, sparsity=4)
    ),
    # Eval retrieval with the default 'reference' positions (the core rotates q, k itself) and
    # with 'original' ones.
    "landmark": AttentionConfig(
        variant="landmark", chunk_size=8, landmark=LandmarkConfig(block_size=3, retrieve_top_k=2)
    ),
    "landmark_original": AttentionConfig(
        variant="landmark",
        chunk_size=8,
        landmark=LandmarkConfig(block_size=3, retrieve_top_k=2, retrieval_positions="original"),
    ),
}
LANDMARK_VARIANTS = [name for name in VARIANTS if name.startswith("landmark")]
LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(1, 4), (2, 2)]}  # world -> (ulysses, ring) run on it


def _model(variant: str) -> Transformer:
    """Seeded model whose variant parameters are random, so every one of them matters."""
    torch.manual_seed(0)
    model = Transformer(MODEL, attention=VARIANTS[variant])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".gates." in name or ".router." in name:  # decisive gates and top-k routing
                param.copy_(torch.randn(param.shape, generator=gen))
    return model


def _batch(variant: str) -> dict[str, torch.Tensor]:
    """Packed [B, T'] batch: ids, doc ids, per-document RoPE positions (landmarks inserted for
    the landmark variant, as the trainer's data path does before sharding)."""
    gen = torch.Generator().manual_seed(2)
    length = LANDMARK_TOKENS if variant in LANDMARK_VARIANTS else T
    ids = torch.randint(0, VOCAB - 1, (B, length), generator=gen)
    docs = torch.stack([(torch.arange(length) >= 11).long(), torch.zeros(length, dtype=torch.long)])
    starts = torch.tensor([[11], [0]])
    positions = torch.where(docs == 1, torch.arange(length) - starts, torch.arange(length))
    batch = {"input_ids": ids, "doc_ids": docs, "position_ids": positions}
    if variant in LANDMARK_VARIANTS:
        block = VARIANTS[variant].landmark.block_size
        batch = insert_landmarks(batch, block_size=block, landmark_id=VOCAB - 1)
    return batch


def _loss_weight(length: int) -> torch.Tensor:
    """The loss is sum(logits * weight): random [B, length, V], zero past ``length`` (padding)."""
    weight = torch.randn(B, length, VOCAB, generator=torch.Generator().manual_seed(3))
    return torch.cat([weight, weight.new_zeros(B, 8, VOCAB)], dim=1)


def _forward(model, batch, seq_positions=None):
    return model(
        batch["input_ids"],
        batch["position_ids"],
        doc_ids=batch["doc_ids"],
        seq_positions=seq_positions,
    )


def _sharded_rank(rank, world):
    """Every variant under each layout of this world size (one spawn per world size)."""
    results = {}
    for ulysses, ring in LAYOUTS[world]:
        config = ParallelConfig(dp=1, ulysses=ulysses, ring=ring)
        mesh = build_mesh(config)
        for variant in VARIANTS:
            results[ulysses, ring, variant] = _sharded_run(variant, config, mesh)
    return results


def _sharded_run(variant, config, mesh):
    model = parallelize(_model(variant), config, mesh)
    batch = _batch(variant)
    shard = mesh.shard_batch(batch)
    positions = shard.pop("seq_positions")
    logits = _forward(model, shard, positions)
    weight = _loss_weight(batch["input_ids"].shape[1])
    (logits * weight[:, positions]).sum().backward()
    result = {
        "positions": positions,
        "logits": logits.detach(),
        "grads": [p.grad for p in model.parameters()],
    }
    if variant in LANDMARK_VARIANTS:  # inference retrieves the top-k blocks per query instead
        model.eval()
        with torch.no_grad():
            result["eval_logits"] = _forward(model, shard, positions)
    return result


@functools.cache
def _sharded(world):
    return run_on_ranks(_sharded_rank, world)


@functools.cache
def _unsharded(variant):
    model = _model(variant)
    batch = _batch(variant)
    length = batch["input_ids"].shape[1]
    logits = _forward(model, batch)
    (logits * _loss_weight(length)[:, :length]).sum().backward()
    model.eval()
    with torch.no_grad():
        eval_logits = _forward(model, batch)
    return logits.detach(), [p.grad for p in model.parameters()], eval_logits


def _assembled(results, field, length):
    """The ranks' [B, t, V] shards of ``field`` in global order, the first ``length`` tokens."""
    positions = torch.cat([r["positions"] for r in results])
    values = torch.cat([r[field] for r in results], dim=1)
    return values[:, positions.argsort()][:, :length]


def _assert_close(got, expected, largest: float):
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL_SCALE * largest)


LAYOUT_IDS = {(2, 1): "ulysses2", (1, 2): "ring2", (1, 4): "ring4", (2, 2): "ulysses2xring2"}


@pytest.mark.parametrize("layout", list(LAYOUT_IDS), ids=list(LAYOUT_IDS.values()))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_equals_unsharded(variant, layout):
    world = layout[0] * layout[1]
    results = [r[(*layout, variant)] for r in _sharded(world)]
    logits, grads, _ = _unsharded(variant)
    sharded = _assembled(results, "logits", logits.shape[1])
    _assert_close(sharded, logits, float(logits.abs().max()))
    largest = max(float(grad.abs().max()) for grad in grads)
    for index, grad in enumerate(grads):  # the data-parallel sum of the ranks' gradients
        _assert_close(sum(r["grads"][index] for r in results), grad, largest)


@pytest.mark.parametrize("layout", list(LAYOUT_IDS), ids=list(LAYOUT_IDS.values()))
@pytest.mark.parametrize("variant", LANDMARK_VARIANTS)
def test_landmark_retrieval_at_inference_equals_unsharded(variant, layout):
    world = layout[0] * layout[1]
    results = [r[(*layout, variant)] for r in _sharded(world)]
    _, _, eval_logits = _unsharded(variant)
    sharded = _assembled(results, "eval_logits", eval_logits.shape[1])
    _assert_close(sharded, eval_logits, float(eval_logits.abs().max()))


def test_landmark_eval_here_drops_and_moves_blocks():
    """The eval checks above are not vacuous: retrieval differs from training (blocks are
    dropped), and 'reference' differs from 'original' (retrieved keys are re-positioned)."""
    trained, _, reference = _unsharded("landmark")
    _, _, original = _unsharded("landmark_original")
    assert (reference - trained).abs().amax() > 1e-3
    assert (reference - original).abs().amax() > 1e-3


def _core_and_inputs(variant: str):
    """Layer 0's core of the seeded model and random q, k, v, layer input, doc ids (T = 32)."""
    core = _model(variant).layers[0].self_attn.core
    gen = torch.Generator().manual_seed(4)
    heads, kv_heads, dim = MODEL.num_attention_heads, MODEL.kv_heads, MODEL.dim_per_head
    q = torch.randn(B, heads, T, dim, generator=gen)
    k, v = (torch.randn(B, kv_heads, T, dim, generator=gen) for _ in range(2))
    hidden = torch.randn(B, T, MODEL.hidden_size, generator=gen)
    docs = torch.stack([(torch.arange(T) >= 13).long(), torch.zeros(T, dtype=torch.long)])
    return core, q, k, v, hidden, docs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cores_take_the_tokens_in_any_order(variant):
    """Ulysses hands a core its tokens in the order of the all-to-all: a core given a permuted
    sequence (with the tokens' global positions) returns the permuted output of the ordered one."""
    core, q, k, v, hidden, docs = _core_and_inputs(variant)
    positions = torch.arange(T)
    ordered = core(q, k, v, AttentionContext(positions.expand(B, -1), positions, docs, hidden))
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(5))
    ctx = AttentionContext(perm.expand(B, -1), perm, docs[:, perm], hidden[:, perm])
    permuted = core(q[:, :, perm], k[:, :, perm], v[:, :, perm], ctx)
    _assert_close(permuted, ordered[:, :, perm], float(ordered.detach().abs().max()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cores_on_a_query_subset_give_those_rows(variant):
    """What key gather hands a core: some queries (rank 1's zigzag shard of ring 4) against every
    key, with the key side in ``ctx.key_*``; the output is those rows of the full output."""
    core, q, k, v, hidden, docs = _core_and_inputs(variant)
    positions = torch.arange(T)
    full = core(q, k, v, AttentionContext(positions.expand(B, -1), positions, docs, hidden))
    rows = zigzag_positions(T, 1, 4)
    ctx = AttentionContext(
        position_ids=rows.expand(B, -1), seq_positions=rows, doc_ids=docs[:, rows],
        hidden=hidden[:, rows], key_seq_positions=positions, key_doc_ids=docs, key_hidden=hidden,
    )  # fmt: skip
    _assert_close(
        core(q[:, :, rows], k, v, ctx), full[:, :, rows], float(full.detach().abs().max())
    )


def test_nsa_refuses_kv_heads_replicated_by_ulysses():
    """A GQA group shares one selection: a core handed each kv head twice (Ulysses over more
    ranks than kv heads) would select per half group, so it refuses in one line."""
    core, q, k, v, hidden, docs = _core_and_inputs("nsa")
    positions = torch.arange(T)
    ctx = AttentionContext(positions.expand(B, -1), positions, docs, hidden)
    replicated = k.repeat_interleave(2, dim=1)
    with pytest.raises(LongctxError, match="one block selection per GQA group of 2") as info:
        core(q, replicated, v.repeat_interleave(2, dim=1), ctx)
    assert "\n" not in str(info.value)


TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


@pytest.mark.parametrize("variant", sorted({config.variant for config in VARIANTS.values()}))
def test_recipes_with_ulysses_and_ring_load(variant):
    recipe = load_recipe(TINY, [f"attention.variant={variant}", "attention.mosa.dense_heads=2",
                                "parallel.ulysses=2", "parallel.ring=2"])  # fmt: skip
    assert (recipe.parallel.ulysses, recipe.parallel.ring) == (2, 2)


def test_nsa_with_ulysses_splitting_a_gqa_group_fails_at_load():
    """tiny.yaml has 4 query heads over 2 kv heads: Ulysses 4 would replicate each kv head on
    two ranks and split the group that shares one selection."""
    with pytest.raises(LongctxError, match="does not divide num_key_value_heads=2") as info:
        load_recipe(TINY, ["attention.variant=nsa", "parallel.ulysses=4"])
    assert "\n" not in str(info.value)


def test_landmark_with_a_model_sliding_window_still_fails_at_load():
    with pytest.raises(LongctxError, match="sliding_window") as info:
        load_recipe(TINY, ["attention.variant=landmark", "model.sliding_window=16",
                           "parallel.ring=2"])  # fmt: skip
    assert "\n" not in str(info.value)


def _curve(reports):
    return [metrics["loss"] for metrics, _ in reports if "loss" in metrics]


@pytest.mark.slow
def test_nsa_ring2_training_run_has_the_single_process_loss_curve(tmp_path):
    """``train_worker`` (the trainer a ``longctx train`` worker runs) with NSA for 3 fp32 steps:
    2 ranks in ring mode log the loss curve and eval loss of 1 rank."""
    corpus, tokenizer = make_data(tmp_path / "data")
    common = {"steps": 3, "ckpt_every": 3, "eval_every": 3, "grad_accum": 1}
    plain = tiny_recipe(corpus, tokenizer, tmp_path / "plain", **common).model_dump(mode="json")
    plain["attention"].update(variant="nsa", nsa=NSA.model_dump())
    ring = {**plain, "parallel": {**plain["parallel"], "ring": 2}}
    ring["trainer"] = {**plain["trainer"], "run_dir": str(tmp_path / "ring")}
    reference = train_on_ranks([job(Recipe.model_validate(plain))], world=1)[0][0]
    results = train_on_ranks([job(Recipe.model_validate(ring))], world=2)
    expected = _curve(reference["reports"])
    assert len(expected) == 3
    for (run,) in results:
        torch.testing.assert_close(
            torch.tensor(_curve(run["reports"])), torch.tensor(expected), rtol=1e-5, atol=1e-6
        )
        assert run["summary"]["eval_loss"] == pytest.approx(
            reference["summary"]["eval_loss"], rel=1e-5
        )
