"""MoSA (SPECS 3.2) against a plain float64 loop, the k = T identity, router gradients, the
head-split check, and the whole layer projecting only the routed heads' chosen tokens against
the full projection (sequence parallelism: tests/test_sparse_sp.py)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import FP32, assert_gradient_close
from torch.utils.flop_counter import FlopCounterMode
from trainer_helpers import job, make_data, tiny_recipe, train_on_ranks

from longctx.attention import AttentionConfig, AttentionContext, block_attention
from longctx.attention.config import MoSAConfig
from longctx.attention.mosa import MoSAAttention, routed_token_count
from longctx.bench.mosa_layer import layer_flops
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.model.hf_io import load_hf, new_parameter_names, save_hf
from longctx.model.transformer import SelfAttention, Transformer
from longctx.model.wrappers import CheckpointedLayer
from longctx.positional.config import PositionalConfig
from longctx.positional.rope import RotaryEmbedding, apply_rotary

# fp32 fast path vs float64 loop: rounding of short dot products and softmaxes (rtol 1e-5).
HIDDEN, HEADS, KV_HEADS, DIM = 16, 6, 3, 8


def model_config(sliding_window=None, attention_bias=False) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM,
        sliding_window=sliding_window, attention_bias=attention_bias,
    )  # fmt: skip


def make_core(dense_heads=2, sparsity=4, sliding_window=None) -> MoSAAttention:
    attention = AttentionConfig(
        variant="mosa", mosa=MoSAConfig(dense_heads=dense_heads, sparsity=sparsity)
    )
    torch.manual_seed(0)
    shape = model_config(sliding_window).attention_shape(0)
    core = MoSAAttention(shape, attention, PositionalConfig())
    with torch.no_grad():
        core.router.weight.normal_()  # spread router scores so the top-k is decisive
    return core


def inputs(length=48, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, HEADS, length, DIM), (2, KV_HEADS, length, DIM), (2, KV_HEADS, length, DIM),
              (2, length, HIDDEN)]  # fmt: skip
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def context(hidden, doc_ids=None) -> AttentionContext:
    batch, length = hidden.shape[:2]
    positions = torch.arange(length)
    return AttentionContext(
        position_ids=positions.expand(batch, length), seq_positions=positions, doc_ids=doc_ids,
        hidden=hidden,
    )  # fmt: skip


def attend(query, keys, values, scale):
    probs = torch.softmax(keys @ query * scale, dim=0)
    return probs @ values


def reference_mosa(core, q, k, v, hidden, doc_ids=None, window=None):
    """MoSA in float64: dense heads per query, routed heads by explicit top-k and a loop."""
    core = copy.deepcopy(core).double()
    q, k, v, hidden = q.double(), k.double(), v.double(), hidden.double()
    batch, heads, length, dim = q.shape
    group, scale = heads // k.shape[1], 1.0 / math.sqrt(dim)
    dense = core.dense_heads
    count = max(2, length // core.config.mosa.sparsity)
    router = torch.sigmoid(hidden @ core.router.weight.T)  # [B, T, Hm]
    rows = {}
    for b in range(batch):
        doc = (lambda t: 0) if doc_ids is None else (lambda t, b=b: int(doc_ids[b, t]))
        for h in range(heads):
            j = h // group
            zero = q.new_zeros(dim)
            if h < dense:
                for t in range(length):
                    keys = [u for u in range(t + 1) if doc(u) == doc(t)
                            and (window is None or t - u < window)]  # fmt: skip
                    rows[b, h, t] = attend(q[b, h, t], k[b, j, keys], v[b, j, keys], scale)
                continue
            scores = router[b, :, h - dense]
            ranked = sorted(range(length), key=lambda t: -float(scores[t].detach()))
            chosen = set(ranked[:count])
            for t in range(length):
                if t not in chosen:
                    rows[b, h, t] = zero
                    continue
                keys = [u for u in sorted(chosen) if u <= t and doc(u) == doc(t)]
                rows[b, h, t] = scores[t] * attend(q[b, h, t], k[b, j, keys], v[b, j, keys], scale)
    out = torch.stack([torch.stack([torch.stack([rows[b, h, t] for t in range(length)])
                                    for h in range(heads)]) for b in range(batch)])  # fmt: skip
    return out, core


@pytest.mark.parametrize(
    "doc_ids", [None, torch.tensor([[0] * 20 + [1] * 28, [0] * 5 + [1] * 30 + [2] * 13])]
)
def test_mosa_matches_float64_reference_loop_outputs_and_gradients(doc_ids):
    core = make_core(sliding_window=10)
    tensors = inputs()
    fast = core(*tensors[:3], context(tensors[3], doc_ids))
    ref_tensors = [t.detach().double().requires_grad_() for t in tensors]
    ref, ref_core = reference_mosa(core, *ref_tensors, doc_ids=doc_ids, window=10)
    torch.testing.assert_close(fast, ref.float(), **FP32)
    weight = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3))
    (fast * weight).sum().backward()
    (ref * weight.double()).sum().backward()
    for got, want in zip(tensors, ref_tensors):
        torch.testing.assert_close(got.grad, want.grad.float(), **FP32)
    torch.testing.assert_close(core.router.weight.grad, ref_core.router.weight.grad.float(), **FP32)


def test_routing_every_token_equals_dense_attention_times_router_score():
    core = make_core(dense_heads=0, sparsity=1)  # k = T
    q, k, v, hidden = inputs()
    out = core(q, k, v, context(hidden))
    dense, _ = block_attention(q, k, v, backend="reference")
    scores = core.router(hidden)  # [B, H, T]
    torch.testing.assert_close(out, dense * scores[..., None], **FP32)


def test_router_weights_receive_the_gradient_of_the_loss():
    """d loss / d W_r is nonzero and agrees with a central finite difference in float64."""
    core = make_core().double()
    q, k, v, hidden = (t.detach().double() for t in inputs())
    ctx = context(hidden)
    core(q, k, v, ctx).sin().sum().backward()
    grad = core.router.weight.grad
    assert grad.abs().sum() > 0
    step = 1e-6
    with torch.no_grad():
        core.router.weight[1, 3] += step
        plus = core(q, k, v, ctx).sin().sum()
        core.router.weight[1, 3] -= 2 * step
        minus = core(q, k, v, ctx).sin().sum()
    torch.testing.assert_close(grad[1, 3], (plus - minus) / (2 * step), rtol=1e-6, atol=1e-9)


def test_routed_heads_output_zero_at_unchosen_positions():
    core = make_core(dense_heads=0, sparsity=4)
    q, k, v, hidden = inputs()
    out = core(q, k, v, context(hidden))
    nonzero = out.abs().sum(-1) > 0  # [B, H, T]
    assert (nonzero.sum(-1) == routed_token_count(48, 4)).all()


def test_dense_heads_that_split_a_gqa_group_are_rejected():
    with pytest.raises(LongctxError, match="dense_heads=1 splits a GQA group of 2"):
        make_core(dense_heads=1)


def test_mosa_model_trains_router_and_every_head():
    torch.manual_seed(0)
    attention = AttentionConfig(variant="mosa", mosa=MoSAConfig(dense_heads=2, sparsity=4))
    model = Transformer(model_config(), attention=attention)
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    attn = model.layers[0].self_attn
    assert attn.core.router.weight.grad.abs().sum() > 0
    per_head = attn.q_proj.weight.grad.view(HEADS, DIM, HIDDEN).abs().sum((1, 2))
    assert (per_head > 0).all()


def test_loading_a_dense_checkpoint_adds_the_router_as_a_new_parameter(tmp_path):
    """load_hf with attention mosa keeps the checkpoint's weights and draws W_r fresh: small,
    distinct router scores near 0.5."""
    config = model_config()
    dense = Transformer(config)
    save_hf(dense, config, tmp_path / "dense")
    attention = AttentionConfig(variant="mosa", mosa=MoSAConfig(dense_heads=2, sparsity=4))
    model, _ = load_hf(tmp_path / "dense", attention=attention)
    assert "model.layers.0.self_attn.core.router.weight" in new_parameter_names(model)
    torch.testing.assert_close(
        model.layers[0].self_attn.q_proj.weight, dense.layers[0].self_attn.q_proj.weight
    )
    scores = model.layers[0].self_attn.core.router(torch.randn(2, 48, HIDDEN))
    assert (scores - 0.5).abs().max() < 0.2
    assert scores.unique().numel() == scores.numel()


PACKED = torch.tensor([[0] * 20 + [1] * 28, [0] * 5 + [1] * 30 + [2] * 13])


def mosa_layer(attention_bias: bool, dense_heads: int) -> SelfAttention:
    """A MoSA attention layer (``dense_heads`` dense, the rest routed at rho 4, window 10) with
    random projections (biases too) and spread router scores."""
    config = model_config(sliding_window=10, attention_bias=attention_bias)
    attention = AttentionConfig(
        variant="mosa", mosa=MoSAConfig(dense_heads=dense_heads, sparsity=4)
    )
    torch.manual_seed(0)
    layer = SelfAttention(config, attention, PositionalConfig(), layer_index=0)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0.0, 0.3)
        layer.core.router.weight.normal_()
    return layer


def full_projection_layer(layer, x, rotary, ctx):
    """The layer as it ran before its core projected: every token projected for every head,
    RoPE, ``core.forward(q, k, v, ctx)``, o_proj over all rows."""
    batch, length, _ = x.shape
    q = layer.q_proj(x).view(batch, length, HEADS, DIM).transpose(1, 2)
    k = layer.k_proj(x).view(batch, length, KV_HEADS, DIM).transpose(1, 2)
    v = layer.v_proj(x).view(batch, length, KV_HEADS, DIM).transpose(1, 2)
    q, k = apply_rotary(q, k, *rotary)
    out = layer.core(q, k, v, dataclasses.replace(ctx, hidden=x))
    return layer.o_proj(out.transpose(1, 2).flatten(2)), out


def packed_positions(doc_ids):
    """RoPE positions restarting at every document: [B, T]."""
    if doc_ids is None:
        return torch.arange(48).expand(2, 48)
    starts = torch.cat([torch.ones(2, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], 1)
    index = torch.arange(48).expand(2, 48)
    start_of = torch.where(starts, index, 0).cummax(dim=1).values
    return index - start_of


def assert_gradients_close(got, want):
    """Every named gradient of ``got`` against ``want``'s, to its tensor's scale."""
    for name, grad in want.items():
        assert_gradient_close(got[name], grad, name)


def layer_gradients(layer, x):
    """Gradients of x, every projection weight and bias, and the router."""
    grads = {"x": x.grad, "router": layer.core.router.weight.grad}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for kind, parameter in getattr(layer, name).named_parameters():
            grads[f"{name}.{kind}"] = parameter.grad
    return grads


@pytest.mark.parametrize(("attention_bias", "dense_heads"), [(False, 2), (True, 2), (False, 0)])
@pytest.mark.parametrize("doc_ids", [None, PACKED])
def test_layer_projecting_chosen_tokens_equals_full_projection_and_float64(
    doc_ids, attention_bias, dense_heads
):
    """The layer's chosen-token path (``forward_layer``) equals the full projection and the
    float64 loop (projected, rotated and o-projected in float64) in outputs and in gradients of
    x, q/k/v/o weights and biases and the router."""
    layer = mosa_layer(attention_bias, dense_heads)
    assert layer.core.projects_itself
    rope = RotaryEmbedding.from_config(model_config())
    positions = packed_positions(doc_ids)
    rotary = rope(positions)
    ctx = AttentionContext(position_ids=positions, seq_positions=torch.arange(48), doc_ids=doc_ids)
    x = torch.randn(2, 48, HIDDEN, generator=torch.Generator().manual_seed(5))
    weight = torch.randn(2, 48, HIDDEN, generator=torch.Generator().manual_seed(6))

    chosen_x = x.clone().requires_grad_()
    chosen = layer(chosen_x, rotary, ctx)
    (chosen * weight).sum().backward()
    got = layer_gradients(layer, chosen_x)

    full_layer = copy.deepcopy(layer)
    full_layer.zero_grad()
    full_x = x.clone().requires_grad_()
    full, _ = full_projection_layer(full_layer, full_x, rotary, ctx)
    (full * weight).sum().backward()
    torch.testing.assert_close(chosen, full, **FP32)
    assert_gradients_close(got, layer_gradients(full_layer, full_x))

    ref_layer = copy.deepcopy(layer).double()
    ref_layer.zero_grad()
    ref_x = x.double().requires_grad_()
    q = ref_layer.q_proj(ref_x).view(2, 48, HEADS, DIM).transpose(1, 2)
    k = ref_layer.k_proj(ref_x).view(2, 48, KV_HEADS, DIM).transpose(1, 2)
    v = ref_layer.v_proj(ref_x).view(2, 48, KV_HEADS, DIM).transpose(1, 2)
    q, k = apply_rotary(q, k, *(table.double() for table in rotary))
    heads, ref_core = reference_mosa(ref_layer.core, q, k, v, ref_x, doc_ids=doc_ids, window=10)
    ref = ref_layer.o_proj(heads.transpose(1, 2).flatten(2))
    (ref * weight.double()).sum().backward()
    ref_layer.core = ref_core  # the loop's copy holds the router gradient
    torch.testing.assert_close(chosen, ref.float(), **FP32)
    assert_gradients_close(got, layer_gradients(ref_layer, ref_x))


def test_checkpointed_mosa_layers_give_the_plain_gradients():
    """Activation checkpointing recomputes the chosen-token path in backward (same top-k, same
    rows): the loss gradients of every parameter equal the plain model's."""
    torch.manual_seed(0)
    attention = AttentionConfig(variant="mosa", mosa=MoSAConfig(dense_heads=2, sparsity=4))
    plain = Transformer(model_config(), attention=attention)
    checkpointed = copy.deepcopy(plain)
    checkpointed.layers = torch.nn.ModuleList(
        CheckpointedLayer(layer) for layer in checkpointed.layers
    )
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    for model in (plain, checkpointed):
        logits = model(ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    grads = dict(checkpointed.named_parameters())
    for name, parameter in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, parameter.grad, **FP32)


@pytest.mark.slow
def test_zero3_trains_mosa_like_zero0(tmp_path):
    """2 data-parallel gloo ranks, 3 fp32 steps of a small MoSA model: under ZeRO-3 (attention
    projections partitioned, registered with the layer whose core reads them) the logged losses
    equal the ZeRO-0 run's within 1e-5."""
    corpus, tokenizer = make_data(tmp_path / "data")
    common = {"steps": 3, "ckpt_every": 3, "eval_every": 3, "grad_accum": 1}
    attention = AttentionConfig(
        variant="mosa", chunk_size=32, mosa=MoSAConfig(dense_heads=2, sparsity=4)
    )
    runs = [
        tiny_recipe(corpus, tokenizer, tmp_path / f"zero{stage}", zero_stage=stage, **common)
        for stage in (0, 3)
    ]
    # q_proj and o_proj of hidden 320 hold 102400 > 1e5 values (DeepSpeed's default
    # stage3_param_persistence_threshold): ZeRO-3 partitions them instead of keeping them whole
    model = runs[0].model.model_copy(update={"hidden_size": 320})
    runs = [recipe.model_copy(update={"attention": attention, "model": model}) for recipe in runs]
    zero0, zero3 = train_on_ranks([job(recipe) for recipe in runs], world=2)[0]
    curves = [[m["loss"] for m, _ in run["reports"] if "loss" in m] for run in (zero0, zero3)]
    assert len(curves[0]) == 3
    torch.testing.assert_close(
        torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("variant", ["dense", "mosa"])
def test_layer_flops_counted_by_torch_equal_the_formula(variant):
    """``bench/mosa_layer.layer_flops`` (the paper's per-head costs) equals the matmul FLOPs
    torch's counter sees in one forward of the layer (batch of 2) with the full-square
    ``reference`` kernel: a routed head's projections cost its k chosen rows, not all T."""
    config = model_config()
    attention = AttentionConfig(
        variant=variant, backend="reference", mosa=MoSAConfig(dense_heads=2, sparsity=4)
    )
    layer = SelfAttention(config, attention, PositionalConfig(), layer_index=0)
    positions = torch.arange(48)
    rotary = RotaryEmbedding.from_config(config)(positions.expand(2, 48))
    ctx = AttentionContext(position_ids=positions.expand(2, 48), seq_positions=positions)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        layer(torch.randn(2, 48, HIDDEN), rotary, ctx)
    formula = layer_flops(config, attention, 48)
    assert counter.get_total_flops() == 2 * (formula["projections"] + formula["attention"])
