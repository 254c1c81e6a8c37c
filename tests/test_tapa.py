"""TAPA (SPECS 2.4): the score on hand-made vectors, and the chunked kernel against a per-query
float64 reference in outputs and gradients."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hf_fixtures import random_tokens, save_tiny_hf
from positional_reference import expand_kv, per_query_attention, tapa_row

from longctx.attention.mask import MaskSpec
from longctx.attention.scored import scored_attention
from longctx.errors import LongctxError
from longctx.model.hf_io import load_hf, new_parameter_names, save_hf
from longctx.positional.config import PositionalConfig, TAPAConfig
from longctx.positional.tapa import TAPAScore, amplitude_dims, tapa_logits

B, HQ, HKV, T, D = 2, 4, 1, 9, 8


def test_hand_vectors():
    """D = 4, theta 0.5: qA.kA = 1*2 + 2*0.5 = 3, qP.kP = 1*0.5 + 0*1 = 0.5, distance 16,
    alpha 0.5: s = 3/sqrt(2) * cos(2 pi * 4 * 0.5/sqrt(2))."""
    q = torch.tensor([1.0, 2.0, 1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 4)
    k = torch.tensor([2.0, 0.5, 0.5, 1.0], dtype=torch.float64).view(1, 1, 1, 4)
    s = tapa_logits(q, k, torch.tensor([[16]]), amplitude=2, alpha=0.5)
    expected = 3 / math.sqrt(2) * math.cos(2 * math.pi * 4 * 0.5 / math.sqrt(2))
    assert s.item() == pytest.approx(expected, rel=1e-12)


def test_distance_zero_gives_the_amplitude_alone():
    q = torch.tensor([0.5, -1.0, 3.0, 2.0], dtype=torch.float64).view(1, 1, 1, 4)
    s = tapa_logits(q, q, torch.tensor([[0]]), amplitude=2, alpha=0.1)
    assert s.item() == pytest.approx((0.25 + 1.0) / math.sqrt(2), rel=1e-12)


def test_theta_that_empties_a_part_is_rejected():
    with pytest.raises(LongctxError, match="amplitude"):
        amplitude_dims(4, 0.05)


def _inputs(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, T, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HKV, T, D, generator=gen, dtype=torch.float64)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


@pytest.mark.parametrize("theta, alpha", [(0.5, 0.1), (0.25, 0.6)])
def test_outputs_and_grads_equal_per_query_reference(theta, alpha):
    q, k, v = _inputs(torch.float64)
    score = TAPAScore(TAPAConfig(theta=theta, alpha=alpha), head_dim=D)
    doc_ids = torch.tensor([[0] * 5 + [1] * 4, [0] * 9])
    mask = MaskSpec(q_doc_ids=doc_ids, k_doc_ids=doc_ids, window=7)
    out = scored_attention(q, k, v, score, mask=mask, chunk_size=4)
    ref = per_query_attention(
        expand_kv(v, HQ),
        tapa_row(q, expand_kv(k, HQ), list(range(T)), theta, alpha),
        heads=HQ,
        positions=list(range(T)),
        doc_ids=doc_ids,
        window=7,
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for grad, ref_grad in zip(
        torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)
    ):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64_reference():
    q, k, v = _inputs(torch.float32, seed=1)
    score = TAPAScore(TAPAConfig(), head_dim=D)
    out = scored_attention(q, k, v, score, mask=MaskSpec(), chunk_size=2)
    ref = per_query_attention(
        expand_kv(v, HQ).double(),
        tapa_row(q.double(), expand_kv(k, HQ).double(), list(range(T)), 0.5, 0.1),
        heads=HQ,
        positions=list(range(T)),
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_rope_checkpoint_loads_as_tapa_without_new_parameters(tmp_path, caplog):
    """Our conversion: q/k projections reused as they are, read through the amplitude/phase
    split; nothing is new, nothing is logged, and the export records the encoding."""
    directory, hf_model = save_tiny_hf(tmp_path / "hf", "llama")
    positional = PositionalConfig(kind="tapa", tapa=TAPAConfig(theta=0.25, alpha=0.2))
    with caplog.at_level(logging.WARNING, logger="longctx.model.hf_io"):
        model, config = load_hf(directory, positional=positional)
    assert new_parameter_names(model) == [] and "initialised" not in caplog.text
    assert model.rotary is None
    torch.testing.assert_close(
        model.layers[0].self_attn.k_proj.weight, hf_model.model.layers[0].self_attn.k_proj.weight
    )
    save_hf(model, config, tmp_path / "export")
    loaded, _ = load_hf(tmp_path / "export")
    assert loaded.positional == positional
    ids = random_tokens(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-6, atol=1e-6)
