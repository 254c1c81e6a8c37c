"""NSA (SPECS 3.1) against a plain float64 per-query loop, and its branches against dense
attention where the spec says they coincide.

The reference below recomputes everything per (sequence, kv head, query) in float64 with Python
loops: phi on each block, the compressed softmax, the importance of each selection block from
the overlapping compressed blocks summed over the GQA group, the top-n choice (forced blocks:
the query's own document's first block and its two most recent blocks; ties to the lower index), the raw-token and window softmaxes and the gates.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerances import FP32, assert_gradient_close

from longctx.attention import AttentionConfig, AttentionContext, block_attention
from longctx.attention.config import NSAConfig
from longctx.attention.nsa import DENSE_START_GATE_BIAS, NSAAttention
from longctx.config.recipe import load_recipe
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.model.hf_io import load_hf, new_parameter_names, save_hf
from longctx.model.transformer import Transformer
from longctx.positional.config import PositionalConfig

# fp32 fast path vs float64 loop: sums of <= 100 products, rounding only (rtol 1e-5).
FP64 = {"rtol": 1e-10, "atol": 1e-12}
HIDDEN, HEADS, KV_HEADS, DIM = 16, 4, 2, 8


def small_model_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM,
    )  # fmt: skip


def make_core(
    top_n=4, window=24, tile=None, select_block=16, seed=0, compress=(8, 4)
) -> NSAAttention:
    settings = NSAConfig(
        compress_block=compress[0],
        compress_stride=compress[1],
        select_block=select_block,
        select_top_n=top_n,
        window=window,
    )
    torch.manual_seed(seed)
    core = NSAAttention(
        small_model_config().attention_shape(0),
        AttentionConfig(variant="nsa", chunk_size=tile, nsa=settings),
        PositionalConfig(),
    )
    with torch.no_grad():  # random gate biases so every gate matters
        core.gates.bias.normal_()
    return core


def inputs(length=80, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, HEADS, length, DIM), (2, KV_HEADS, length, DIM), (2, KV_HEADS, length, DIM),
              (2, length, HIDDEN)]  # fmt: skip
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def context(hidden, doc_ids=None) -> AttentionContext:
    batch, length = hidden.shape[:2]
    positions = torch.arange(length)
    return AttentionContext(
        position_ids=positions.expand(batch, length), seq_positions=positions, doc_ids=doc_ids,
        hidden=hidden,
    )  # fmt: skip


def softmax_attend(query, keys, values, scale):
    """One query row over a list of keys; no key -> 0 (the empty-branch rule)."""
    if keys.shape[0] == 0:
        return torch.zeros_like(query), None
    probs = torch.softmax(keys @ query * scale, dim=0)
    return probs @ values, probs


def reference_nsa(core, q, k, v, hidden, doc_ids=None):
    """NSA in float64, one query at a time."""
    core = copy.deepcopy(core).double()
    s = core.settings
    span, d, sel, n, w = (
        s.compress_block,
        s.compress_stride,
        s.select_block,
        s.select_top_n,
        s.window,
    )
    q, k, v, hidden = q.double(), k.double(), v.double(), hidden.double()
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    group, scale = heads // kv_heads, 1.0 / math.sqrt(dim)
    num_compressed = (length - span) // d + 1 if length >= span else 0
    num_select = -(-length // sel)
    gates = core.gates(hidden)[..., 0].permute(1, 3, 2, 0)  # [B, T, Hq, 3]

    def phi(compressor, block):  # block [span, D]
        features = (block + compressor.position).flatten()
        return (
            block.mean(0)
            + compressor.out_bias
            + compressor.out_weight @ F.silu(compressor.in_weight @ features + compressor.in_bias)
        )

    rows = {}
    for b in range(batch):
        doc = (lambda t: 0) if doc_ids is None else (lambda t, b=b: int(doc_ids[b, t]))
        for j in range(kv_heads):
            starts = [i * d for i in range(num_compressed)]
            ck = [phi(core.compress_key, k[b, j, a : a + span]) for a in starts]
            cv = [phi(core.compress_value, v[b, j, a : a + span]) for a in starts]
            for t in range(length):
                seen = [i for i, a in enumerate(starts)
                        if a + span - 1 <= t and doc(a) == doc(a + span - 1) == doc(t)]  # fmt: skip
                importance = [0.0] * num_select
                o_cmp = {}
                for h in range(j * group, (j + 1) * group):
                    keys = torch.stack([ck[i] for i in seen]) if seen else q.new_zeros(0, dim)
                    vals = torch.stack([cv[i] for i in seen]) if seen else q.new_zeros(0, dim)
                    o_cmp[h], probs = softmax_attend(q[b, h, t], keys, vals, scale)
                    for p, i in zip([] if probs is None else probs.tolist(), seen):
                        for jb in range(num_select):
                            if i * d <= jb * sel + sel - 1 and i * d + span - 1 >= jb * sel:
                                importance[jb] += p
                started = [jb for jb in range(num_select) if jb * sel <= t]
                current = t // sel
                first = t  # the first token of t's document (packed documents are contiguous)
                while first > 0 and doc(first - 1) == doc(t):
                    first -= 1
                forced = [jb for jb in started if jb in (first // sel, current, current - 1)]
                rest = sorted(
                    (jb for jb in started if jb not in forced), key=lambda jb: -importance[jb]
                )
                chosen = (forced + rest)[:n]
                picked = [u for jb in chosen for u in range(jb * sel, min(jb * sel + sel, length))
                          if u <= t and doc(u) == doc(t)]  # fmt: skip
                recent = [u for u in range(max(0, t - w + 1), t + 1) if doc(u) == doc(t)]
                for h in range(j * group, (j + 1) * group):
                    o_slc, _ = softmax_attend(q[b, h, t], k[b, j, picked], v[b, j, picked], scale)
                    o_win, _ = softmax_attend(q[b, h, t], k[b, j, recent], v[b, j, recent], scale)
                    g = gates[b, t, h]
                    rows[b, h, t] = g[0] * o_cmp[h] + g[1] * o_slc + g[2] * o_win
    out = torch.stack([torch.stack([torch.stack([rows[b, h, t] for t in range(length)])
                                    for h in range(heads)]) for b in range(batch)])  # fmt: skip
    return out, core


def run_both(core, doc_ids=None, dtype=torch.float32, length=80):
    """Fast and reference outputs and the gradients of one random projection of them."""
    tensors = inputs(length, dtype=dtype)
    core = core.to(dtype)
    fast = core(*tensors[:3], context(tensors[3], doc_ids))
    ref_tensors = [t.detach().double().requires_grad_() for t in tensors]
    ref, ref_core = reference_nsa(core, *ref_tensors, doc_ids=doc_ids)
    weight = torch.randn(
        fast.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    (fast * weight.to(dtype)).sum().backward()
    (ref * weight).sum().backward()
    grads = [t.grad for t in tensors] + [p.grad for p in core.parameters()]
    ref_grads = [t.grad for t in ref_tensors] + [p.grad for p in ref_core.parameters()]
    return fast, ref, grads, ref_grads


@pytest.mark.parametrize("doc_ids", [None, torch.tensor([[0] * 37 + [1] * 43, [0] * 80])])
def test_nsa_matches_float64_reference_loop_outputs_and_gradients(doc_ids):
    """l' = 8 over 80 tokens: 10 selection blocks, 4 kept, so importance decides most picks."""
    fast, ref, grads, ref_grads = run_both(make_core(top_n=4, select_block=8), doc_ids)
    torch.testing.assert_close(fast, ref.float(), **FP32)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_gradient_close(grad, ref_grad)


@pytest.mark.parametrize("top_n", [3, 5])
def test_packed_documents_force_the_own_documents_first_block_not_block_0(top_n):
    """Issue 17 item 5. Two packed documents, the second starting at token 20 (inside
    selection block 2 of l' = 8): every query of the second document is forced to keep block 2
    (its document's first block) instead of block 0, which it cannot see (all of block 0 is the
    first document), so no selected block is wasted. ``top_n = 3``: the forced blocks fill the
    selection; ``top_n = 5``: two more by importance. Checked against the float64 loop, whose
    forced rule is written from the document boundaries, and on the selections themselves."""
    length = 96
    docs = torch.tensor([[0] * 20 + [1] * 76, [0] * 96])
    core = make_core(top_n=top_n, select_block=8)
    fast, ref, grads, ref_grads = run_both(core, docs, length=length)
    torch.testing.assert_close(fast, ref.float(), **FP32)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad.float(), **FP32)
    q, k, v, hidden = inputs(length)
    choices = []  # the selections the forward pass makes
    select_blocks = core._select_blocks
    core._select_blocks = lambda *args: choices.append(select_blocks(*args)) or choices[-1]
    with torch.no_grad():
        core(q, k, v, context(hidden, docs))
    (selected,) = choices
    second = selected[0, :, 20:]  # [Hkv, queries of document 1, n]
    assert (second == 2).all(0).any(-1).all()
    # block 0 (hidden) only fills a place left when document 1 has fewer than n started blocks
    own_blocks = torch.arange(20, length) // 8 - 2 + 1  # blocks 2 .. current
    assert torch.equal((second == 0).any(-1).any(0), own_blocks < top_n)
    assert (selected[1] == 0).any(-1).all()  # one document: block 0 stays forced


@pytest.mark.parametrize(
    "compress, select_block",
    [((6, 4), 8), ((8, 3), 10)],
    ids=["block-not-a-stride-multiple", "stride-not-dividing-selection-block"],
)
def test_selection_importance_for_other_block_geometries_matches_reference(compress, select_block):
    """The importance of a selection block sums the compressed blocks overlapping it: read as a
    strided window when d divides l' (l = 6, d = 4: blocks 2j - 1 .. 2j + 1), through an index
    otherwise (d = 3, l' = 10: two or three blocks by j); both against the float64 loop."""
    core = make_core(top_n=3, select_block=select_block, compress=compress)
    fast, ref, grads, ref_grads = run_both(core, dtype=torch.float64)
    torch.testing.assert_close(fast, ref, **FP64)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **FP64)


def test_nsa_in_float64_matches_reference_to_rounding():
    """Window tiles of 7 rows (attention.chunk_size): 80 queries in 12 tiles, the last partial,
    each meeting the window's 24 keys plus its own rows."""
    fast, ref, grads, ref_grads = run_both(
        make_core(top_n=5, select_block=8, tile=7), dtype=torch.float64
    )
    torch.testing.assert_close(fast, ref, **FP64)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **FP64)


def test_selection_covering_all_blocks_equals_dense_causal_attention():
    q, k, v, hidden = inputs(length=96)
    core = make_core(top_n=6)  # 96 / 16 = 6 selection blocks: every block is kept
    _, o_slc, _ = core.branches(q, k, v, context(hidden))
    dense, _ = block_attention(q, k, v, backend="reference")
    torch.testing.assert_close(o_slc, dense, **FP32)
    o_slc.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    dense.square().sum().backward()
    for grad, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(grad, t.grad, **FP32)


def test_window_at_least_sequence_equals_dense_causal_attention():
    q, k, v, hidden = inputs(length=80)
    _, _, o_win = make_core(window=80).branches(q, k, v, context(hidden))
    dense, _ = block_attention(q, k, v, backend="reference")
    torch.testing.assert_close(o_win, dense, **FP32)


def test_queries_before_the_first_full_block_get_zero_from_compression():
    """Queries t < l - 1 = 7 see no compressed key: that branch is exactly 0, gradients finite."""
    q, k, v, hidden = inputs(length=40)
    o_cmp, _, _ = make_core().branches(q, k, v, context(hidden))
    assert torch.equal(o_cmp[:, :, :7], torch.zeros_like(o_cmp[:, :, :7]))
    assert o_cmp[:, :, 7:].abs().amin(-1).gt(0).all()
    o_cmp.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_sequence_shorter_than_a_compression_block_keeps_only_selection_and_window():
    q, k, v, hidden = inputs(length=6)
    core = make_core()
    o_cmp, o_slc, o_win = core.branches(q, k, v, context(hidden))
    dense, _ = block_attention(q, k, v, backend="reference")
    assert torch.equal(o_cmp, torch.zeros_like(o_cmp))
    torch.testing.assert_close(o_slc, dense, **FP32)
    torch.testing.assert_close(o_win, dense, **FP32)


def test_loading_a_dense_checkpoint_starts_nsa_from_mean_pooling_and_window_gates(tmp_path):
    """load_hf with attention nsa: the checkpoint's weights are kept, the NSA parameters are
    new (listed) and start as SPECS says: phi = block mean, gates sigmoid(-2, -2, +2)."""
    config = small_model_config()
    save_hf(Transformer(config), config, tmp_path / "dense")
    settings = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_top_n=3)
    model, _ = load_hf(tmp_path / "dense", attention=AttentionConfig(variant="nsa", nsa=settings))
    core = model.layers[0].self_attn.core
    assert {"model.layers.0.self_attn.core.gates.bias",
            "model.layers.0.self_attn.core.compress_value.in_weight"} <= set(
        new_parameter_names(model))  # fmt: skip
    q, k, v, hidden = inputs(length=40)
    means = torch.stack([k[:, :, a : a + 8].mean(2) for a in range(0, 33, 4)], dim=2)
    torch.testing.assert_close(core.compress_key(k), means, **FP32)
    gates = core.gates(hidden)  # [3, B, Hq, T, 1]
    expected = torch.sigmoid(torch.tensor(DENSE_START_GATE_BIAS))[:, None, None, None, None]
    torch.testing.assert_close(gates, expected.expand_as(gates), **FP32)


def test_nsa_model_trains_every_new_parameter():
    config = small_model_config()
    settings = NSAConfig(
        compress_block=8, compress_stride=4, select_block=16, select_top_n=3, window=16
    )
    torch.manual_seed(0)
    model = Transformer(config, attention=AttentionConfig(variant="nsa", nsa=settings))
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    core = model.layers[0].self_attn.core
    for name, param in core.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- selected-block kernel alone


def random_selection(batch, kv_heads, q_positions, select_block, top_n, gen):
    """[B, Hkv, Tq, top_n] distinct started blocks per query (-1 padding), random subsets."""
    rows = []
    for t in q_positions.tolist():
        started = t // select_block + 1
        for _ in range(batch * kv_heads):
            count = int(torch.randint(1, min(top_n, started) + 1, (1,), generator=gen))
            picks = torch.randperm(started, generator=gen)[:count]
            rows.append(torch.cat([picks, torch.full((top_n - count,), -1)]))
    chosen = torch.stack(rows).view(len(q_positions), batch, kv_heads, top_n)
    return chosen.permute(1, 2, 0, 3).contiguous()


def reference_selected_attention(q, k, v, selected, q_positions, q_docs, k_docs, select_block):
    """float64, one (sequence, head, query) at a time: softmax over the raw tokens of the
    selected blocks that are not after the query and share its document; none -> 0."""
    batch, heads, count, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group, scale = heads // kv_heads, 1.0 / math.sqrt(dim)
    rows = []
    for b in range(batch):
        for h in range(heads):
            j = h // group
            for i in range(count):
                t = int(q_positions[i])
                keys = [u for blk in selected[b, j, i].tolist() if blk >= 0
                        for u in range(blk * select_block, min(blk * select_block + select_block, length))
                        if u <= t and (q_docs is None or k_docs[b, u] == q_docs[b, i])]  # fmt: skip
                rows.append(softmax_attend(q[b, h, i], k[b, j, keys], v[b, j, keys], scale)[0])
    return torch.stack(rows).view(batch, heads, count, dim)


@pytest.mark.parametrize(
    "case",
    ["causal", "documents", "query_subset", "small_steps", "growing_scores", "no_margin"],
)
def test_selected_block_kernel_matches_float64_per_query_reference(case, monkeypatch):
    """Block-major selected attention against a per-query float64 loop: 75 tokens (not a
    multiple of l' = 8, so the last block is short), random selections of up to 4 blocks,
    outputs and gradients of q, k, v. ``documents``: packed documents (some queries then see
    none of their keys: output 0); ``query_subset``: queries at shuffled global positions
    (a sequence-parallel shard); ``small_steps``: blocks' queries split over several steps;
    ``growing_scores``: keys' norms grow along the sequence (later blocks' scores exceed the
    forward's reference score by more than its rescale margin); ``no_margin``: every raised
    maximum rescales its rows."""
    from longctx.attention import nsa_selection
    from longctx.attention.nsa_selection import QueryKeySides, SelectedBlockAttention

    if case == "small_steps":
        monkeypatch.setattr(nsa_selection, "ROWS_PER_STEP", 16)
    if case == "no_margin":
        monkeypatch.setattr(nsa_selection, "RESCALE_MARGIN", 0.0)
    gen = torch.Generator().manual_seed(3)
    length, block, top_n = 75, 8, 4
    q_positions = torch.arange(length)
    if case == "query_subset":
        q_positions = torch.randperm(length, generator=gen)[:40]
    k_docs = q_docs = None
    if case == "documents":
        k_docs = torch.tensor([[0] * 20 + [1] * 33 + [2] * 22, [0] * 61 + [1] * 14])
        q_docs = k_docs[:, q_positions]
    q = torch.randn(2, HEADS, len(q_positions), DIM, generator=gen, requires_grad=True)
    k = torch.randn(2, KV_HEADS, length, DIM, generator=gen)
    if case == "growing_scores":  # late blocks outscore the first ones by more than 8
        k = k * torch.linspace(0.2, 4.0, length)[:, None]
    k.requires_grad_()
    v = torch.randn(2, KV_HEADS, length, DIM, generator=gen, requires_grad=True)
    selected = random_selection(2, KV_HEADS, q_positions, block, top_n, gen)
    sides = QueryKeySides(q_positions, q_docs, k_docs)
    fast = SelectedBlockAttention.apply(q, k, v, selected, sides, 1.0 / math.sqrt(DIM), block)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_selected_attention(*ref_inputs, selected, q_positions, q_docs, k_docs, block)
    torch.testing.assert_close(fast, ref.float(), **FP32)
    weight = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
    (fast * weight.float()).sum().backward()
    (ref * weight).sum().backward()
    for tensor, ref_tensor in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(tensor.grad, ref_tensor.grad.float(), **FP32)
    if case == "documents":  # the empty-branch rule is exercised: some queries see no key
        assert (ref.abs().sum(-1) == 0).any()


def test_top_blocks_keeps_the_largest_and_breaks_ties_to_the_lower_index():
    """Against a stable descending sort on scores with many ties (and +-inf entries)."""
    from longctx.attention.nsa import _top_blocks

    gen = torch.Generator().manual_seed(0)
    ranked = torch.randint(0, 4, (3, 50, 20), generator=gen).float()
    ranked[..., 0] = float("inf")
    ranked[:, :, -5:] = float("-inf")
    expected = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :7]
    assert torch.equal(_top_blocks(ranked, 7), expected.sort(-1).values)


def test_nsa_refuses_a_model_sliding_window_instead_of_dropping_it():
    """NSA's window branch is attention.nsa.window: a model window (Mistral) is refused in one
    line, by the constructor and at recipe load; a Qwen2 window covering no layer is fine."""
    windowed = small_model_config().model_copy(update={"sliding_window": 16})
    attention = AttentionConfig(variant="nsa")
    with pytest.raises(LongctxError, match=r"does not honour the model's sliding_window \(16\)"):
        NSAAttention(windowed.attention_shape(0), attention, PositionalConfig())
    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    with pytest.raises(LongctxError, match=r"sliding_window \(16\)") as info:
        load_recipe(tiny, ["attention.variant=nsa", "model.sliding_window=16"])
    assert "\n" not in str(info.value)
    unwindowed = ["model.sliding_window=16", "model.max_window_layers=2"]  # 2 layers, none windowed
    assert load_recipe(tiny, ["attention.variant=nsa", *unwindowed]).attention.variant == "nsa"


@pytest.mark.parametrize(
    ("block", "stride", "length"), [(8, 4, 37), (8, 3, 40), (8, 12, 50), (5, 5, 23)]
)
def test_block_compressor_matches_the_per_block_formula(block, stride, length):
    """phi through its segment GEMM against ``mean(X) + W_out silu(W_in flatten(X + P) + b_in)
    + b_out`` block by block in float64, outputs and gradients, for strides that divide the
    block, do not (gcd 1), and exceed it (gaps between blocks)."""
    from longctx.attention.nsa import BlockCompressor

    gen = torch.Generator().manual_seed(5)
    compressor = BlockCompressor(block, stride, DIM, 0.3).double()
    with torch.no_grad():
        compressor.in_bias.normal_(generator=gen)
        compressor.out_bias.normal_(generator=gen)
    x = torch.randn(2, 3, length, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    fast = compressor(x)
    blocks = [x_ref[:, :, i * stride : i * stride + block] for i in range(fast.shape[2])]
    ref = torch.stack(
        [
            part.mean(2)
            + F.linear(
                F.silu(F.linear((part + compressor.position).flatten(-2), compressor.in_weight,
                                compressor.in_bias)),
                compressor.out_weight, compressor.out_bias,
            )
            for part in blocks
        ],
        dim=2,
    )  # fmt: skip
    assert fast.shape[2] == (length - block) // stride + 1
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    weight = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
    (fast * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


def test_second_backward_through_the_fused_function_is_refused_clearly():
    """The fused function frees the selection output during its backward: a second backward
    (retain_graph=True) raises one clear error instead of using freed data."""
    from longctx.errors import LongctxError

    core = make_core()
    q, k, v, hidden = inputs(length=40)
    loss = core(q, k, v, context(hidden)).square().sum()
    loss.backward(retain_graph=True)
    with pytest.raises(LongctxError, match="retain_graph"):
        loss.backward()


def test_nsa_under_activation_checkpointing_matches_the_plain_run():
    """Non-reentrant checkpointing (what ``model/wrappers.py`` uses) recomputes the fused
    function's saved tensors, the selection output among them, which backward then frees:
    outputs and gradients equal the plain run's."""
    from torch.utils.checkpoint import checkpoint

    core = make_core()
    results = []
    for checkpointed in (False, True):
        tensors = [t.detach().requires_grad_() for t in inputs(length=40)]
        q, k, v, hidden = tensors
        ctx = context(hidden)
        if checkpointed:
            out = checkpoint(core, q, k, v, ctx, use_reentrant=False)
        else:
            out = core(q, k, v, ctx)
        out.square().sum().backward()
        results.append([out.detach()] + [t.grad for t in tensors])
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=1e-6)
