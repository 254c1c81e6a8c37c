"""The attention-core registry and the capabilities every registered core declares.

Each registered ``(attention.variant, positional.kind)`` pair is built into a 2-layer model;
its cores' class attributes must agree with what sequence parallelism does with them
(``check_recipe_supported``, ``check_core_supported``, the ring-group wrapper, the heads a
Ulysses rank gets) and with what the core really reads (``ctx.hidden``, the model's window).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from longctx.attention import AttentionContext, AttentionCore, build_attention_core, core_class
from longctx.attention.config import AttentionConfig
from longctx.attention.registry import CORES, recipe_problem
from longctx.config.recipe import load_recipe
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.model.transformer import Transformer
from longctx.parallel.config import ParallelConfig
from longctx.parallel.key_gather import KeyGatherAttention
from longctx.parallel.parallelize import (
    _ring_core,
    check_core_supported,
    check_recipe_supported,
    runs_under_ring,
)
from longctx.parallel.ring import RingAttention
from longctx.positional.config import PositionalConfig

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
MODEL = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
)  # fmt: skip
# Small settings so that 24 tokens exercise every variant (MoSA: 2 dense and 2 routed heads).
SETTINGS = {
    "nsa": {"nsa": {"compress_block": 4, "compress_stride": 2, "select_block": 4,
                    "select_top_n": 3, "window": 6}},
    "mosa": {"mosa": {"dense_heads": 2, "sparsity": 4}},
    "power": {"power": {"block_size": 4}},
    "landmark": {"landmark": {"block_size": 5}},
}  # fmt: skip
PAIRS = sorted(CORES)


def _configs(variant: str, kind: str) -> tuple[AttentionConfig, PositionalConfig]:
    attention = AttentionConfig(variant=variant, **SETTINGS.get(variant, {}))
    return attention, PositionalConfig(kind=kind)


def test_an_unknown_pair_is_refused_in_one_line_naming_what_is_available():
    attention, positional = _configs("nsa", "cope")
    with pytest.raises(LongctxError) as info:
        core_class(attention, positional)
    message = str(info.value)
    assert "\n" not in message
    assert "'nsa'" in message and "'cope'" in message
    assert "dense+rope" in message and "dense+cope" in message
    assert recipe_problem(MODEL.attention_shape(0), attention, positional, ulysses=1, ring=1) == (
        message
    )


def test_an_unknown_pair_fails_at_recipe_load():
    with pytest.raises(LongctxError, match="is not available") as info:
        load_recipe(TINY, ["attention.variant=power", "positional.kind=bam"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("variant", "kind"), PAIRS, ids=[f"{v}+{k}" for v, k in PAIRS])
def test_capabilities_agree_with_how_parallelize_wraps_the_core(variant, kind):
    attention, positional = _configs(variant, kind)
    cls = core_class(attention, positional)
    assert issubclass(cls, AttentionCore)
    model = Transformer(MODEL, positional, attention)
    ring2 = ParallelConfig(dp=1, ulysses=1, ring=2)
    under_ring = cls.merges_blockwise or cls.accepts_gathered_keys
    assert runs_under_ring(cls) == under_ring
    if under_ring:
        check_recipe_supported(MODEL, attention, positional, ring2)
    else:
        with pytest.raises(LongctxError, match="does not support ring attention"):
            check_recipe_supported(MODEL, attention, positional, ring2)
    mesh = SimpleNamespace(ring_group=None)  # the wrappers only keep the group
    for index, layer in enumerate(model.layers):
        core = layer.self_attn.core
        assert type(core) is cls
        if under_ring:
            check_core_supported(core, ring2, index)
            wrapped = _ring_core(core, mesh)
            if cls.merges_blockwise:
                assert isinstance(wrapped, RingAttention)
            else:
                assert isinstance(wrapped, KeyGatherAttention)
                assert wrapped.gather_hidden == cls.reads_key_hidden
    if cls.has_head_parameters:  # a Ulysses rank narrows the per-head parameters
        assert cls.restrict_to_heads is not AttentionCore.restrict_to_heads
    if cls.reads_key_hidden:
        assert cls.reads_hidden and cls.accepts_gathered_keys


def _inputs(length: int = 24):
    gen = torch.Generator().manual_seed(0)
    heads, kv, dim = MODEL.num_attention_heads, MODEL.kv_heads, MODEL.dim_per_head
    q = torch.randn(2, heads, length, dim, generator=gen)
    k, v = (torch.randn(2, kv, length, dim, generator=gen) for _ in range(2))
    hidden = [torch.randn(2, length, MODEL.hidden_size, generator=gen) for _ in range(2)]
    positions = torch.arange(length)
    return q, k, v, hidden, positions


@pytest.mark.parametrize(("variant", "kind"), PAIRS, ids=[f"{v}+{k}" for v, k in PAIRS])
def test_reads_hidden_is_truthful(variant, kind):
    """A core that does not declare ``reads_hidden`` runs without the layer input (Ulysses
    does not gather it for it); one that declares it depends on it."""
    attention, positional = _configs(variant, kind)
    torch.manual_seed(0)
    core = build_attention_core(MODEL.attention_shape(0), attention, positional)
    for parameter in core.parameters():  # nonzero everywhere: every parameter matters
        torch.nn.init.normal_(parameter, std=0.5)
    q, k, v, (hidden, other), positions = _inputs()

    def run(layer_input):
        return core(
            q, k, v, AttentionContext(positions.expand(2, -1), positions, hidden=layer_input)
        )

    if core.reads_hidden:
        assert not torch.allclose(run(hidden), run(other))
    else:
        torch.testing.assert_close(run(None), run(hidden))


@pytest.mark.parametrize(("variant", "kind"), PAIRS, ids=[f"{v}+{k}" for v, k in PAIRS])
def test_supports_window_is_truthful(variant, kind):
    """A core honouring the window builds under it (and masks by it); the others refuse it
    in one line, at recipe load as in the constructor."""
    attention, positional = _configs(variant, kind)
    windowed = MODEL.model_copy(update={"sliding_window": 5})
    cls = core_class(attention, positional)
    if cls.supports_window:
        core = build_attention_core(windowed.attention_shape(1), attention, positional)
        assert core.sliding_window == 5
        return
    with pytest.raises(LongctxError, match=r"sliding_window \(5\)") as info:
        build_attention_core(windowed.attention_shape(1), attention, positional)
    assert "\n" not in str(info.value)


def test_the_trainer_hook_inserts_landmarks_only_for_the_landmark_core():
    batch = {"input_ids": torch.arange(12)[None], "labels": torch.arange(12)[None]}
    shape = MODEL.attention_shape(0)
    dense, _ = _configs("dense", "rope")
    assert core_class(dense, PositionalConfig()).transform_batch(batch, shape, dense) is batch
    landmark, _ = _configs("landmark", "rope")
    out = core_class(landmark, PositionalConfig()).transform_batch(batch, shape, landmark)
    assert out["input_ids"].shape == (1, 14)  # a landmark after every 5 tokens
    assert out["input_ids"][0, 5] == MODEL.vocab_size - 1  # default id: the last vocab id
