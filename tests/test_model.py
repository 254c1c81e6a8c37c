"""The Llama-family decoder on its own: GQA, positions, packed documents, windows, init.

Parity with transformers (the full reference) is in test_hf_io.py; these tests pin behaviours
transformers cannot check directly. Models are tiny and fp32, with initializer_range 0.2 so
attention is far from uniform and a broken mask or rotation moves the logits visibly.
Tolerance: 1e-5 absolute where two paths compute the same fp32 math in a different order.
"""

from __future__ import annotations

import pytest
import torch

from longctx.attention.config import AttentionConfig
from longctx.errors import LongctxError
from longctx.model import ModelConfig, Transformer
from longctx.model.transformer import RMSNorm
from longctx.positional.config import PositionalConfig

ATOL = 1e-5
VOCAB = 97


def tiny_config(**overrides) -> ModelConfig:
    fields = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.2,
        **overrides,
    }
    return ModelConfig(**fields)


def tiny_model(seed: int = 0, positional: PositionalConfig | None = None, **overrides):
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides), positional).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def test_gqa_equals_mha_with_each_kv_head_repeated_for_its_query_group():
    gqa = tiny_model(num_attention_heads=4, num_key_value_heads=2)
    mha = tiny_model(num_attention_heads=4, num_key_value_heads=4)
    state = gqa.state_dict()
    head_dim, group = 16, 2
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            key = f"layers.{i}.self_attn.{proj}.weight"
            per_head = state[key].view(2, head_dim, 64)  # [Hkv, D, d]
            # kv head j serves query heads j*group .. (j+1)*group - 1 (transformers' repeat_kv)
            state[key] = per_head.repeat_interleave(group, dim=0).reshape(4 * head_dim, 64)
    mha.load_state_dict(state)
    input_ids = tokens(2, 48)
    with torch.no_grad():
        assert torch.allclose(gqa(input_ids), mha(input_ids), atol=ATOL, rtol=0)


def test_default_position_ids_and_seq_positions_are_arange():
    model = tiny_model()
    input_ids = tokens(2, 40)
    positions = torch.arange(40).expand(2, 40)
    with torch.no_grad():
        explicit = model(input_ids, positions, seq_positions=torch.arange(40))
        assert torch.equal(model(input_ids), explicit)


def test_shifting_every_position_by_a_constant_leaves_logits_unchanged():
    """RoPE scores depend only on position differences, so a window of a long sequence seen
    with global positions (offset 300) gives the logits of the same tokens at 0..T-1.
    Tolerance 1e-4: fp32 angles near 300 rad carry ~3e-5 rad of rounding."""
    model = tiny_model()
    input_ids = tokens(2, 64)
    positions = torch.arange(64).expand(2, 64)
    with torch.no_grad():
        shifted = model(input_ids, positions + 300)
        assert torch.allclose(shifted, model(input_ids, positions), atol=1e-4, rtol=0)


def test_position_ids_reach_the_rotation():
    model = tiny_model()
    input_ids = tokens(1, 64)
    with torch.no_grad():
        stretched = model(input_ids, torch.arange(64)[None] * 3)
        assert (stretched - model(input_ids)).abs().max() > 1e-2


def test_packed_documents_do_not_see_each_other():
    """Doc 2 in a packed row, with positions restarting at its start, gives the logits of doc
    2 run alone."""
    model = tiny_model()
    lengths = [23, 37, 20]
    input_ids = tokens(1, sum(lengths))
    doc_ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]  # [1, T]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, T]
    start, end = lengths[0], lengths[0] + lengths[1]
    with torch.no_grad():
        packed = model(input_ids, positions, doc_ids=doc_ids)
        alone = model(input_ids[:, start:end])
    assert torch.allclose(packed[:, start:end], alone, atol=ATOL, rtol=0)


def test_logits_are_causal():
    model = tiny_model()
    input_ids = tokens(1, 50)
    changed = input_ids.clone()
    changed[0, 30] = (changed[0, 30] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(input_ids), model(changed)
    assert torch.equal(before[:, :30], after[:, :30])
    assert (before[:, 30:] - after[:, 30:]).abs().max() > 1e-2


def test_nope_ignores_position_ids():
    model = tiny_model(positional=PositionalConfig(kind="none"))
    input_ids = tokens(1, 40)
    scrambled = torch.randperm(40, generator=torch.Generator().manual_seed(3))[None]
    assert model.rotary is None
    with torch.no_grad():
        assert torch.equal(model(input_ids, scrambled), model(input_ids))


@pytest.mark.parametrize(("max_window_layers", "sees_far_token"), [(None, False), (1, True)])
def test_sliding_window_bounds_what_the_last_token_sees(max_window_layers, sees_far_token):
    """One layer with window 8: the last of 40 tokens sees tokens 32..39 only, unless the layer
    is below Qwen2's max_window_layers (then it attends to the whole past)."""
    model = tiny_model(num_hidden_layers=1, sliding_window=8, max_window_layers=max_window_layers)
    input_ids = tokens(1, 40)
    far, near = input_ids.clone(), input_ids.clone()
    far[0, 31] = (far[0, 31] + 1) % VOCAB  # just outside the window of token 39
    near[0, 32] = (near[0, 32] + 1) % VOCAB  # the oldest token inside it
    with torch.no_grad():
        last = model(input_ids)[0, -1]
        far_moves = (model(far)[0, -1] - last).abs().max() > 1e-3
        near_moves = (model(near)[0, -1] - last).abs().max() > 1e-3
    assert near_moves and far_moves == sees_far_token


def test_forward_is_lm_head_of_forward_hidden():
    model = tiny_model()
    input_ids = tokens(2, 32)
    with torch.no_grad():
        hidden = model.forward_hidden(input_ids)
        assert hidden.shape == (2, 32, 64)
        assert torch.equal(model.lm_head(hidden), model(input_ids))


def test_every_parameter_gets_a_gradient():
    model = tiny_model(attention_bias=True)
    input_ids = tokens(2, 32)
    model(input_ids).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_init_draws_weights_from_normal_initializer_range_and_sets_norms_to_one():
    torch.manual_seed(0)
    model = Transformer(tiny_config(initializer_range=0.02, attention_bias=True))
    q_proj = model.layers[0].self_attn.q_proj
    weights = torch.cat([model.embed_tokens.weight.flatten(), model.lm_head.weight.flatten()])
    # 12k draws: the sample std is within 3% of 0.02 with overwhelming probability.
    assert abs(weights.std().item() - 0.02) < 0.02 * 0.03
    assert abs(q_proj.weight.std().item() - 0.02) < 0.02 * 0.05
    assert torch.equal(q_proj.bias, torch.zeros_like(q_proj.bias))
    assert torch.equal(model.norm.weight, torch.ones(64))
    assert torch.equal(model.layers[1].input_layernorm.weight, torch.ones(64))


@pytest.mark.parametrize("tied", [False, True])
def test_num_parameters_matches_the_llama_formula(tied):
    model = tiny_model(tie_word_embeddings=tied, attention_bias=True)
    d, inter, vocab, kv_dim = 64, 96, VOCAB, 2 * 16
    attention = d * d * 2 + d * kv_dim * 2 + (d + 2 * kv_dim)  # q, o; k, v; q/k/v biases
    layer = attention + 3 * d * inter + 2 * d  # + SwiGLU + two norms
    expected = 2 * layer + d + vocab * d * (1 if tied else 2)
    assert model.num_parameters() == expected == model.config.num_parameters()


def test_tied_lm_head_is_the_embedding():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_position_ids_of_the_wrong_shape_are_a_clear_error():
    model = tiny_model()
    with pytest.raises(LongctxError, match=r"position_ids has shape \(1, 10\) .* \(2, 10\)"):
        model(tokens(2, 10), torch.arange(10)[None])


def test_attention_backend_is_a_swap_of_the_core_only():
    """The reference (float64) backend and the default one give the same logits: the model
    passes q, k, v and the context through the core unchanged."""
    torch.manual_seed(0)
    config = tiny_config()
    default = Transformer(config).eval()
    reference = Transformer(config, attention=AttentionConfig(backend="reference")).eval()
    reference.load_state_dict(default.state_dict())
    input_ids = tokens(1, 40)
    with torch.no_grad():
        assert torch.allclose(default(input_ids), reference(input_ids), atol=ATOL, rtol=0)


def test_rms_norm_values_and_gradients_equal_autograd_of_the_formula():
    """RMSNorm's written-out backward equals autograd through the formula in float64, and
    its bf16 output equals transformers' LlamaRMSNorm (float32 statistic, cast, then gain)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 7, 64, generator=gen, dtype=torch.float64) * 3
    gain = 1 + 0.1 * torch.randn(64, generator=gen, dtype=torch.float64)
    upstream = torch.randn(2, 7, 64, generator=gen, dtype=torch.float64)
    norm = RMSNorm(64, 1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(gain)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    gain_ref = gain.clone().requires_grad_()
    out = norm(x_ours)
    reference = gain_ref * x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + 1e-5)
    out.backward(upstream)
    reference.backward(upstream)
    for ours, expected in ((out, reference), (x_ours.grad, x_ref.grad),
                           (norm.weight.grad, gain_ref.grad)):  # fmt: skip
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    hf_norm = LlamaRMSNorm(64, eps=1e-5).bfloat16()
    hf_norm.weight.data.copy_(gain)
    with torch.no_grad():
        torch.testing.assert_close(
            norm.bfloat16()(x.bfloat16()), hf_norm(x.bfloat16()), rtol=2**-7, atol=0
        )  # one bf16 ulp
