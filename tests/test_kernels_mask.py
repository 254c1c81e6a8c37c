"""MaskSpec: dense visibility against hand-checked values and Hugging Face's mask functions, and
tile classification (EMPTY / FULL / PARTIAL, causal diagonal) against the dense mask."""

from __future__ import annotations

import pytest
import torch
from transformers import masking_utils

from longctx.attention import BlockSparsePattern, MaskSpec, TileClass
from longctx.attention.tiling import PieceKind, plan_tiles
from longctx.errors import LongctxError


def power_pattern(window: int, sinks: int, block: int = 1) -> BlockSparsePattern:
    def rule(qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        delta = qb - kb
        return (delta < window) | ((delta & (delta - 1)) == 0) | (kb < sinks)

    return BlockSparsePattern(block_size=block, rule=rule)


def hf_mask(mask_function, batch: int, tq: int, tk: int) -> torch.Tensor:
    """Evaluate a transformers mask function (b, h, q_idx, kv_idx) on the full index grid."""
    b = torch.arange(batch)[:, None, None]
    q_idx = torch.arange(tq)[None, :, None]
    kv_idx = torch.arange(tk)[None, None, :]
    return mask_function(b, 0, q_idx, kv_idx).expand(batch, tq, tk)


def test_causal_mask_on_an_offset_query_shard():
    """Queries at global positions 2, 3 against keys 0..3: query 2 sees keys 0..2."""
    mask = MaskSpec(q_positions=torch.tensor([2, 3])).bind(2, 4)
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask.dense_mask()[0], expected)


def test_sliding_window_matches_transformers():
    window, length = 5, 23
    mask = MaskSpec(window=window).bind(length, length)
    reference = hf_mask(
        masking_utils.sliding_window_causal_mask_function(window), 1, length, length
    )
    assert torch.equal(mask.dense_mask(), reference)


def test_doc_ids_match_transformers_packed_sequence_mask():
    gen = torch.Generator().manual_seed(0)
    docs = torch.sort(torch.randint(0, 4, (2, 30), generator=gen), dim=1).values
    mask = MaskSpec(q_doc_ids=docs, k_doc_ids=docs).bind(30, 30)
    packed = masking_utils.packed_sequence_mask_function(docs)
    causal = masking_utils.causal_mask_function
    reference = hf_mask(masking_utils.and_masks(causal, packed), 2, 30, 30)
    assert torch.equal(mask.dense_mask(), reference)


@pytest.mark.parametrize(
    ("sinks", "expected"), [(1, {0, 5, 9, 11, 12, 13}), (0, {5, 9, 11, 12, 13})]
)
def test_power_attention_pattern_hand_values(sinks, expected):
    """SPECS.md 3.3 hand test: block 1, window 1; row 13 sees distances 0 and powers of two."""
    mask = MaskSpec(block_sparse=power_pattern(window=1, sinks=sinks)).bind(16, 16)
    row = mask.dense_mask()[0, 13]
    assert set(torch.nonzero(row).flatten().tolist()) == expected


def random_masks() -> list[MaskSpec]:
    """Masks mixing every rule, with zigzag (non-contiguous) positions on both sides."""
    gen = torch.Generator().manual_seed(1)
    q_pos = torch.cat([torch.arange(0, 48), torch.arange(144, 192)])  # zigzag rank 0, P=2
    k_pos = torch.cat([torch.arange(48, 96), torch.arange(96, 144)])
    docs_q = torch.sort(torch.randint(0, 3, (2, 96), generator=gen), dim=1).values
    docs_k = torch.sort(torch.randint(0, 3, (2, 96), generator=gen), dim=1).values
    return [
        MaskSpec(),
        MaskSpec(q_positions=q_pos, k_positions=k_pos),
        MaskSpec(q_positions=k_pos, k_positions=q_pos, window=40),
        MaskSpec(q_doc_ids=docs_q, k_doc_ids=docs_k),
        MaskSpec(block_sparse=power_pattern(window=2, sinks=1, block=8)),
        MaskSpec(causal=False, window=30),
    ]


@pytest.mark.parametrize("mask", random_masks())
@pytest.mark.parametrize("tile", [16, 25])
def test_tile_classes_agree_with_the_dense_mask(mask, tile):
    """EMPTY tiles hide every pair, FULL tiles show every pair; a causal diagonal tile is
    exactly lower-triangular (what a kernel's is_causal computes)."""
    mask = mask.bind(96, 96)
    classes, diagonal = mask.classify_tiles(tile, tile)
    dense = mask.dense_mask()  # [Bm, 96, 96]
    for i in range(classes.shape[0]):
        for j in range(classes.shape[1]):
            block = dense[:, i * tile : (i + 1) * tile, j * tile : (j + 1) * tile]
            if classes[i, j] == TileClass.EMPTY:
                assert not block.any()
            elif classes[i, j] == TileClass.FULL:
                assert block.all()
            if diagonal[i, j]:
                lower = torch.ones(block.shape[1:], dtype=torch.bool).tril()
                assert torch.equal(block, lower.expand_as(block))


def test_causal_classification_is_exact_on_contiguous_positions():
    """Causality alone is decided exactly by min/max: PARTIAL tiles show some pairs and hide some."""
    mask = MaskSpec().bind(64, 64)
    classes, diagonal = mask.classify_tiles(16, 16)
    rows = torch.arange(4)
    expected = torch.full((4, 4), int(TileClass.EMPTY))
    expected[rows[:, None] > rows[None, :]] = TileClass.FULL
    expected[rows, rows] = TileClass.PARTIAL
    assert torch.equal(classes, expected)
    assert torch.equal(diagonal, torch.eye(4, dtype=torch.bool))


def test_classify_one_shard_pair_as_ring_attention_does():
    """A query shard at positions 64..127 sees all keys at 0..63 and none at 128..191."""
    q_pos = torch.arange(64, 128)
    earlier = MaskSpec(q_positions=q_pos, k_positions=torch.arange(0, 64)).bind(64, 64)
    later = MaskSpec(q_positions=q_pos, k_positions=torch.arange(128, 192)).bind(64, 64)
    same = MaskSpec(q_positions=q_pos, k_positions=q_pos).bind(64, 64)
    assert earlier.classify() == TileClass.FULL
    assert later.classify() == TileClass.EMPTY
    assert same.classify() == TileClass.PARTIAL
    assert same.classify(slice(32, 64), slice(0, 32)) == TileClass.FULL


def test_slice_keeps_global_positions_and_doc_ids():
    docs = torch.arange(20).reshape(2, 10)
    mask = MaskSpec(q_doc_ids=docs, k_doc_ids=docs).bind(10, 10)
    tile = mask.slice(slice(4, 8), slice(2, 6))
    assert tile.q_positions.tolist() == [4, 5, 6, 7]
    assert torch.equal(tile.k_doc_ids, docs[:, 2:6])
    assert torch.equal(tile.dense_mask(), mask.dense_mask()[:, 4:8, 2:6])


def test_window_plan_visits_only_tiles_near_the_diagonal():
    """Blockwise skipping (SPECS 1.2): with window 40 and tiles of 32, a query tile visits only
    the key tiles that reach back 40 positions; everything else is never computed."""
    plan = plan_tiles(MaskSpec(window=40).bind(256, 256), tile=32, fused=False)
    for query_tile in plan:
        i = query_tile.queries.start // 32
        visited = [piece.keys.start // 32 for piece in query_tile.pieces]
        assert visited == list(range(max(0, i - 2), i + 1))
        assert query_tile.pieces[-1].kind is PieceKind.CAUSAL


def test_fused_plan_of_plain_causal_attention_is_one_causal_call():
    plan = plan_tiles(MaskSpec().bind(300, 300), tile=32, fused=True)
    assert len(plan) == 1 and plan[0].pieces[0].kind is PieceKind.CAUSAL
    assert plan[0].pieces[0].keys == slice(0, 300)


def test_positions_of_the_wrong_length_are_refused():
    with pytest.raises(LongctxError, match=r"q_positions must have shape \[8\], got \(6,\)"):
        MaskSpec(q_positions=torch.arange(6)).bind(8, 8)


def test_doc_ids_on_one_side_only_are_refused():
    with pytest.raises(LongctxError, match="both q_doc_ids and k_doc_ids"):
        MaskSpec(q_doc_ids=torch.zeros(1, 4, dtype=torch.long)).bind(4, 4)


def test_unbound_spec_cannot_be_classified():
    with pytest.raises(LongctxError, match=r"call mask.bind\(tq, tk\)"):
        MaskSpec().classify()
