"""BAM (SPECS 2.3): the model's core (the flash-style tiled kernel, ``attention/biased.py``) and
the query-chunked score path against a per-query float64 reference (outputs and gradients of
q, k, v and the prior's and SSMax's parameters, with and without SSMax, packed documents,
gapped positions, queries a subset of the keys), and the hand cases: shape 1 is ALiBi, shape 0
is NoPE."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hf_fixtures import random_tokens, save_tiny_hf
from positional_reference import bam_row, expand_kv, per_query_attention

from longctx.attention.biased import relative_bias_attention
from longctx.attention.config import AttentionConfig
from longctx.attention.context import AttentionContext
from longctx.attention.core import AttentionShape
from longctx.attention.kernels import block_attention
from longctx.attention.mask import MaskSpec
from longctx.attention.reference import reference_attention
from longctx.attention.scored import BAMAttention, scored_attention
from longctx.model.config import ModelConfig
from longctx.model.hf_io import load_hf, new_parameter_names, save_hf
from longctx.model.transformer import Transformer
from longctx.positional.bam import BAMScore, alibi_slopes
from longctx.positional.config import BAMConfig, PositionalConfig

B, HQ, HKV, T, D = 2, 4, 2, 10, 8


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, T, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HKV, T, D, generator=gen, dtype=torch.float64)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def _bam(ssmax: bool, dtype: torch.dtype = torch.float64, randomise: bool = True) -> BAMScore:
    score = BAMScore(BAMConfig(ssmax=ssmax), num_heads=HQ, head_dim=D, max_position_embeddings=64)
    score = score.to(dtype)
    score.init_new_parameters()  # in ``dtype``: the hand cases compare at float64 precision
    if randomise:
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            score.theta_scale.add_(torch.randn(HQ, generator=gen) * 0.3)
            score.theta_shape.copy_(torch.rand(HQ, generator=gen) * 2)
            if ssmax:
                score.ssmax_scale.copy_(0.5 + torch.rand(HQ, generator=gen))
    return score


def test_initial_parameters_are_alibi_slopes_and_shape_one():
    score = _bam(ssmax=True, randomise=False)
    expected = torch.tensor([2 ** (-8 * h / HQ) for h in range(1, HQ + 1)], dtype=torch.float64)
    torch.testing.assert_close(score.theta_scale.exp(), expected, rtol=1e-12, atol=0)
    assert score.theta_shape.tolist() == [1.0] * HQ
    torch.testing.assert_close(score.ssmax_scale, torch.full((HQ,), 1 / math.log(64)).double())


@pytest.mark.parametrize("ssmax", [False, True])
def test_outputs_and_grads_equal_per_query_reference(ssmax):
    q, k, v = _inputs()
    score = _bam(ssmax)
    seq_positions = torch.tensor([0, 1, 2, 3, 8, 9, 12, 13, 14, 20])  # gaps: distances matter
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    mask = MaskSpec(
        q_positions=seq_positions, k_positions=seq_positions, q_doc_ids=doc_ids, k_doc_ids=doc_ids
    )
    out = scored_attention(q, k, v, score, mask=mask, chunk_size=3)
    params = [score.theta_scale, score.theta_shape] + ([score.ssmax_scale] if ssmax else [])
    ref = per_query_attention(
        expand_kv(v, HQ),
        bam_row(
            q,
            expand_kv(k, HQ),
            seq_positions.tolist(),
            score.theta_scale,
            score.theta_shape,
            score.ssmax_scale,
        ),
        heads=HQ,
        positions=seq_positions.tolist(),
        doc_ids=doc_ids,
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    inputs = (q, k, v, *params)
    for grad, ref_grad in zip(
        torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout)
    ):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def _core(ssmax: bool, tile: int, dtype: torch.dtype = torch.float64) -> BAMAttention:
    """The model's BAM core with tiles of ``tile`` tokens and the randomised ``_bam`` priors."""
    shape = AttentionShape(
        num_heads=HQ, num_kv_heads=HKV, head_dim=D, hidden_size=HQ * D, vocab_size=32,
        max_position_embeddings=64,
    )  # fmt: skip
    positional = PositionalConfig(kind="bam", bam=BAMConfig(ssmax=ssmax))
    core = BAMAttention(shape, AttentionConfig(chunk_size=tile), positional).to(dtype)
    core.score.load_state_dict(_bam(ssmax, dtype).state_dict())
    return core


@pytest.mark.parametrize("tile", [3, 4, 64])
@pytest.mark.parametrize("ssmax", [False, True])
def test_tiled_core_outputs_and_grads_equal_per_query_reference(ssmax, tile):
    """Tiles of 3 and 4 mix runs of consecutive positions (the strided prior) with tiles that
    span a gap (the gathered prior) and cut documents; 64 is one tile."""
    q, k, v = _inputs(seed=6)
    core = _core(ssmax, tile)
    score = core.score
    seq_positions = torch.tensor([0, 1, 2, 3, 8, 9, 12, 13, 14, 20])
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 3 + [1] * 7])
    ctx = AttentionContext(seq_positions[None].expand(B, -1), seq_positions, doc_ids)
    out = core(q, k, v, ctx)
    ref = per_query_attention(
        expand_kv(v, HQ),
        bam_row(q, expand_kv(k, HQ), seq_positions.tolist(), score.theta_scale,
                score.theta_shape, score.ssmax_scale),
        heads=HQ, positions=seq_positions.tolist(), doc_ids=doc_ids,
    )  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    params = [score.theta_scale, score.theta_shape] + ([score.ssmax_scale] if ssmax else [])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    inputs = (q, k, v, *params)
    for grad, ref_grad in zip(
        torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout)
    ):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ssmax", [False, True])
def test_tiled_core_on_gathered_keys_equals_scored_path(ssmax):
    """Key gather (ring): the local queries are a zigzag subset, the keys the whole sequence in
    order; the tiled core equals the query-chunked score path, gradients included."""
    gen = torch.Generator().manual_seed(11)
    length, local = 16, [0, 1, 2, 3, 12, 13, 14, 15]
    q = torch.randn(B, HQ, len(local), D, generator=gen, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(B, HKV, length, D, generator=gen, dtype=torch.float64).requires_grad_()
            for _ in range(2))  # fmt: skip
    docs = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    core = _core(ssmax, tile=3)
    positions = torch.tensor(local)
    ctx = AttentionContext(
        positions[None].expand(B, -1), positions, docs[:, local],
        key_seq_positions=torch.arange(length), key_doc_ids=docs,
    )  # fmt: skip
    out = core(q, k, v, ctx)
    ref = scored_attention(q, k, v, core.score, mask=core.mask_for(ctx), chunk_size=5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    inputs = (q, k, v, *core.score.parameters())
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for grad, ref_grad in zip(
        torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout)
    ):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_tiled_kernel_rows_without_keys_give_zero_and_finite_grads():
    q, k, v = _inputs(seed=7)
    docs_q = torch.tensor([[5] * 3 + [0] * 7, [0] * 10])  # doc 5 has no keys
    docs_k = torch.tensor([[0] * 10, [0] * 10])
    mask = MaskSpec(q_doc_ids=docs_q, k_doc_ids=docs_k).bind(T, T)
    table = -torch.linspace(0, 3, 2 * T - 1, dtype=torch.float64)[None].repeat(HQ, 1)
    table.requires_grad_()
    out = relative_bias_attention(q, k, v, table, -(T - 1), mask=mask, tile=4)
    assert out[0, :, :3].abs().max() == 0 and out[0, :, 3:].abs().min() > 0
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v, table))
    assert q.grad[0, :, :3].abs().max() < 1e-300


@pytest.mark.parametrize("ssmax", [False, True])
def test_tiled_core_float32_matches_float64_reference(ssmax):
    q, k, v = _inputs(seed=8, dtype=torch.float32)
    core = _core(ssmax, tile=4, dtype=torch.float32)
    positions = torch.arange(T)
    out = core(q, k, v, AttentionContext(positions[None].expand(B, -1), positions))
    score = core.score
    ref = per_query_attention(
        expand_kv(v, HQ).double(),
        bam_row(q.double(), expand_kv(k, HQ).double(), list(range(T)), score.theta_scale,
                score.theta_shape, score.ssmax_scale),
        heads=HQ, positions=list(range(T)),
    )  # fmt: skip
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_float32_matches_float64_reference():
    q, k, v = _inputs(seed=1, dtype=torch.float32)
    score = _bam(ssmax=True, dtype=torch.float32)
    out = scored_attention(q, k, v, score, mask=MaskSpec(), chunk_size=4)
    ref = per_query_attention(
        expand_kv(v, HQ).double(),
        bam_row(
            q.double(),
            expand_kv(k, HQ).double(),
            list(range(T)),
            score.theta_scale,
            score.theta_shape,
            score.ssmax_scale,
        ),
        heads=HQ,
        positions=list(range(T)),
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_shape_one_equals_alibi():
    """theta_shape = 1: the prior is -slope_h (d + 1e-5), ALiBi up to a per-row constant."""
    q, k, v = _inputs(seed=2)
    out = scored_attention(q, k, v, _bam(ssmax=False, randomise=False), mask=MaskSpec())
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # [T, T]
    alibi = -alibi_slopes(HQ)[:, None, None] * distance  # [H, T, T]
    logits = q @ expand_kv(k, HQ).transpose(-1, -2) / math.sqrt(D) + alibi
    logits = logits.masked_fill(distance < 0, float("-inf"))
    ref = torch.softmax(logits, dim=-1) @ expand_kv(v, HQ)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_shape_zero_equals_no_position_encoding():
    q, k, v = _inputs(seed=3)
    score = _bam(ssmax=False)
    with torch.no_grad():
        score.theta_shape.zero_()
    out = scored_attention(q, k, v, score, mask=MaskSpec(), chunk_size=4)
    ref, _ = reference_attention(q, k, v, 1 / math.sqrt(D), MaskSpec().bind(T, T))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_negative_shape_is_clamped_to_no_position_encoding():
    q, k, v = _inputs(seed=4)
    score = _bam(ssmax=False)
    with torch.no_grad():
        score.theta_shape.fill_(-0.5)
    out = scored_attention(q, k, v, score, mask=MaskSpec())
    ref, _ = block_attention(q, k, v, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_rope_checkpoint_loads_with_alibi_priors_listed_as_new(tmp_path, caplog):
    directory, hf_model = save_tiny_hf(tmp_path / "hf", "llama")
    positional = PositionalConfig(kind="bam", bam=BAMConfig(ssmax=True))
    with caplog.at_level(logging.WARNING, logger="longctx.model.hf_io"):
        model, _ = load_hf(directory, positional=positional)
    new = new_parameter_names(model)
    assert len(new) == 2 * 3 and all(name in caplog.text for name in new)
    heads = hf_model.config.num_attention_heads
    for layer in model.layers:
        score = layer.self_attn.core.score
        torch.testing.assert_close(score.theta_scale.exp().double(), alibi_slopes(heads))
        assert score.theta_shape.tolist() == [1.0] * heads and score.mu.abs().sum() == 0
        torch.testing.assert_close(score.ssmax_scale, torch.full((heads,), 1 / math.log(128)))
    torch.testing.assert_close(
        model.layers[1].self_attn.q_proj.weight, hf_model.model.layers[1].self_attn.q_proj.weight
    )


def test_exported_bam_model_loads_back_with_its_priors(tmp_path):
    config = ModelConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    positional = PositionalConfig(kind="bam", bam=BAMConfig(ssmax=True))
    model = Transformer(config, positional, AttentionConfig(chunk_size=8))
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.core.score.theta_shape.uniform_(0.2, 1.8)
    save_hf(model, config, tmp_path / "export")
    loaded, _ = load_hf(tmp_path / "export")
    assert loaded.positional == positional and new_parameter_names(loaded)
    ids = random_tokens(1, 30, vocab=40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-6, atol=1e-6)
