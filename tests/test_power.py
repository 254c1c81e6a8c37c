"""PowerAttention (SPECS 3.3): the pattern's hand values, exactness against a float64
per-query loop (outputs and gradients), and a cost that follows the pattern's sparsity."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.attention.config import AttentionConfig, PowerConfig
from longctx.attention.context import AttentionContext
from longctx.attention.dense import DenseAttention
from longctx.attention.mask import MaskSpec
from longctx.attention.power import PowerAttention, power_pattern
from longctx.attention.tiling import plan_tiles
from longctx.model.config import ModelConfig
from longctx.positional.config import PositionalConfig

RTOL = 1e-5


def spec_visible(q: int, kv: int, block: int, window: int, sinks: int) -> bool:
    """The SPECS 3.3 formula, in plain Python integers."""
    delta = q // block - kv // block
    return kv <= q and (delta < window or (delta & (delta - 1)) == 0 or kv // block < sinks)


SHAPE = ModelConfig().attention_shape(0)  # no window; the cores read nothing else


def _core(block: int, window: int, sinks: int, backend: str, chunk: int) -> PowerAttention:
    config = AttentionConfig(
        variant="power",
        backend=backend,
        chunk_size=chunk,
        power={"block_size": block, "window_blocks": window, "sink_blocks": sinks},
    )
    return PowerAttention(SHAPE, config, PositionalConfig())


def _ctx(length: int, doc_ids: torch.Tensor | None = None) -> AttentionContext:
    return AttentionContext(
        position_ids=torch.arange(length)[None], seq_positions=torch.arange(length), doc_ids=doc_ids
    )


@pytest.mark.parametrize(
    ("sinks", "expected"), [(1, {0, 5, 9, 11, 12, 13}), (0, {5, 9, 11, 12, 13})]
)
def test_spec_row_13(sinks, expected):
    pattern = power_pattern(PowerConfig(block_size=1, window_blocks=1, sink_blocks=sinks))
    mask = MaskSpec(block_sparse=pattern).bind(14, 14)
    row = mask.dense_mask()[0, 13]
    assert set(torch.nonzero(row).squeeze(1).tolist()) == expected


def reference_power(q, k, v, block, window, sinks, doc_ids=None):
    """float64 loop over queries: softmax over the keys the SPECS formula shows."""
    batch, heads, length, dim = q.shape
    per_kv = heads // k.shape[1]
    rows = []
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                keys = [
                    j
                    for j in range(length)
                    if spec_visible(i, j, block, window, sinks)
                    and (doc_ids is None or doc_ids[b, j] == doc_ids[b, i])
                ]
                kh, vh = k[b, h // per_kv, keys].double(), v[b, h // per_kv, keys].double()
                weights = (kh @ q[b, h, i].double() / math.sqrt(dim)).softmax(0)
                rows.append(weights @ vh)
    return torch.stack(rows).view(batch, heads, length, -1)


@pytest.mark.parametrize("backend", ["chunked", "cpu_flash"])
def test_matches_float64_reference_out_and_grads(backend):
    gen = torch.Generator().manual_seed(0)
    length, block, window, sinks = 45, 3, 2, 1
    q = torch.randn(2, 4, length, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, length, 8, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, length, 8, generator=gen, requires_grad=True)
    docs = torch.tensor([[0] * length, [0] * 20 + [1] * 25])
    out = _core(block, window, sinks, backend, chunk=8)(q, k, v, _ctx(length, docs))
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_power(*ref_inputs, block, window, sinks, doc_ids=docs)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=1e-6)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    ref.backward(grad.double())
    for fast, slow in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(fast.grad.double(), slow.grad, rtol=RTOL, atol=1e-6)


def test_large_window_equals_dense():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=gen) for _ in range(3))
    power = _core(block=4, window=16, sinks=0, backend="chunked", chunk=16)(q, k, v, _ctx(64))
    attention = AttentionConfig(backend="chunked", chunk_size=16)
    dense = DenseAttention(SHAPE, attention, PositionalConfig())(q, k, v, _ctx(64))
    torch.testing.assert_close(power, dense, rtol=RTOL, atol=1e-6)


def test_visited_tiles_follow_the_pattern():
    """The tiled kernel visits exactly the tile pairs holding a visible pair: O(n log n) of the
    n (n + 1) / 2 causal ones."""
    length, tile = 4096, 64
    core = _core(block=64, window=1, sinks=1, backend="chunked", chunk=tile)
    mask = core.mask_for(_ctx(length)).bind(length, length)
    visited = sum(len(query_tile.pieces) for query_tile in plan_tiles(mask, tile, fused=False))
    tiles = length // tile
    expected = sum(
        spec_visible(i * tile, j * tile, 64, 1, 1) for i in range(tiles) for j in range(tiles)
    )
    dense_tiles = tiles * (tiles + 1) // 2
    assert visited == expected
    assert visited <= tiles * (math.log2(tiles) + 2)  # window + sink + powers of two per row
    assert visited < dense_tiles / 4


def test_model_with_power_window_covering_everything_equals_dense_model():
    """The registry wires PowerAttention into the model (W >= number of blocks: dense)."""
    from longctx.model.transformer import Transformer

    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    dense = Transformer(config)
    power = Transformer(config, attention=_core(2, 16, 0, "cpu_flash", 8).config)
    power.load_state_dict(dense.state_dict())
    input_ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(power(input_ids), dense(input_ids), rtol=RTOL, atol=1e-5)


def _power_sp_rank(rank, world, mode, q, k, v, dout):
    """PowerAttention under ring or Ulysses on this rank's zigzag shard."""
    import torch.distributed as dist

    from longctx.parallel.layout import zigzag_positions
    from longctx.parallel.ring import RingAttention
    from longctx.parallel.ulysses import UlyssesAttention

    positions = zigzag_positions(q.shape[2], rank, world)
    local = [t[:, :, positions].clone().requires_grad_() for t in (q, k, v)]
    core = _core(4, 1, 1, "chunked", 8)
    if mode == "ring":
        wrapped = RingAttention(core, dist.group.WORLD)
    else:
        wrapped = UlyssesAttention(
            core, dist.group.WORLD, num_heads=4, num_kv_heads=2, gather_hidden=False
        )
    ctx = AttentionContext(position_ids=positions[None], seq_positions=positions)
    out = wrapped(*local, ctx)
    out.backward(dout[:, :, positions])
    return positions, out.detach(), *(t.grad for t in local)


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_sequence_parallel_two_ranks_equals_single_device(mode):
    """Under ring attention (hidden K,V shards skipped by the pattern) and Ulysses (the core on
    the full sequence of half the heads), P = 2 zigzag shards, the pattern applies on global
    positions: outputs and gradients equal the single-device PowerAttention."""
    from harness import run_on_ranks

    gen = torch.Generator().manual_seed(3)
    length = 64
    q = torch.randn(1, 4, length, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, length, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, length, 8, generator=gen, requires_grad=True)
    dout = torch.randn(1, 4, length, 8, generator=gen)
    full = _core(4, 1, 1, "chunked", 8)(q, k, v, _ctx(length))
    full.backward(dout)
    results = run_on_ranks(_power_sp_rank, 2, mode, q.detach(), k.detach(), v.detach(), dout)
    for positions, out, dq, dk, dv in results:
        torch.testing.assert_close(out, full.detach()[:, :, positions], rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(dq, q.grad[:, :, positions], rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(dk, k.grad[:, :, positions], rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(dv, v.grad[:, :, positions], rtol=RTOL, atol=1e-6)
