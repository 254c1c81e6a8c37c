"""The DeepSpeed engine: LR schedule, activation checkpointing, ZeRO stages against a plain
torch training loop, and skipping of non-finite steps.

References: the schedule against its closed form; checkpointed layers against the same layers
without checkpointing; 2-rank DeepSpeed training (ZeRO 0-3) against a single-process torch
loop that uses transformers-style dense logits and ``F.cross_entropy`` (not the tiled loss) on
the concatenated global batch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import run_on_ranks
from torch.utils._python_dispatch import TorchDispatchMode
from trainer_helpers import deepspeed_environment

from longctx.config.recipe import TrainerConfig
from longctx.errors import LongctxError
from longctx.model import ModelConfig, Transformer
from longctx.parallel.apply import TransformPlan, apply_transforms
from longctx.trainer.engine import (
    GuardedAdamW,
    deepspeed_config,
    lr_factor,
)
from longctx.trainer.loop import StepResult, TrainState, _check_bad_steps

WORLD = 2
VOCAB = 97
SEQ = 32
MODEL = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def trainer_config(**fields) -> TrainerConfig:
    base = dict(
        steps=4,
        micro_batch_size=2,
        grad_accum=2,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=1,
        weight_decay=0.1,
        grad_clip=0.5,
        zero_stage=0,
    )
    return TrainerConfig(**{**base, **fields})


def random_batch(seed: int) -> dict[str, torch.Tensor]:
    """A micro-batch [2, SEQ] of random tokens with pre-shifted labels, some ignored."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=gen) < 0.2] = -100
    positions = torch.arange(SEQ).expand(2, SEQ)
    return {"input_ids": tokens[:, :-1], "labels": labels, "position_ids": positions}


def batch_seed(step: int, rank: int, micro: int) -> int:
    return 1000 * step + 10 * rank + micro


# ---------------------------------------------------------------------------------------------
# LR schedule


def test_lr_factor_matches_warmup_and_cosine_closed_form():
    warmup, total, floor = 4, 20, 0.1
    factors = [
        lr_factor(s, warmup_steps=warmup, total_steps=total, min_ratio=floor)
        for s in range(total + 3)
    ]
    assert factors[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0], rel=1e-12)
    for step in range(warmup, total):
        progress = (step - warmup) / (total - 1 - warmup)
        expected = floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2
        assert factors[step] == pytest.approx(expected, rel=1e-12)
    assert factors[total - 1] == pytest.approx(floor, rel=1e-12)  # the last step reaches min_lr
    assert factors[total:] == pytest.approx([floor] * 3, rel=1e-12)


def test_lr_factor_without_warmup_starts_at_peak():
    assert lr_factor(0, warmup_steps=0, total_steps=10, min_ratio=0.0) == 1.0


def test_deepspeed_config_leaves_clipping_to_guarded_adamw_only_for_zero0_fp32():
    zero0 = deepspeed_config(trainer_config(zero_stage=0))
    zero2 = deepspeed_config(trainer_config(zero_stage=2))
    bf16 = deepspeed_config(trainer_config(zero_stage=0, dtype="bf16"))
    assert zero0["gradient_clipping"] == 0.0  # GuardedAdamW clips (DeepSpeed would not guard)
    assert zero2["gradient_clipping"] == 0.5 and bf16["gradient_clipping"] == 0.5
    assert zero2["zero_optimization"] == {"stage": 2} and bf16["bf16"] == {"enabled": True}
    assert zero2["train_micro_batch_size_per_gpu"] == 2
    assert zero2["gradient_accumulation_steps"] == 2


def test_guarded_adamw_clips_like_clip_grad_norm_and_skips_non_finite():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    reference = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    grads = [torch.randn(5, 3) * 4 for _ in range(2)]
    for p, q, g in zip(weights, reference, grads):
        p.grad, q.grad = g.clone(), g.clone()
    guarded = GuardedAdamW(weights, max_grad_norm=0.5, lr=0.1, weight_decay=0.0)
    plain = torch.optim.AdamW(reference, lr=0.1, weight_decay=0.0)
    norm = torch.nn.utils.clip_grad_norm_(reference, 0.5)
    guarded.step()
    plain.step()
    assert guarded._global_grad_norm == pytest.approx(float(norm), rel=1e-6)
    assert not guarded.overflow
    for p, q in zip(weights, reference):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    before = [p.detach().clone() for p in weights]
    weights[0].grad[0, 0] = float("inf")
    guarded.step()
    assert guarded.overflow and math.isinf(guarded._global_grad_norm)
    assert all(torch.equal(p, b) for p, b in zip(weights, before))


def test_consecutive_bad_steps_stop_the_run_with_a_one_line_error():
    state = TrainState()
    good = StepResult(torch.tensor(1.0), 1, applied=True, grad_norm=1.0)
    bad = StepResult(torch.tensor(float("nan")), 1, applied=False, grad_norm=float("inf"))
    for result in (bad, bad, good, bad, bad):  # a good step resets the streak
        state.step += 1
        _check_bad_steps(state, result, max_bad_steps=3)
    assert state.bad_steps == 4 and state.consecutive_bad == 2
    state.step += 1
    with pytest.raises(LongctxError, match="3 consecutive optimizer steps") as err:
        _check_bad_steps(state, bad, max_bad_steps=3)
    assert "\n" not in str(err.value) and "trainer.max_bad_steps=3" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Activation checkpointing


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_recomputes_layers_with_identical_gradients(mode):
    torch.manual_seed(0)
    plain = Transformer(MODEL)
    checkpointed = Transformer(MODEL)
    checkpointed.load_state_dict(plain.state_dict())
    keys_before = list(checkpointed.state_dict())
    apply_transforms(
        checkpointed, TransformPlan(activation_checkpointing=True, checkpoint_mode=mode)
    )
    assert list(checkpointed.state_dict()) == keys_before

    mlp_calls = []
    # A pre-hook: torch stops the recomputation as soon as the saved tensors exist again, which
    # is inside the MLP, before a forward (post-)hook would fire.
    checkpointed.layers[0].mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
    batch = random_batch(0)
    for model in (plain, checkpointed):
        hidden = model.forward_hidden(batch["input_ids"], batch["position_ids"])
        F.cross_entropy(model.lm_head(hidden).flatten(0, 1), batch["labels"].flatten()).backward()
    assert len(mlp_calls) == 2  # forward, then the recomputation in backward
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad), name


class _KernelCalls(TorchDispatchMode):
    """Counts the CPU flash-attention forward kernel calls that reach the kernel (a selective
    checkpoint's cache answers a recomputation above this mode, so a cached call is not seen)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_activation_checkpointing_keeps_attention_outputs_unless_the_mode_is_full():
    torch.manual_seed(0)
    batch = random_batch(1)
    counts = {}
    for plan in (
        TransformPlan(),
        TransformPlan(activation_checkpointing=True),
        TransformPlan(activation_checkpointing=True, checkpoint_mode="full"),
    ):
        model = Transformer(MODEL)
        apply_transforms(model, plan)
        with _KernelCalls() as kernel:
            hidden = model.forward_hidden(batch["input_ids"], batch["position_ids"])
            hidden.square().mean().backward()
        counts[plan.checkpoint_mode if plan.activation_checkpointing else None] = kernel.calls
    # one forward kernel call per layer unless the mode is full: the selective backward
    # recomputes the projections and the MLP but takes the attention output from the forward
    assert counts[None] == MODEL.num_hidden_layers
    assert counts["selective"] == counts[None]
    assert counts["full"] == 2 * MODEL.num_hidden_layers


# ---------------------------------------------------------------------------------------------
# ZeRO stages against a plain torch loop


def _engine_weights(engine) -> dict[str, np.ndarray]:
    """Full decoder weights of an engine (ZeRO-3 gathers its partitions)."""
    from longctx.parallel.accelerator import import_deepspeed

    params = list(engine.module.model.named_parameters())
    with import_deepspeed().zero.GatheredParameters([p for _, p in params], enabled=True):
        return {name: p.detach().float().cpu().numpy().copy() for name, p in params}


def _rank_train_stages(rank: int, world: int, stages: list[int]) -> dict:
    from longctx.trainer.engine import build_engine
    from longctx.trainer.loop import train_step

    results = {}
    for stage in stages:
        cfg = trainer_config(zero_stage=stage)
        torch.manual_seed(0)
        engine = build_engine(Transformer(MODEL), cfg)
        batches = iter(
            random_batch(batch_seed(step, rank, micro))
            for step in range(cfg.steps)
            for micro in range(cfg.grad_accum)
        )
        norms = [train_step(engine, batches, cfg.grad_accum).grad_norm for _ in range(cfg.steps)]
        results[stage] = {"weights": _engine_weights(engine), "norms": norms}
    return results


def _reference_training(cfg: TrainerConfig) -> tuple[dict[str, np.ndarray], list[float]]:
    """One process, the whole global batch: dense logits + F.cross_entropy, torch AdamW,
    clip_grad_norm_, the closed-form schedule."""
    torch.manual_seed(0)
    model = Transformer(MODEL)
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    plain = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": cfg.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=1e-8,
    )
    norms = []
    for step in range(cfg.steps):
        progress = (step - cfg.warmup_steps) / (cfg.steps - 1 - cfg.warmup_steps)
        factor = (
            (step + 1) / cfg.warmup_steps
            if step < cfg.warmup_steps
            else cfg.min_lr / cfg.lr
            + (1 - cfg.min_lr / cfg.lr) * (1 + math.cos(math.pi * progress)) / 2
        )
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        optimizer.zero_grad()
        micro_losses = []
        for rank in range(WORLD):
            for micro in range(cfg.grad_accum):
                batch = random_batch(batch_seed(step, rank, micro))
                logits = model(batch["input_ids"], batch["position_ids"])  # [B, T, V]
                micro_losses.append(
                    F.cross_entropy(
                        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
                    )
                )
        torch.stack(micro_losses).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
        optimizer.step()
    return {n: p.detach().numpy() for n, p in model.named_parameters()}, norms


@pytest.mark.slow
def test_zero_stages_0_to_3_on_two_ranks_match_a_single_process_torch_loop():
    stages = [0, 1, 2, 3]
    with deepspeed_environment():
        results = run_on_ranks(_rank_train_stages, WORLD, stages)
    reference, reference_norms = _reference_training(trainer_config())
    for stage in stages:
        for rank in range(WORLD):
            got = results[rank][stage]
            # fp32 with a different summation order (gloo all-reduce, tiled vs dense loss):
            # gradient norms agree to 1e-5. Adam divides each gradient element by its own
            # running scale, so an element whose gradient is as small as the rounding noise
            # moves by a visible fraction of lr either way (measured: median difference 3e-9,
            # a handful of the 21728 elements near 2e-5 = 2e-3 x lr, ZeRO stages among
            # themselves alike). So: 99% of the elements within 1e-6, all within 1e-2 x lr
            # (a real error such as weight decay on the norm gains moves them by 1e-3 per step).
            np.testing.assert_allclose(got["norms"], reference_norms, rtol=1e-5)
            diffs = np.concatenate(
                [
                    np.abs(got["weights"][name] - expected).ravel()
                    for name, expected in reference.items()
                ]
            )
            assert np.quantile(diffs, 0.99) < 1e-6, (stage, rank)
            assert diffs.max() < 1e-2 * trainer_config().lr, (stage, rank, diffs.max())


# ---------------------------------------------------------------------------------------------
# Non-finite steps


def _rank_poisoned_step(rank: int, world: int, stages: list[int]) -> dict:
    from longctx.trainer.engine import build_engine
    from longctx.trainer.loop import train_step

    results = {}
    for stage in stages:
        cfg = trainer_config(zero_stage=stage, grad_accum=1)
        torch.manual_seed(0)
        engine = build_engine(Transformer(MODEL), cfg)
        poison = {"on": False}
        target = engine.module.model.layers[1].mlp.down_proj.weight
        target.register_hook(
            lambda g, poison=poison: g * float("nan") if poison["on"] and rank == 1 else g
        )
        batches = iter(random_batch(batch_seed(s, rank, 0)) for s in range(3))
        first = train_step(engine, batches, 1)
        weights, lr = _engine_weights(engine), engine.get_lr()[0]
        poison["on"] = True
        skipped = train_step(engine, batches, 1)
        poison["on"] = False
        after_skip, lr_after_skip = _engine_weights(engine), engine.get_lr()[0]
        recovered = train_step(engine, batches, 1)
        results[stage] = {
            "applied": [first.applied, skipped.applied, recovered.applied],
            "skipped_norm": skipped.grad_norm,
            "unchanged": all(np.array_equal(weights[n], after_skip[n]) for n in weights),
            "lr": (lr, lr_after_skip),
            "moved_after": any(
                not np.array_equal(after_skip[n], w) for n, w in _engine_weights(engine).items()
            ),
        }
    return results


@pytest.mark.slow
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank():
    with deepspeed_environment():
        results = run_on_ranks(_rank_poisoned_step, WORLD, [0, 2])
    for rank_result in results:
        for stage, got in rank_result.items():
            assert got["applied"] == [True, False, True], stage
            assert not math.isfinite(got["skipped_norm"]), stage
            assert got["unchanged"], stage  # weights and optimizer untouched by the bad step
            assert got["lr"][0] == got["lr"][1], stage  # the schedule did not advance
            assert got["moved_after"], stage
