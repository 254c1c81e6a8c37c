"""CoPE (SPECS 2.2): hand values, and the chunked kernel against a per-query float64 reference
in outputs and gradients (fp64 to 1e-10: same equation, different summation order; fp32 to
rtol 1e-5 as every exact fp32 algorithm here)."""

from __future__ import annotations

import logging

import pytest
import torch
from hf_fixtures import random_tokens, save_tiny_hf
from positional_reference import cope_row, expand_kv, per_query_attention

from longctx.attention.config import AttentionConfig
from longctx.attention.kernels import block_attention
from longctx.attention.mask import MaskSpec
from longctx.attention.scored import scored_attention
from longctx.model.config import ModelConfig
from longctx.model.hf_io import load_hf, new_parameter_names, save_hf
from longctx.model.transformer import Transformer
from longctx.positional.config import CoPEConfig, PositionalConfig
from longctx.positional.cope import CoPEScore, cope_positions

B, HQ, HKV, T, D = 2, 4, 2, 11, 8


def _inputs(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(B, HKV, T, D, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(B, HKV, T, D, generator=gen, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 6 + [1] * 5, [0] * 11])
    return [x.to(dtype).requires_grad_() for x in (q, k, v)], doc_ids


def _cope(npos_max: int, shared: bool, dtype: torch.dtype) -> CoPEScore:
    score = CoPEScore(CoPEConfig(npos_max=npos_max, shared_heads=shared), num_heads=HQ, head_dim=D)
    with torch.no_grad():
        score.pos_emb.copy_(
            torch.randn(score.pos_emb.shape, generator=torch.Generator().manual_seed(3))
        )
    return score.to(dtype)


def test_hand_value_positions_of_half_gates():
    """All gates 0.5, query i = 2: p = [1.5, 1.0, 0.5] for keys 0, 1, 2 (later keys gate 0)."""
    gates = torch.tensor([0.5, 0.5, 0.5, 0.0])
    torch.testing.assert_close(cope_positions(gates, 64), torch.tensor([1.5, 1.0, 0.5, 0.0]))


def test_positions_clamp_at_npos_max_minus_one():
    gates = torch.full((6,), 0.9)
    assert cope_positions(gates, 3).max().item() == 2.0


@pytest.mark.parametrize("npos_max, shared", [(4, True), (16, False)])
def test_outputs_and_grads_equal_per_query_reference(npos_max, shared):
    (q, k, v), doc_ids = _inputs(torch.float64)
    score = _cope(npos_max, shared, torch.float64)
    mask = MaskSpec(q_doc_ids=doc_ids, k_doc_ids=doc_ids, window=9)
    out = scored_attention(q, k, v, score, mask=mask, chunk_size=4)
    ref = per_query_attention(
        expand_kv(v, HQ),
        cope_row(q, expand_kv(k, HQ), score.pos_emb, npos_max),
        heads=HQ,
        positions=list(range(T)),
        doc_ids=doc_ids,
        window=9,
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    inputs = (q, k, v, score.pos_emb)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_grads = torch.autograd.grad(ref, inputs, dout)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64_reference():
    (q, k, v), doc_ids = _inputs(torch.float32, seed=1)
    score = _cope(8, True, torch.float32)
    mask = MaskSpec(q_doc_ids=doc_ids, k_doc_ids=doc_ids)
    out = scored_attention(q, k, v, score, mask=mask, chunk_size=3)
    ref = per_query_attention(
        expand_kv(v, HQ).double(),
        cope_row(q.double(), expand_kv(k, HQ).double(), score.pos_emb.double(), 8),
        heads=HQ,
        positions=list(range(T)),
        doc_ids=doc_ids,
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_zero_embeddings_equal_plain_causal_attention():
    """SPECS init (e = 0): a fresh CoPE layer is attention without position encoding."""
    (q, k, v), _ = _inputs(torch.float64, seed=2)
    score = CoPEScore(CoPEConfig(), num_heads=HQ, head_dim=D).double()
    out = scored_attention(q, k, v, score, mask=MaskSpec(), chunk_size=5)
    ref, _ = block_attention(q, k, v, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_model_with_cope_has_one_table_per_layer_and_trains():
    config = ModelConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Transformer(config, PositionalConfig(kind="cope"), AttentionConfig(chunk_size=8))
    tables = [n for n, _ in model.named_parameters() if n.endswith("pos_emb")]
    assert len(tables) == 2 and model.rotary is None
    ids = torch.randint(0, 32, (2, 20), generator=torch.Generator().manual_seed(0))
    model(ids).float().pow(2).mean().backward()
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in tables)


def test_rope_checkpoint_loads_with_zero_tables_listed_as_new(tmp_path, caplog):
    """New CoPE tables start at 0 (SPECS), are logged, and so the loaded model equals the same
    checkpoint loaded without position encoding (NoPE)."""
    directory, _ = save_tiny_hf(tmp_path / "hf", "llama")
    with caplog.at_level(logging.WARNING, logger="longctx.model.hf_io"):
        model, _ = load_hf(directory, positional=PositionalConfig(kind="cope"))
    names = new_parameter_names(model)
    assert names == [f"model.layers.{i}.self_attn.core.score.pos_emb" for i in range(2)]
    assert all(name in caplog.text for name in names)
    assert all(model.get_parameter(n.removeprefix("model.")).abs().sum() == 0 for n in names)
    nope, _ = load_hf(directory, positional=PositionalConfig(kind="none"))
    ids = random_tokens(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), nope(ids), rtol=1e-5, atol=1e-5)


def test_exported_cope_model_loads_back_as_cope(tmp_path):
    config = ModelConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    positional = PositionalConfig(kind="cope", cope=CoPEConfig(npos_max=12, shared_heads=False))
    model = Transformer(config, positional, AttentionConfig(chunk_size=8))
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.core.score.pos_emb.normal_(generator=torch.Generator().manual_seed(1))
    save_hf(model, config, tmp_path / "export")
    loaded, _ = load_hf(tmp_path / "export")
    assert loaded.positional == positional
    ids = random_tokens(1, 30, vocab=40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-6, atol=1e-6)
