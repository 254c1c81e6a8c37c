"""Landmark attention (SPECS 3.4): data transform, grouped softmax, top-k retrieval.

The independent reference is a float64 loop over queries that follows the SPECS definition
literally: lists of visible tokens and landmarks, a top-level softmax, one softmax per block.
"""

from __future__ import annotations

import math

import pytest
import torch

from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.landmark import (
    IGNORE_INDEX,
    LandmarkAttention,
    insert_landmarks,
    regular_slots,
)
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.positional.config import PositionalConfig

RTOL = 1e-5


def _core(
    block_size: int, top_k: int = 4, chunk_size: int | None = None, positions: str = "original"
) -> LandmarkAttention:
    """These tests hand the core rotated (here: random) q, k with no ``ctx.rotary``, so eval
    retrieval keeps the keys' own positions (``original``); ``test_landmark_retrieval.py``
    tests the ``reference`` positions."""
    config = AttentionConfig(
        variant="landmark",
        chunk_size=chunk_size,
        landmark={
            "block_size": block_size,
            "retrieve_top_k": top_k,
            "retrieval_positions": positions,
        },
    )
    return LandmarkAttention(
        ModelConfig(vocab_size=64).attention_shape(0), config, PositionalConfig()
    )


def _ctx(length: int, doc_ids: torch.Tensor | None = None) -> AttentionContext:
    return AttentionContext(
        position_ids=torch.arange(length)[None], seq_positions=torch.arange(length), doc_ids=doc_ids
    )


def reference_landmark(q, k, v, block_size, doc_ids=None, blocks_for=None):
    """float64 per-query grouped softmax. ``blocks_for(b, h, i)`` -> the earlier blocks a query
    may use (default: all). q [B, H, T, D], k/v [B, Hkv, T, D] -> out [B, H, T, D]."""
    group = block_size + 1
    batch, heads, length, dim = q.shape
    per_kv = heads // k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        docs = [0] * length if doc_ids is None else doc_ids[b].tolist()
        for h in range(heads):
            kh, vh = k[b, h // per_kv], v[b, h // per_kv]
            for i in range(length):
                logits = kh @ q[b, h, i] / math.sqrt(dim)  # [T] float64
                own = i // group
                regular = [j for j in range(length) if j % group != block_size]
                seen = [j for j in regular if j <= i and docs[j] == docs[i]]
                own_tokens = [j for j in seen if j // group == own]
                allowed = range(own) if blocks_for is None else blocks_for(b, h, i)
                landmarks = []
                for block in allowed:
                    lm = block * group + block_size
                    members = [j for j in seen if j // group == block]
                    if lm < length and docs[lm] == docs[i] and members:
                        landmarks.append((lm, members))
                top_keys = own_tokens + [lm for lm, _ in landmarks]
                if not top_keys:
                    continue
                top = logits[top_keys].softmax(0)
                for weight, j in zip(top[: len(own_tokens)], own_tokens):
                    out[b, h, i] += weight * vh[j]
                for weight, (_, members) in zip(top[len(own_tokens) :], landmarks):
                    for share, j in zip(logits[members].softmax(0), members):
                        out[b, h, i] += weight * share * vh[j]
    return out


def _random_qkv(seed: int, heads=4, kv_heads=2, length=23, dim=8, batch=2):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen)
    return q, k, v


def test_spec_hand_weights():
    """Keys [t0, t1, L0, t2], query t2, logits (0, ln 3, 0, 0) -> weights (.125, .375, 0, .5)."""
    dim = 4
    q = torch.zeros(1, 1, 4, dim, dtype=torch.float64)
    q[0, 0, 3, 0] = 1.0
    k = torch.zeros(1, 1, 4, dim, dtype=torch.float64)
    k[0, 0, 1, 0] = math.log(3) * math.sqrt(dim)  # scaled logit of t1 = ln 3
    v = torch.eye(4, dtype=torch.float64)[None, None]  # out row = the weights
    core = _core(block_size=2).train()
    out = core(q, k, v, _ctx(4))
    torch.testing.assert_close(
        out[0, 0, 3], torch.tensor([0.125, 0.375, 0.0, 0.5], dtype=torch.float64)
    )


def test_training_matches_reference_out_and_grads():
    q, k, v = _random_qkv(0)
    docs = torch.tensor([[0] * 23, [0] * 9 + [1] * 14])
    core = _core(block_size=3, chunk_size=5).train()
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = core(*inputs, _ctx(23, docs))
    ref_inputs = [t.double().clone().requires_grad_() for t in (q, k, v)]
    ref = reference_landmark(*ref_inputs, block_size=3, doc_ids=docs)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    for fast, slow in zip(inputs, ref_inputs):
        torch.testing.assert_close(fast.grad.double(), slow.grad, rtol=RTOL, atol=1e-6)


def test_one_block_equals_dense_causal():
    """With no landmark in range the grouped softmax is plain causal attention."""
    q, k, v = _random_qkv(1, length=12)
    out = _core(block_size=50).train()(q, k, v, _ctx(12))
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    dense = scores.softmax(-1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, dense, rtol=RTOL, atol=1e-6)


def test_retrieval_matches_reference_with_top_k_blocks():
    """Eval mode: per query and head, only the top-k landmark logits' blocks take part."""
    q, k, v = _random_qkv(2, length=31)
    block_size, top_k, group = 3, 2, 4
    core = _core(block_size=block_size, top_k=top_k, chunk_size=7).eval()
    out = core(q, k, v, _ctx(31))

    def blocks_for(b, h, i):
        earlier = i // group
        kh = k[b, h // 2].double()
        logits = [float(q[b, h, i].double() @ kh[n * group + block_size]) for n in range(earlier)]
        return sorted(range(earlier), key=lambda n: -logits[n])[:top_k]

    ref = reference_landmark(q, k, v, block_size, blocks_for=blocks_for)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=1e-6)


def test_retrieval_with_k_covering_all_blocks_equals_training():
    q, k, v = _random_qkv(3, length=26)
    trained = _core(block_size=4, top_k=100).train()(q, k, v, _ctx(26))
    retrieved = _core(block_size=4, top_k=100).eval()(q, k, v, _ctx(26))
    torch.testing.assert_close(retrieved, trained, rtol=RTOL, atol=1e-6)


def test_retrieval_picks_the_block_whose_landmark_matches_the_query():
    """A passkey-like probe: the query aligns with one block's landmark key; with k = 1 the
    output is that block's values, not those of the other blocks."""
    block_size, group, blocks, dim = 4, 5, 8, 16
    length = blocks * group + 1  # the query is the first token of block 8
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(1, 1, length, dim, generator=gen) * 0.1
    v = torch.randn(1, 1, length, dim, generator=gen)
    target = 5
    direction = torch.randn(dim, generator=gen)
    q = torch.randn(1, 1, length, dim, generator=gen) * 0.1
    q[0, 0, -1] = direction * 3
    k[0, 0, target * group + block_size] = direction * 3  # the target block's landmark
    k[0, 0, target * group : target * group + block_size] += direction  # its tokens match too
    out = _core(block_size=block_size, top_k=1).eval()(q, k, v, _ctx(length))[0, 0, -1]

    def only(blocks_used):
        return lambda b, h, i: blocks_used

    expected = reference_landmark(q, k, v, block_size, blocks_for=only([target]))[0, 0, -1]
    torch.testing.assert_close(out.double(), expected, rtol=RTOL, atol=1e-6)
    for other in range(blocks):
        if other != target:
            wrong = reference_landmark(q, k, v, block_size, blocks_for=only([other]))[0, 0, -1]
            assert (out.double() - wrong).abs().max() > 1e-2


def test_insert_landmarks_layout_labels_positions_docs():
    input_ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16]])
    labels = torch.tensor([[11, 12, -100, 14, 15, 16, -100]])
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "doc_ids": doc_ids,
        "position_ids": position_ids,
    }
    out = insert_landmarks(batch, block_size=3, landmark_id=99)
    assert out["input_ids"].tolist() == [[10, 11, 12, 99, 13, 14, 15, 99, 16]]
    assert out["labels"].tolist() == [[11, 12, -100, IGNORE_INDEX, 14, 15, 16, -100, -100]]
    assert out["doc_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4]]


def test_a_shard_of_the_keys_is_rejected():
    """The core needs every key of the sequence: a shard (positions 8..15 of a longer sequence,
    what ring attention without key gather would hand it) fails in one line."""
    q, k, v = _random_qkv(5, length=8)
    ctx = AttentionContext(position_ids=torch.arange(8)[None], seq_positions=torch.arange(8) + 8)
    with pytest.raises(LongctxError, match="needs every key of the sequence"):
        _core(block_size=3)(q, k, v, ctx)


def test_model_with_one_block_equals_dense_model():
    """The registry wires the landmark core into the model: with blocks longer than the sequence
    the landmark model and the dense model with the same weights give the same logits."""
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
    landmark = Transformer(config, attention=_core(block_size=64).config)
    landmark.load_state_dict(dense.state_dict())
    input_ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(landmark(input_ids), dense(input_ids), rtol=RTOL, atol=1e-5)


def _tiny_model():
    """One-layer landmark decoder (block 4, top 2, vocab 64: landmark id 63) in eval mode."""
    from longctx.model.config import ModelConfig
    from longctx.model.transformer import Transformer

    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return Transformer(config, attention=_core(block_size=4, top_k=2).config).eval()


def _regular_hidden(model, input_ids):
    """[B, T, d] hidden states of the regular tokens of ``input_ids`` [B, T] with landmarks
    (block 4, id 63) inserted, read back at ``regular_slots``."""
    inserted = insert_landmarks({"input_ids": input_ids}, block_size=4, landmark_id=63)
    return model.forward_hidden(inserted["input_ids"])[:, regular_slots(input_ids.shape[1], 4)]


def test_hidden_read_back_at_regular_slots_drops_the_landmark_rows():
    """Inserting landmarks into bare ids and reading the hidden states back at
    ``regular_slots`` gives the original tokens' states: equal to running the model on the
    inserted ids (built by hand) and dropping the landmark rows."""
    model = _tiny_model()
    input_ids = torch.randint(0, 63, (1, 18), generator=torch.Generator().manual_seed(2))
    hidden = _regular_hidden(model, input_ids)
    inserted = torch.cat([input_ids.view(-1), torch.tensor([0, 0])]).view(5, 4)
    inserted = torch.cat([inserted, torch.full((5, 1), 63)], dim=1).view(1, -1)[:, :22]
    full = model.forward_hidden(inserted)  # 18 regular tokens + 4 landmarks
    keep = [i for i in range(22) if i % 5 != 4]
    assert hidden.shape == (1, 18, 32)
    torch.testing.assert_close(hidden, full[:, keep])


def test_sequence_scorer_runs_landmark_models_through_the_batch_transform():
    """The scorer feeds a sequence through the batch path with the trainer's transform: a
    landmark model is scored on the ids with landmarks inserted, each regular token's NLL and
    answer argmax read back in order (the regular tokens' hidden states, then the head)."""
    import torch.nn.functional as F

    from longctx.attention.registry import core_class
    from longctx.eval.sequence_scorer import SequenceScorer

    model = _tiny_model()
    attention, shape = model.attention, model.config.attention_shape(0)
    core = core_class(attention, model.positional)
    ids = torch.randint(0, 63, (18,), generator=torch.Generator().manual_seed(3))
    scorer = SequenceScorer(
        model, transform=lambda batch: core.transform_batch(batch, shape, attention)
    )
    with torch.no_grad():
        hidden = _regular_hidden(model, ids[None])[0]  # [18, d]
        logits = model.lm_head(hidden)  # [18, V]
    expected = F.cross_entropy(logits[:-1], ids[1:], reduction="none").double()
    torch.testing.assert_close(scorer.token_nll(ids), expected, rtol=RTOL, atol=1e-6)
    predicted, nll = scorer.answer_scores(ids, 10, 3)
    assert predicted == logits[10:13].argmax(-1).tolist()
    assert nll == pytest.approx(float(expected[10:13].sum()), rel=RTOL)
