"""RoPE and its scalings against transformers, the SPECS 2.1 golden values and RoPE's algebra.

References: ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (frequencies and attention
factor), ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb`` (cos/sin and the rotation), the
closed-form numbers of SPECS 2.1, and float64 rotations.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.positional import (
    KNOWN_ROPE_TYPES,
    RotaryEmbedding,
    apply_rotary,
    rope_frequencies,
    validate_rope_scaling,
)
from longctx.positional.rope import base_inv_freq, ntk_base, yarn_correction_range

HEAD_DIMS = (64, 80, 128)
BASES = (1e4, 5e5)
FACTORS = (2, 4, 8, 16)
ORIGINAL = 4096  # pretraining length L0 in the grid


def hf_config(scaling: dict, head_dim: int, base: float, max_pos: int) -> LlamaConfig:
    """A transformers 5 config carrying ``scaling`` as its rope_parameters (base included)."""
    return LlamaConfig(
        vocab_size=8,
        hidden_size=2 * head_dim,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters={**scaling, "rope_theta": base},
    )


def longrope_lists(head_dim: int, factor: float, seed: int) -> tuple[list[float], list[float]]:
    """Seeded per-pair short (near 1) and long (1..factor) extension factors."""
    gen = torch.Generator().manual_seed(seed)
    short = (1 + 0.1 * torch.rand(head_dim // 2, generator=gen)).tolist()
    long = (1 + (factor - 1) * torch.rand(head_dim // 2, generator=gen)).tolist()
    return short, long


def grid_cases(rope_type: str):
    """(scaling, head_dim, base, max_position_embeddings, seq_len) over the task's grid."""
    for head_dim, base, factor in itertools.product(HEAD_DIMS, BASES, FACTORS):
        extended = ORIGINAL * factor
        if rope_type == "linear":
            yield {"rope_type": "linear", "factor": factor}, head_dim, base, extended, None
        elif rope_type == "dynamic":
            # M is the trained length here: unscaled up to M, then the base grows with seq_len.
            for seq_len in (None, ORIGINAL // 2, ORIGINAL, ORIGINAL + 1, 3 * ORIGINAL, extended):
                yield {"rope_type": "dynamic", "factor": factor}, head_dim, base, ORIGINAL, seq_len
        elif rope_type == "yarn":
            plain = {
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": ORIGINAL,
            }
            for extra in (
                {},
                {"attention_factor": 0.9},
                {"mscale": 0.707, "mscale_all_dim": 1.0},
                {"truncate": False},
                {"beta_fast": 16, "beta_slow": 2},
                {"factor": None},  # DeepSeek style: factor = max_position / original
            ):
                yield {**plain, **extra}, head_dim, base, extended, None
        elif rope_type == "llama3":
            for low, high in ((1, 4), (2, 8)):
                scaling = {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": ORIGINAL,
                }
                yield scaling, head_dim, base, extended, None
        elif rope_type == "longrope":
            short, long = longrope_lists(head_dim, factor, seed=head_dim + factor)
            plain = {
                "rope_type": "longrope",
                "short_factor": short,
                "long_factor": long,
                "original_max_position_embeddings": ORIGINAL,
            }
            for extra in ({}, {"factor": factor / 2}, {"attention_factor": 1.2}):
                for seq_len in (None, ORIGINAL // 2, ORIGINAL, ORIGINAL + 1, 2 * ORIGINAL):
                    yield {**plain, **extra}, head_dim, base, extended, seq_len
        elif rope_type == "proportional":
            for share in (0.25, 0.5, 1.0):
                scaling = {
                    "rope_type": "proportional",
                    "factor": factor,
                    "partial_rotary_factor": share,
                }
                yield scaling, head_dim, base, extended, None


@pytest.mark.parametrize("rope_type", sorted(ROPE_INIT_FUNCTIONS))
def test_frequencies_match_transformers_over_the_grid(rope_type):
    """Every transformers scaling type gives transformers' inv_freq (bit for bit) and attention
    factor."""
    cases = list(grid_cases(rope_type))
    assert cases, f"no grid for transformers' rope type {rope_type!r}: add one"
    for scaling, head_dim, base, max_pos, seq_len in cases:
        ours, our_factor = rope_frequencies(scaling, head_dim, base, max_pos, seq_len=seq_len)
        config = hf_config(scaling, head_dim, base, max_pos)
        theirs, their_factor = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
        where = f"{scaling=} {head_dim=} {base=} {max_pos=} {seq_len=}"
        assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,), where
        # Same float32 formulas in the same order of operations: bit for bit (a model trained
        # here and exported sees in transformers exactly the angles it was trained with).
        assert torch.equal(ours, theirs), where
        assert math.isclose(our_factor, their_factor, rel_tol=1e-12), where


def test_default_frequencies_match_transformers_llama_bit_for_bit():
    """No scaling: the very frequencies LlamaRotaryEmbedding uses (checkpoints see their angles)."""
    for head_dim, base in itertools.product(HEAD_DIMS, BASES):
        ours, factor = rope_frequencies(None, head_dim, base, 2048)
        theirs, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(
            hf_config({"rope_type": "default"}, head_dim, base, 2048)
        )
        assert factor == 1.0
        assert torch.equal(ours, theirs)


def test_legacy_type_key_equals_rope_type():
    """``type`` (old configs) is read like ``rope_type``, as transformers reads it."""
    legacy = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    modern = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    legacy_freq, legacy_factor = rope_frequencies(legacy, 128, 1e4, 16384)
    modern_freq, modern_factor = rope_frequencies(modern, 128, 1e4, 16384)
    assert torch.equal(legacy_freq, modern_freq) and legacy_factor == modern_factor


# ----------------------------------------------------------------------------- SPECS 2.1 goldens


def test_static_ntk_golden_base_and_frequency_ends():
    """base' = 40889.9 (factor 4, D 128, base 1e4); highest frequency kept, lowest divided by 4."""
    assert abs(ntk_base(1e4, 4, 128) - 40889.9) < 0.05
    inv_freq, attention_factor = rope_frequencies({"rope_type": "ntk", "factor": 4}, 128, 1e4, 2048)
    plain = base_inv_freq(128, 1e4)
    assert attention_factor == 1.0
    assert inv_freq[0] == plain[0] == 1.0
    torch.testing.assert_close(inv_freq[-1], plain[-1] / 4, rtol=1e-6, atol=0)


def test_yarn_golden_correction_range_and_attention_factor():
    """D 128, base 1e4, L0 4096, factor 4: low 20, high 46, attention factor 1.13863; the pairs
    below low keep their frequency and the pairs from high on are divided by the factor."""
    assert yarn_correction_range(128, 1e4, 4096) == (20, 46)
    scaling = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096}
    inv_freq, attention_factor = rope_frequencies(scaling, 128, 1e4, 16384)
    plain = base_inv_freq(128, 1e4)
    assert abs(attention_factor - 1.13863) < 5e-6
    assert torch.equal(inv_freq[:21], plain[:21])  # ramp 0 up to and including pair low = 20
    torch.testing.assert_close(inv_freq[46:], plain[46:] / 4, rtol=1e-6, atol=0)
    ramp = (inv_freq[21:46] - plain[21:46]) / (plain[21:46] / 4 - plain[21:46])
    torch.testing.assert_close(ramp, (torch.arange(21, 46) - 20) / 26.0, rtol=1e-4, atol=1e-5)


def test_llama3_golden_pair_bands():
    """base 5e5, D 128, factor 8, L0 8192: pairs 0-28 unchanged, 29-34 blended, 35-63 / 8."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8,
        "low_freq_factor": 1,
        "high_freq_factor": 4,
        "original_max_position_embeddings": 8192,
    }
    inv_freq, _ = rope_frequencies(scaling, 128, 5e5, 131072)
    plain = base_inv_freq(128, 5e5)
    assert torch.equal(inv_freq[:29], plain[:29])
    assert torch.equal(inv_freq[35:], plain[35:] / 8)
    blended = inv_freq[29:35]
    assert bool(((blended < plain[29:35]) & (blended > plain[29:35] / 8)).all())


# ----------------------------------------------------------------------------- module + rotation

SMALL_D, SMALL_L0 = 64, 64
MODULE_CASES = {
    "default": (None, 256),
    "linear": ({"rope_type": "linear", "factor": 4}, 256),
    "dynamic": ({"rope_type": "dynamic", "factor": 4}, SMALL_L0),
    "yarn": ({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": SMALL_L0}, 256),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 4,
            "low_freq_factor": 1,
            "high_freq_factor": 4,
            "original_max_position_embeddings": SMALL_L0,
        },
        256,
    ),
    "longrope": (
        {
            "rope_type": "longrope",
            "short_factor": longrope_lists(SMALL_D, 4, seed=0)[0],
            "long_factor": longrope_lists(SMALL_D, 4, seed=0)[1],
            "original_max_position_embeddings": SMALL_L0,
        },
        256,
    ),
}


def position_batch(offset: int, span: int, seed: int) -> torch.Tensor:
    """[2, 16] global positions: an offset run and a sorted random subset, non-contiguous view."""
    gen = torch.Generator().manual_seed(seed)
    run = torch.arange(offset, offset + 32)
    sparse = torch.randperm(span, generator=gen)[:32].sort().values + offset
    return torch.stack([run, sparse])[:, ::2]  # [2, 16], stride 2


@pytest.mark.parametrize("name", sorted(MODULE_CASES))
@pytest.mark.parametrize("offset", [0, 200], ids=["short", "long"])
def test_rotary_embedding_and_rotation_match_transformers_llama(name, offset):
    """cos/sin and rotated q, k (GQA) equal LlamaRotaryEmbedding + apply_rotary_pos_emb.

    offset 200 puts positions past the original length, so dynamic and longrope switch to their
    long-context frequencies; a fresh transformers module matches our stateless one."""
    scaling, max_pos = MODULE_CASES[name]
    position_ids = position_batch(offset, span=64, seed=offset)
    config = hf_config(scaling or {"rope_type": "default"}, SMALL_D, 1e4, max_pos)
    ours = RotaryEmbedding(SMALL_D, 1e4, max_pos, scaling)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 16, SMALL_D, generator=gen)  # [B, Hq, T, D]
    k = torch.randn(2, 2, 16, SMALL_D, generator=gen)  # [B, Hkv, T, D]

    cos, sin = ours(position_ids)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, position_ids)
    assert cos.shape == (2, 16, SMALL_D) and cos.dtype == torch.float32
    # Angles up to ~300 rad in float32: a 1-ulp frequency difference moves them by < 1e-5.
    torch.testing.assert_close(cos, hf_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, hf_sin, rtol=1e-5, atol=1e-5)
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(q_rot, hf_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_rot, hf_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_sequence_shard_with_global_length_equals_full_sequence(name):
    """Under sequence parallelism a rank passes the global length: its cos/sin then equal the
    full sequence's at its positions, though its own positions never pass the original length."""
    scaling, max_pos = MODULE_CASES[name]
    emb = RotaryEmbedding(SMALL_D, 1e4, max_pos, scaling)
    full = torch.arange(256)[None]  # [1, 256], longer than the original 64
    shard = full[:, :32]  # the first rank's positions, all below 64
    full_cos, full_sin = emb(full)
    shard_cos, shard_sin = emb(shard, seq_len=256)
    torch.testing.assert_close(shard_cos, full_cos[:, :32], rtol=0, atol=0)
    torch.testing.assert_close(shard_sin, full_sin[:, :32], rtol=0, atol=0)
    assert not torch.allclose(emb(shard)[1], full_sin[:, :32])  # the length does matter


def test_module_cast_to_bfloat16_keeps_float32_frequencies():
    """``.to(bfloat16)`` (as a bf16 engine does) must not round the frequencies."""
    scaling, max_pos = MODULE_CASES["longrope"]
    emb = RotaryEmbedding(SMALL_D, 1e4, max_pos, scaling)
    position_ids = position_batch(100, span=4000, seed=1)
    cos, sin = emb(position_ids)
    emb_bf16 = emb.to(torch.bfloat16)
    assert emb_bf16.inv_freq.dtype == emb_bf16.long_inv_freq.dtype == torch.float32
    cos_bf16, sin_bf16 = emb_bf16(position_ids)
    assert torch.equal(cos, cos_bf16) and torch.equal(sin, sin_bf16)


def test_from_config_matches_transformers_for_a_model_config():
    """RotaryEmbedding.from_config reads head size, rope_theta and rope_scaling of ModelConfig."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    config = ModelConfig(
        hidden_size=256, num_attention_heads=4, rope_theta=5e5, max_position_embeddings=4096,
        rope_scaling=scaling,
    )  # fmt: skip
    position_ids = position_batch(3000, span=1000, seed=2)
    cos, _ = RotaryEmbedding.from_config(config)(position_ids)
    hf_cos, _ = LlamaRotaryEmbedding(hf_config(scaling, 64, 5e5, 4096))(cos, position_ids)
    torch.testing.assert_close(cos, hf_cos, rtol=1e-5, atol=1e-4)  # angles up to 4000 rad


def test_apply_rotary_bfloat16_is_float32_rotation_rounded_once():
    """bf16 q, k are rotated with float32 angles and rounded once to bf16."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 8, 32, generator=gen).bfloat16()
    k = torch.randn(1, 1, 8, 32, generator=gen).bfloat16()
    cos, sin = RotaryEmbedding(32, 1e4, 2048)(torch.arange(1000, 1008)[None])
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    assert q_rot.dtype == k_rot.dtype == torch.bfloat16
    for x, rotated in ((q, q_rot), (k, k_rot)):
        reference = apply_rotary(x.double(), x.double(), cos.double(), sin.double())[0]
        # float32 vs float64 before one bf16 rounding: at most one bf16 ulp (2^-8 relative).
        torch.testing.assert_close(rotated.float(), reference.float(), rtol=2**-8, atol=1e-6)


def test_rotation_preserves_norms():
    """Each pair turns by an angle: every q and k vector keeps its length."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 64, 128, generator=gen)
    k = torch.randn(2, 2, 64, 128, generator=gen)
    position_ids = torch.randint(0, 100_000, (2, 64), generator=gen)
    cos, sin = RotaryEmbedding(128, 1e4, 2048)(position_ids)
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(k_rot.norm(dim=-1), k.norm(dim=-1), rtol=1e-5, atol=0)


def test_scores_depend_only_on_relative_position():
    """<R(m) q, R(n) k> is the same for every shift of (m, n): plain RoPE is relative."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 1, 128, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 128, generator=gen, dtype=torch.float64)
    emb = RotaryEmbedding(128, 1e4, 2048)

    def score(m: int, n: int) -> float:
        cos, sin = emb(torch.tensor([[m, n]]))  # [1, 2, D]
        q_m = apply_rotary(q, q, cos[:, :1], sin[:, :1])[0]
        k_n = apply_rotary(k, k, cos[:, 1:], sin[:, 1:])[0]
        return float((q_m * k_n).sum())

    # float32 angles near position p are off by up to p * 2^-24 rad (6e-5 at p = 1000); over 64
    # pairs of random sign the score moves by ~4e-7 |q||k| (measured); 1e-5 |q||k| leaves margin.
    tolerance = 1e-5 * float(q.norm() * k.norm())
    reference = score(7, 3)
    for shift in (1, 50, 333, 1000):
        assert abs(score(7 + shift, 3 + shift) - reference) < tolerance
    assert abs(score(8, 3) - reference) > 100 * tolerance  # another distance, another score


# ----------------------------------------------------------------------------- validation


def test_unknown_rope_type_names_the_closest_known_one():
    with pytest.raises(
        LongctxError, match=r"rope_type='yarm' is unknown; did you mean 'yarn'"
    ) as err:
        validate_rope_scaling({"rope_type": "yarm", "factor": 4}, 128)
    assert all(name in str(err.value) for name in KNOWN_ROPE_TYPES)
    assert "\n" not in str(err.value)


def test_missing_required_field_is_named():
    scaling = {"rope_type": "llama3", "factor": 8, "high_freq_factor": 4,
               "original_max_position_embeddings": 8192}  # fmt: skip
    with pytest.raises(LongctxError, match=r"misses the field 'low_freq_factor'"):
        validate_rope_scaling(scaling, 128)


def test_misspelled_field_suggests_the_right_name():
    scaling = {"rope_type": "yarn", "factor": 4, "orignal_max_position_embeddings": 4096}
    with pytest.raises(LongctxError, match=r"did you mean 'original_max_position_embeddings'"):
        validate_rope_scaling(scaling, 128)


def test_longrope_list_of_wrong_length_states_the_expected_length():
    short, long = longrope_lists(128, 4, seed=0)
    scaling = {"rope_type": "longrope", "short_factor": short[:10], "long_factor": long,
               "original_max_position_embeddings": 4096}  # fmt: skip
    with pytest.raises(LongctxError, match=r"short_factor has 10 entries for head_dim=128.* = 64"):
        validate_rope_scaling(scaling, 128)


@pytest.mark.parametrize("factor", [0.5, 0, -2, "4", True])
def test_factor_below_one_or_not_a_number_is_refused(factor):
    with pytest.raises(
        LongctxError, match=r"rope_scaling.factor=.* is invalid; give a number >= 1"
    ):
        validate_rope_scaling({"rope_type": "linear", "factor": factor}, 128)


def test_base_in_rope_scaling_must_agree_with_rope_theta():
    scaling = {"rope_type": "linear", "factor": 2, "rope_theta": 5e5}
    with pytest.raises(
        LongctxError, match=r"rope_theta=500000.0 disagrees with rope_theta=10000.0"
    ):
        rope_frequencies(scaling, 128, 1e4, 2048)


def test_model_config_rejects_a_bad_rope_scaling():
    """ModelConfig's validator calls validate_rope_scaling with the model's head size."""
    short, long = longrope_lists(64, 4, seed=0)  # right for head_dim 64, not for 128
    scaling = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
               "original_max_position_embeddings": 4096}  # fmt: skip
    ModelConfig(hidden_size=256, num_attention_heads=4, rope_scaling=scaling)  # head_dim 64: fine
    with pytest.raises(ValidationError, match=r"short_factor has 32 entries for head_dim=128"):
        ModelConfig(hidden_size=256, num_attention_heads=2, rope_scaling=scaling)


def test_apply_rotary_gradients_equal_transformers_autograd_in_float64():
    """The fused rotation's backward (rotation by -angle) equals autograd through
    transformers' apply_rotary_pos_emb, also for q as a transposed time-major view."""
    gen = torch.Generator().manual_seed(8)
    q_time_major = torch.randn(2, 16, 4, SMALL_D, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 16, SMALL_D, generator=gen, dtype=torch.float64)
    cos, sin = RotaryEmbedding(SMALL_D, 1e4, 2048)(position_batch(0, span=64, seed=8))
    cos, sin = cos.double(), sin.double()
    grads = []
    for rotate in (apply_rotary, apply_rotary_pos_emb):
        q_leaf, k_in = q_time_major.clone().requires_grad_(), k.clone().requires_grad_()
        q_rot, k_rot = rotate(q_leaf.transpose(1, 2), k_in, cos, sin)  # q: [B, Hq, T, D] view
        weights = torch.randn(q_rot.shape, generator=torch.Generator().manual_seed(9))
        ((q_rot * weights.double()).sum() + k_rot.pow(2).sum()).backward()
        grads.append((q_rot.detach(), q_leaf.grad, k_in.grad))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
