"""Sequence-tiled MLP and CPU offload of saved activations (model/transformer.py).

References: the same weights without tiling or offload (fp32, rtol 1e-5 on outputs and on every
gradient); what autograd saves for backward, seen through ``saved_tensors_hooks``; and a
DeepSpeed engine built from a ``TrainerConfig`` with both options against a plain model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import run_on_ranks
from torch.utils._python_dispatch import TorchDispatchMode
from trainer_helpers import deepspeed_environment

from longctx.config.recipe import TrainerConfig
from longctx.errors import LongctxError
from longctx.model import ModelConfig, Transformer
from longctx.model.transformer import SwiGLU
from longctx.model.wrappers import OffloadedLayer
from longctx.parallel.apply import TransformPlan, apply_transforms

MODEL = ModelConfig(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
SEQ = 45  # not a multiple of the chunk: the last chunk is short
CHUNK = 8
TOL = dict(rtol=1e-5, atol=1e-6)


def random_batch(seed: int, batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MODEL.vocab_size, (batch, SEQ + 1), generator=gen)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def loss_and_grads(model: Transformer, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"])  # [B, T, V]
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def twin_models() -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    plain = Transformer(MODEL)
    other = Transformer(MODEL)
    other.load_state_dict(plain.state_dict())
    return plain, other


def assert_same_step(plain: Transformer, changed: Transformer, seed: int = 1) -> None:
    batch = random_batch(seed)
    loss_a, grads_a = loss_and_grads(plain, batch)
    loss_b, grads_b = loss_and_grads(changed, batch)
    torch.testing.assert_close(loss_b, loss_a, **TOL)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **TOL, msg=name)


def saved_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for backward while ``fn()`` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


# ------------------------------------------------------------------------------ tiled MLP
def test_tiled_swiglu_matches_untiled_output_and_grads():
    torch.manual_seed(0)
    plain = SwiGLU(24, 72)
    tiled = SwiGLU(24, 72)
    tiled.load_state_dict(plain.state_dict())
    tiled.seq_chunk = 7
    x = torch.randn(3, 50, 24, generator=torch.Generator().manual_seed(2))
    dout = torch.randn(3, 50, 24, generator=torch.Generator().manual_seed(3))
    grads = []
    for mlp in (plain, tiled):
        xi = x.clone().requires_grad_()
        out = mlp(xi)
        out.backward(dout)
        grads.append((out.detach(), xi.grad, [p.grad for p in mlp.parameters()]))
    (out_a, dx_a, dw_a), (out_b, dx_b, dw_b) = grads
    torch.testing.assert_close(out_b, out_a, **TOL)
    torch.testing.assert_close(dx_b, dx_a, **TOL)
    for a, b in zip(dw_a, dw_b):
        torch.testing.assert_close(b, a, **TOL)


def test_tiled_model_step_matches_untiled():
    plain, tiled = twin_models()
    apply_transforms(tiled, TransformPlan(tiled_mlp_chunk=CHUNK))
    assert_same_step(plain, tiled)


def test_tiled_mlp_saves_no_intermediate_activation_and_recomputes_each_chunk():
    torch.manual_seed(0)
    mlp = SwiGLU(24, 72)
    x = torch.randn(1, 40, 24, requires_grad=True)
    untiled = saved_shapes(lambda: mlp(x))
    assert any(shape[-1] == 72 for shape in untiled)  # gate/up activations, [B, T, 72]

    mlp.seq_chunk = 16
    calls = []
    mlp.gate_proj.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[1]))
    out = []
    tiled = saved_shapes(lambda: out.append(mlp(x)))
    assert all(shape[-1] != 72 for shape in tiled)  # only chunk inputs are kept
    assert calls == [16, 16, 8]
    out[0].sum().backward()
    assert calls[3:] == [8, 16, 16]  # each chunk recomputed once, in backward's order


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_tiled_mlp_composes_with_activation_checkpointing(mode):
    plain, tiled = twin_models()
    apply_transforms(
        tiled,
        TransformPlan(tiled_mlp_chunk=CHUNK, activation_checkpointing=True, checkpoint_mode=mode),
    )
    assert_same_step(plain, tiled)


class _AttentionKernelOutputs(TorchDispatchMode):
    """Records the storage of every CPU flash-attention kernel output (the attention heads)."""

    def __init__(self):
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.storages.add(result[0].untyped_storage().data_ptr())
        return result


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointed_tiled_layer_keeps_its_input_and_at_most_the_attention_output(mode):
    """Between forward and backward a checkpointed layer with the tiled MLP keeps, of its
    sequence-sized tensors, its input x and (selective) the attention kernel's output, which
    the MLP chunks read as the heads' output: no half-way residual x + attn(norm(x))."""
    _, tiled = twin_models()
    plan = TransformPlan(tiled_mlp_chunk=CHUNK, activation_checkpointing=True, checkpoint_mode=mode)
    apply_transforms(tiled, plan)
    ids = random_batch(7)["input_ids"]
    hidden = torch.randn(*ids.shape, MODEL.hidden_size, requires_grad=True)
    large = {}  # storage address -> bytes, for every saved tensor on a storage of >= [B, T, d]

    def pack(t):
        storage = t.untyped_storage()
        if storage.nbytes() >= hidden.numel() * hidden.element_size():
            large[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        _AttentionKernelOutputs() as kernel,
    ):
        out = tiled.layers[0](hidden, None, _context(ids))
    expected = {hidden.untyped_storage().data_ptr()}
    if mode == "selective":
        expected |= kernel.storages
    assert set(large) == expected
    out.square().sum().backward()  # the kept tensors suffice for backward
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_tiled_mlp_without_grad_matches_untiled():
    plain, tiled = twin_models()
    apply_transforms(tiled, TransformPlan(tiled_mlp_chunk=CHUNK))
    ids = random_batch(4)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(tiled(ids), plain(ids), **TOL)


def test_tiled_mlp_rejects_empty_chunk():
    with pytest.raises(LongctxError, match="chunk must be >= 1"):
        apply_transforms(Transformer(MODEL), TransformPlan(tiled_mlp_chunk=0))


# ------------------------------------------------------------------------------ offload
def test_offload_matches_plain_and_intercepts_layer_saves():
    plain, offloaded = twin_models()
    apply_transforms(
        offloaded, TransformPlan(activation_checkpointing=True, offload_activations=True)
    )
    assert_same_step(plain, offloaded)

    # save_on_cpu's hooks are innermost inside each layer, so an outer hook sees none of the
    # layer's saved tensors; without offload it sees them.
    ids = random_batch(5)["input_ids"]
    hidden = plain.embed_tokens(ids).detach().requires_grad_()
    seen_plain = saved_shapes(lambda: plain.layers[0](hidden, None, _context(ids)))
    seen_offloaded = saved_shapes(lambda: offloaded.layers[0](hidden, None, _context(ids)))
    assert seen_plain and not seen_offloaded


def _context(ids: torch.Tensor):
    from longctx.attention.context import AttentionContext

    length = ids.shape[1]
    return AttentionContext(
        position_ids=torch.arange(length).expand_as(ids), seq_positions=torch.arange(length)
    )


# ------------------------------------------------------------------------------ recipe wiring
def test_trainer_config_fields_default_off_and_validate():
    cfg = TrainerConfig()
    assert cfg.tiled_mlp_chunk is None and cfg.offload_activations is False
    assert TrainerConfig(tiled_mlp_chunk=4096, offload_activations=True).tiled_mlp_chunk == 4096
    with pytest.raises(ValueError):
        TrainerConfig(tiled_mlp_chunk=0)


def _rank_engine_step(rank: int, world: int) -> dict:
    from longctx.trainer.engine import build_engine
    from longctx.trainer.plans import transform_plan

    plain, model = twin_models()
    cfg = TrainerConfig(
        steps=1,
        warmup_steps=0,
        zero_stage=0,
        activation_checkpointing=True,
        tiled_mlp_chunk=CHUNK,
        offload_activations=True,
    )
    apply_transforms(model, transform_plan(cfg))
    engine = build_engine(model, cfg)
    batch = random_batch(6)
    loss = engine(batch["input_ids"], batch["labels"])
    engine.backward(loss)
    ref_loss, ref_grads = loss_and_grads(plain, batch)
    layer = engine.module.model.layers[0]
    return {
        "seq_chunk": layer.mlp.seq_chunk,
        "offloaded": type(layer).__name__,
        "loss_diff": abs(loss.item() - ref_loss.item()),
        "grad_diff": max(
            (p.grad - ref_grads[name]).abs().max().item()
            for name, p in engine.module.model.named_parameters()
        ),
    }


def test_recipe_transforms_apply_tiled_mlp_and_offload_under_the_engine():
    with deepspeed_environment():
        result = run_on_ranks(_rank_engine_step, 1)[0]
    assert result["seq_chunk"] == CHUNK
    assert result["offloaded"] == OffloadedLayer.__name__
    assert result["loss_diff"] < 1e-5 and result["grad_diff"] < 1e-5
