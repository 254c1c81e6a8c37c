"""Landmark retrieval at inference with the reference implementation's RoPE positions.

epfml/landmark-attention (``llama/llama_mem.py``, ``LlamaAttention.forward`` with ``mem_freq``)
caches keys BEFORE RoPE and, for a query whose earlier context is ``full_len`` tokens of
complete blocks, with ``top = min(k, blocks in memory)`` and
``prefix_len = full_len - (top + 1) G``:

- scores the landmarks to pick the top-k blocks with the most recent ``top`` landmarks at their
  own positions and every older one at ``prefix_len + G - 1`` (``mem_pos``);
- rotates the chosen blocks, taken in increasing order, into ``top + 1`` slots of G positions
  starting at ``prefix_len``: the i-th takes slot i, or slot i + 1 when it is one of the ``top``
  most recent blocks (``selected_indices``);
- keeps the local context (here: the query's own block) and the query at their own positions.

The float64 reference below follows that recipe per (sequence, head, query) with its own RoPE
(``rope``: angles ``position * base^(-2i/D)``), the query's document playing the reference's
whole sequence: a position is the query's RoPE position minus the distance in the sequence.
"""

from __future__ import annotations

import math

import pytest
import torch

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.landmark import LandmarkAttention
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.model.transformer import Transformer
from longctx.positional.config import PositionalConfig

BASE = 10000.0
DIM = 8
FP64 = {"rtol": 1e-10, "atol": 1e-12}


def rope(x: torch.Tensor, position: int) -> torch.Tensor:
    """x [D] float64 rotated to ``position``: pairs (i, i + D/2) by angle position / base^(2i/D)."""
    half = x.shape[-1] // 2
    angle = position * BASE ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    first, second = x[:half], x[half:]
    return torch.cat([first * angle.cos() - second * angle.sin(),
                      second * angle.cos() + first * angle.sin()])  # fmt: skip


def tables(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (cos, sin) [B, T, D] of ``position_ids`` [B, T] (the model's layout)."""
    inv_freq = BASE ** (-torch.arange(DIM // 2, dtype=torch.float64) * 2 / DIM)
    angles = position_ids[..., None].double() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def make_core(block_size: int, top_k: int, positions="reference", heads=4, kv_heads=2, tile=None):
    shape = ModelConfig(
        vocab_size=64, hidden_size=heads * DIM, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=DIM,
    ).attention_shape(0)  # fmt: skip
    config = AttentionConfig(
        variant="landmark",
        chunk_size=tile,
        landmark={
            "block_size": block_size,
            "retrieve_top_k": top_k,
            "retrieval_positions": positions,
        },
    )
    return LandmarkAttention(shape, config, PositionalConfig())


def doc_positions(docs: torch.Tensor) -> torch.Tensor:
    """[B, T] RoPE positions restarting at every document."""
    out = torch.zeros_like(docs)
    for b in range(docs.shape[0]):
        for t in range(1, docs.shape[1]):
            out[b, t] = 0 if docs[b, t] != docs[b, t - 1] else out[b, t - 1] + 1
    return out


def reference_retrieval(q, k, v, docs, position_ids, block_size, top_k):
    """float64 per query: the reference's retrieval (module docstring) on UNROTATED q, k.

    Also returns the largest query-key RoPE distance any attended key was seen at."""
    group = block_size + 1
    batch, heads, length, dim = q.shape
    per_kv = heads // k.shape[1]
    out = torch.zeros(batch, heads, length, dim, dtype=torch.float64)
    widest = 0
    for b in range(batch):
        doc = docs[b].tolist()
        for h in range(heads):
            kh, vh = k[b, h // per_kv], v[b, h // per_kv]
            for i in range(length):
                here = int(position_ids[b, i])

                def pos(j, i=i, here=here):  # RoPE position of sequence index j for query i
                    return here - (i - j)

                qi = rope(q[b, h, i], here)
                own = i // group
                own_tokens = [j for j in range(own * group, i + 1)
                              if j % group != block_size and doc[j] == doc[i]]  # fmt: skip
                earlier = [n for n in range(own) if doc[n * group + block_size] == doc[i]]
                top = min(top_k, len(earlier))
                recent_from = own - top
                first_slot = own - top - 1  # the block index of slot 0

                scored = {}
                for n in earlier:  # recent landmarks at their own block, older ones at slot 0
                    at = n if n >= recent_from else first_slot
                    lm_key = rope(kh[n * group + block_size], pos(at * group + block_size))
                    scored[n] = float(qi @ lm_key)
                chosen = sorted(sorted(earlier, key=lambda n: -scored[n])[:top])
                # key (index j in the sequence, RoPE position) of every attended token
                own_keys = [(j, pos(j)) for j in own_tokens]
                blocks = []
                for rank, n in enumerate(chosen):
                    slot = rank + (1 if n >= recent_from else 0)
                    at = first_slot + slot
                    members = [(n * group + g, pos(at * group + g)) for g in range(block_size)
                               if doc[n * group + g] == doc[i]]  # fmt: skip
                    landmark = (n * group + block_size, pos(at * group + block_size))
                    blocks.append((landmark, members))
                logit = {}
                for j, p in own_keys + [x for lm, ms in blocks for x in [lm, *ms]]:
                    logit[j, p] = float(qi @ rope(kh[j], p)) / math.sqrt(dim)
                    widest = max(widest, here - p)
                top_level = [logit[x] for x in own_keys] + [logit[lm] for lm, _ in blocks]
                weights = torch.tensor(top_level, dtype=torch.float64).softmax(0)
                for weight, (j, _) in zip(weights[: len(own_keys)], own_keys):
                    out[b, h, i] += weight * vh[j]
                for weight, (_, members) in zip(weights[len(own_keys) :], blocks):
                    inner = torch.tensor([logit[x] for x in members], dtype=torch.float64)
                    for share, (j, _) in zip(inner.softmax(0), members):
                        out[b, h, i] += weight * share * vh[j]
    return out, widest


def inputs(length, heads, kv_heads, seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, DIM, generator=gen, dtype=torch.float64)
    return q, k, v


def context(docs, position_ids, rotary=True):
    length = docs.shape[1]
    return AttentionContext(
        position_ids=position_ids, seq_positions=torch.arange(length), doc_ids=docs,
        rotary=tables(position_ids) if rotary else None,
    )  # fmt: skip


# Trained at 4 blocks of G = 4 (16 tokens, e.g. max_position_embeddings 16) with k = 2: the
# reference keeps every distance below (k + 2) G = 16 at any length.
BLOCK, TOP_K = 3, 2


@pytest.mark.parametrize("length", [15, 47, 130])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_reference_positions_match_the_float64_reference(length, heads, kv_heads):
    """Lengths 1x, 3x and 8x a 16-token training length; row 0 one document, row 1 two packed
    documents (positions restart), GQA and not; the query tiles cut blocks (tile 7)."""
    q, k, v = inputs(length, heads, kv_heads)
    docs = torch.stack([torch.zeros(length, dtype=torch.long),
                        (torch.arange(length) >= length // 3 + 1).long()])  # fmt: skip
    position_ids = doc_positions(docs)
    core = make_core(BLOCK, TOP_K, heads=heads, kv_heads=kv_heads, tile=7).eval()
    out = core(q, k, v, context(docs, position_ids))
    ref, widest = reference_retrieval(q, k, v, docs, position_ids, BLOCK, TOP_K)
    torch.testing.assert_close(out, ref, **FP64)
    assert widest < (TOP_K + 2) * (BLOCK + 1)


def test_original_positions_differ_beyond_k_blocks():
    """The two schemes agree while a document has at most k earlier blocks and differ after:
    ``original`` keeps RoPE angles the reference never uses at these lengths."""
    length = 47
    q, k, v = inputs(length, 4, 2)
    docs = torch.zeros(2, length, dtype=torch.long)
    position_ids = doc_positions(docs)
    reference = make_core(BLOCK, TOP_K).eval()(q, k, v, context(docs, position_ids))
    original = make_core(BLOCK, TOP_K, "original").eval()(q, k, v, context(docs, position_ids))
    near = (TOP_K + 1) * (BLOCK + 1)  # queries in blocks 0 .. k: every earlier block retrieved
    torch.testing.assert_close(reference[:, :, :near], original[:, :, :near], **FP64)
    assert (reference[:, :, near:] - original[:, :, near:]).abs().amax() > 1e-3


def test_k_covering_every_block_equals_training():
    """With k >= the blocks of every document, the reference retrieves every earlier block and
    puts block i of the slots back at block i: every key at its own position, so inference
    equals training (the grouped softmax over all earlier blocks) exactly."""
    length = 47
    q, k, v = inputs(length, 4, 2)
    docs = torch.stack([torch.zeros(length, dtype=torch.long),
                        (torch.arange(length) >= 20).long()])  # fmt: skip
    ctx = context(docs, doc_positions(docs))
    trained = make_core(BLOCK, 12).train()(q, k, v, ctx)
    # k = 11: one less than the 12 blocks, so the retrieval path runs, yet no document has
    # more than 11 earlier blocks
    retrieved = make_core(BLOCK, 11).eval()(q, k, v, ctx)
    torch.testing.assert_close(retrieved, trained, **FP64)


def test_training_through_the_model_is_bit_identical_to_the_model_rotating():
    """The core rotates q, k itself (``applies_rope_itself``) with the model's tables: logits
    and gradients of a training step are bit-identical to the model rotating them as before,
    and so is ``original`` retrieval in eval."""
    config = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    ids = torch.randint(0, 63, (2, 40), generator=torch.Generator().manual_seed(1))
    results = []
    for itself, positions in ((True, "reference"), (False, "original"), (True, "original")):
        attention = make_core(BLOCK, TOP_K, positions).config
        torch.manual_seed(0)
        model = Transformer(config, attention=attention)
        for layer in model.layers:
            layer.self_attn.core.applies_rope_itself = itself  # instance override: old path
        logits = model(ids)
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        with torch.no_grad():
            evaluated = model.eval()(ids)
        results.append((logits.detach(), grads, evaluated))
    (logits, grads, reference_eval), old, original = results
    for new in (old, original):
        assert torch.equal(new[0], logits)
        assert all(torch.equal(a, b) for a, b in zip(new[1], grads))
    assert torch.equal(original[2], old[2])  # original retrieval: unchanged
    assert not torch.equal(reference_eval, old[2])  # 40 tokens > (k + 1) G: positions moved


def test_reference_positions_refuse_rotated_keys_in_eval_only():
    """Without ``ctx.rotary`` (a caller that rotated q, k although the core
    ``applies_rope_itself``; the model and the sequence-parallel wrappers never do)
    ``reference`` retrieval is refused in one line in eval; training and ``original``
    retrieval run; without RoPE there is nothing to re-position."""
    length = 30
    q, k, v = inputs(length, 4, 2)
    docs = torch.zeros(2, length, dtype=torch.long)
    ctx = context(docs, doc_positions(docs), rotary=False)
    core = make_core(BLOCK, TOP_K)
    core.train()(q, k, v, ctx)
    with pytest.raises(LongctxError, match="retrieval_positions: original") as info:
        core.eval()(q, k, v, ctx)
    assert "\n" not in str(info.value)
    make_core(BLOCK, TOP_K, "original").eval()(q, k, v, ctx)
    nope = make_core(BLOCK, TOP_K)
    nope.positional = PositionalConfig(kind="none")
    torch.testing.assert_close(
        nope.eval()(q, k, v, ctx), make_core(BLOCK, TOP_K, "original").eval()(q, k, v, ctx)
    )


def _key_gather_context(docs, position_ids, rows, key_rotary=True):
    """What key gather hands the core: the queries ``rows`` (with their own rotary tables)
    against every key, the key side (and the keys' tables) in ``ctx.key_*``."""
    length = docs.shape[1]
    cos, sin = tables(position_ids)
    return AttentionContext(
        position_ids=position_ids[:, rows], seq_positions=rows, doc_ids=docs[:, rows],
        key_seq_positions=torch.arange(length), key_doc_ids=docs,
        rotary=(cos[:, rows], sin[:, rows]), key_rotary=(cos, sin) if key_rotary else None,
    )  # fmt: skip


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gathered_keys_with_their_tables_give_the_rows_of_the_full_output(training):
    """Key gather: a zigzag query subset (ring 4, rank 1) rotated with ``ctx.rotary`` against
    every key rotated with ``ctx.key_rotary`` equals those rows of the whole sequence's output,
    with ``reference`` retrieval moving blocks (47 tokens, 12 blocks, k = 2) and in training."""
    length = 47
    q, k, v = inputs(length, 4, 2)
    docs = torch.stack([torch.zeros(length, dtype=torch.long),
                        (torch.arange(length) >= 20).long()])  # fmt: skip
    position_ids = doc_positions(docs)
    core = make_core(BLOCK, TOP_K, tile=5).train(training)
    full = core(q, k, v, context(docs, position_ids))
    rows = torch.cat([torch.arange(6, 12), torch.arange(36, 42)])  # ring 4's zigzag rank 1
    ctx = _key_gather_context(docs, position_ids, rows)
    torch.testing.assert_close(core(q[:, :, rows], k, v, ctx), full[:, :, rows], **FP64)


def test_gathered_keys_without_their_tables_are_refused_in_one_line():
    length = 30
    q, k, v = inputs(length, 4, 2)
    docs = torch.zeros(2, length, dtype=torch.long)
    rows = torch.arange(10, 20)
    ctx = _key_gather_context(docs, doc_positions(docs), rows, key_rotary=False)
    with pytest.raises(LongctxError, match="ctx.key_rotary") as info:
        make_core(BLOCK, TOP_K)(q[:, :, rows], k, v, ctx)
    assert "\n" not in str(info.value)
