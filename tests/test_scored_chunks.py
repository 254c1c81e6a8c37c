"""The query-chunked scored kernel gives each chunk only the run of keys it can see: the run
holds every visible key under any mask (causal, window, documents, keys out of order), the
chunks do less work, and the result still equals the per-query float64 reference."""

from __future__ import annotations

import pytest
import torch
from positional_reference import cope_row, expand_kv, per_query_attention

from longctx.attention.mask import MaskSpec
from longctx.attention.scored import scored_attention, visible_key_ranges
from longctx.positional.config import CoPEConfig
from longctx.positional.cope import CoPEScore

B, HQ, HKV, D = 2, 4, 2, 8


def _random_doc_ids(length: int, gen: torch.Generator) -> torch.Tensor:
    """[B, length] sorted doc ids with random boundaries (a packed batch)."""
    starts = torch.rand(B, length, generator=gen) < 0.15
    return starts.long().cumsum(dim=1)


@pytest.mark.parametrize("window", [None, 13])
@pytest.mark.parametrize("shuffled_keys", [False, True])
def test_runs_hold_every_visible_key(window, shuffled_keys):
    gen = torch.Generator().manual_seed(0)
    length, chunk = 70, 8
    docs = _random_doc_ids(length, gen)
    k_positions = torch.randperm(length, generator=gen) if shuffled_keys else torch.arange(length)
    mask = MaskSpec(
        k_positions=k_positions, q_doc_ids=docs, k_doc_ids=docs[:, k_positions], window=window
    ).bind(length, length)
    visible = mask.dense_mask().any(dim=0)  # [Tq, Tk]
    ranges = visible_key_ranges(mask, chunk)
    assert len(ranges) == -(-length // chunk)
    for index, keys in enumerate(ranges):
        seen = visible[index * chunk : (index + 1) * chunk].any(dim=0)
        if keys is None:
            assert not seen.any()
            continue
        assert keys.start % chunk == 0 and (keys.stop % chunk == 0 or keys.stop == length)
        outside = torch.ones(length, dtype=torch.bool)
        outside[keys] = False
        assert not (seen & outside).any(), f"chunk {index} sees a key outside {keys}"


def test_causal_runs_end_at_the_chunk_and_a_window_cuts_the_start():
    mask = MaskSpec(window=20).bind(64, 64)
    starts_stops = [(r.start, r.stop) for r in visible_key_ranges(mask, 16)]
    # chunk 2 (queries 32..47) sees keys 13..47: key tiles 0..2; chunk 3 sees 29..63: tiles 1..3
    assert starts_stops == [(0, 16), (0, 32), (0, 48), (16, 64)]


class _KeyCountingCoPE(CoPEScore):
    """CoPE that records how many keys each call of ``scores`` gets."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_counts: list[int] = []

    def scores(self, q, k, *args, **kwargs):
        self.key_counts.append(k.shape[2])
        return super().scores(q, k, *args, **kwargs)


@pytest.mark.parametrize("shuffled_keys", [False, True])
def test_cope_chunks_see_their_run_and_match_the_reference(shuffled_keys):
    """CoPE's gate sums read a whole row, so a run that dropped a visible key would show; keys
    out of order (as Ulysses hands them) must give the same output and gradients."""
    gen = torch.Generator().manual_seed(1)
    length, chunk, npos_max = 48, 16, 12
    q = torch.randn(B, HQ, length, D, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(B, HKV, length, D, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(B, HKV, length, D, generator=gen, dtype=torch.float64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    score = _KeyCountingCoPE(CoPEConfig(npos_max=npos_max), num_heads=HQ, head_dim=D).double()
    with torch.no_grad():
        score.pos_emb.normal_(generator=gen)
    order = torch.randperm(length, generator=gen) if shuffled_keys else torch.arange(length)
    mask = MaskSpec(k_positions=order)
    out = scored_attention(q, k[:, :, order], v[:, :, order], score, mask=mask, chunk_size=chunk)
    if not shuffled_keys:  # the forward's three chunks (the backward's recomputation follows)
        assert score.key_counts[:3] == [16, 32, 48]
    ref = per_query_attention(
        expand_kv(v, HQ),
        cope_row(q, expand_kv(k, HQ), score.pos_emb, npos_max),
        heads=HQ,
        positions=list(range(length)),
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    inputs = (q, k, v, score.pos_emb)
    for grad, want in zip(
        torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout)
    ):
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
