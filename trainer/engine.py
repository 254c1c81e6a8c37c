"""The DeepSpeed engine a run trains with: config, optimizer, LR schedule and the module whose
forward returns the loss.

DeepSpeed owns data-parallel gradient averaging, ZeRO partitioning (stages 0-3), bf16 master
weights, gradient accumulation and clipping; this file turns a ``TrainerConfig`` into the
DeepSpeed config dict and hands ``deepspeed.initialize`` three things it builds itself:

- a torch ``AdamW`` as the client optimizer (a DeepSpeed-config optimizer would compile a fused
  op at first use, about 30 s on CPU);
- a warmup + cosine ``LambdaLR`` schedule, which DeepSpeed steps once per optimizer step (not per
  micro-batch) and saves in its checkpoints;
- ``ModelWithLoss``, the decoder wrapped so that ``engine(**batch)`` returns the tiled
  cross-entropy, never the ``[B, T, vocab]`` logits.

The model arrives already transformed (sequence parallelism, tiled MLP, activation
checkpointing and offload: ``longctx.parallel.apply.apply_transforms``, called once by the
worker); nothing here changes it.

A step whose gradient norm is not finite is skipped, not applied: DeepSpeed's ZeRO and
bf16 optimizers do this themselves (the engine then reports ``was_step_applied() == False``,
counts it in ``skipped_steps`` and leaves the LR schedule where it was). In the one case where
DeepSpeed hands the gradients straight to the client optimizer (ZeRO stage 0, fp32),
``GuardedAdamW`` measures the norm, skips and clips in its own ``step`` so every stage behaves
the same.

On resume DeepSpeed restores the optimizer's hyperparameters as they were saved;
``apply_recipe_optimizer_settings`` puts the recipe's peak LR, betas and weight decay back in
force (a no-op for an unchanged recipe, so exact resume is unaffected).

DeepSpeed is imported through ``longctx.parallel.accelerator.import_deepspeed()`` (the
accelerator must be chosen before the first import).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from longctx.parallel.accelerator import import_deepspeed
from longctx.parallel.loss import tiled_cross_entropy, world_mean_scale

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from longctx.config.recipe import TrainerConfig
    from longctx.model import Transformer


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier on the peak LR for optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` (the first update already moves, the
    ``warmup_steps``-th uses the peak), then a half cosine from 1 down to ``min_ratio`` =
    ``min_lr / lr`` at ``total_steps - 1``, and ``min_ratio`` after that.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> LambdaLR:
    """``LambdaLR`` over ``lr_factor`` with the run's warmup, length and LR floor."""
    factor = functools.partial(
        lr_factor,
        warmup_steps=cfg.warmup_steps,
        total_steps=cfg.steps,
        min_ratio=cfg.min_lr / cfg.lr,
    )
    return LambdaLR(optimizer, factor)


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that measures the global gradient norm, skips a non-finite step, then clips.

    Used only where DeepSpeed leaves gradients untouched (ZeRO stage 0, fp32): there every rank
    holds the full all-reduced gradient when ``step`` runs, so the local norm is the global
    norm and every rank takes the same decision. The engine reads ``overflow`` and
    ``_global_grad_norm`` from its optimizer exactly as it does from its own ZeRO optimizers:
    an overflowing step is counted in ``skipped_steps`` and the LR schedule does not advance.
    """

    def __init__(self, params, *, max_grad_norm: float, **adamw_kwargs: Any):
        super().__init__(params, **adamw_kwargs)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        return super().step(closure)


def deepspeed_owns_clipping(cfg: TrainerConfig) -> bool:
    """Whether DeepSpeed's own optimizer wrapper measures, clips and guards the gradients
    (ZeRO stages 1-3, or bf16); otherwise ``GuardedAdamW`` does it."""
    return cfg.zero_stage > 0 or cfg.dtype == "bf16"


def zero_config(cfg: TrainerConfig) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization`` section: the stage and the CPU offload the recipe asks
    for (``offload_optimizer``, ``offload_param``; pinned host memory when CUDA is there)."""
    section: dict[str, Any] = {"stage": cfg.zero_stage}
    offload = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_optimizer:
        section["offload_optimizer"] = dict(offload)
    if cfg.offload_param:
        section["offload_param"] = dict(offload)
    return section


def deepspeed_config(cfg: TrainerConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for a run (the global batch follows from micro x accum x world).

    With optimizer offload the client torch AdamW steps on DeepSpeed's CPU partitions
    (``zero_force_ds_cpu_optimizer: false`` lets DeepSpeed accept it instead of its own
    compiled DeepSpeedCPUAdam)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip if deepspeed_owns_clipping(cfg) else 0.0,
        "zero_optimization": zero_config(cfg),
        "bf16": {"enabled": cfg.dtype == "bf16"},
        # A client torch optimizer under ZeRO is supported; the flag silences DeepSpeed's check.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def _ndim(param: nn.Parameter) -> int:
    """Dimensions of a parameter's full shape: a parameter built under ``deepspeed.zero.Init``
    holds an empty 1-D placeholder, its shape is ``ds_shape``."""
    return len(getattr(param, "ds_shape", param.shape))


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed)."""
    decayed = [p for p in model.parameters() if p.requires_grad and _ndim(p) >= 2]
    plain = [p for p in model.parameters() if p.requires_grad and _ndim(p) < 2]
    groups = [
        {"params": params, "weight_decay": decay}
        for params, decay in ((decayed, cfg.weight_decay), (plain, 0.0))
        if params  # LoRA without trainable norms has no vector parameters
    ]
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": 1e-8}
    if deepspeed_owns_clipping(cfg):
        return torch.optim.AdamW(groups, **kwargs)
    return GuardedAdamW(groups, max_grad_norm=cfg.grad_clip, **kwargs)


class ModelWithLoss(nn.Module):
    """The module DeepSpeed trains: the decoder (``model``), and a forward that returns the loss.

    ``forward(input_ids, labels, position_ids, doc_ids, seq_positions, rope_seq_len)`` (each
    ``[B, T]``, labels pre-shifted, -100 = no loss; ``seq_positions`` ``[T]``, the tokens'
    indices in the global sequence under sequence parallelism; ``rope_seq_len`` the whole
    sequence's RoPE length; all as ``longctx.parallel.batch.prepare_batch`` returns them) returns the token-mean cross-entropy, computed
    by ``tiled_cross_entropy`` from the final hidden states and ``lm_head.weight`` without
    materialising the logits. The head weight is used outside ``lm_head``'s own forward, so
    under ZeRO-3 it is registered as an external parameter of this module (gathered for its
    forward and backward); so are the projections an attention core reads for its layer
    (``SelfAttention.weights_read_by_core``, MoSA), with that layer.

    With ``sp_group`` (sequence parallelism, SPECS 1.6) each rank holds a shard of the sequence
    and returns its share ``local NLL sum / scored tokens of the whole sequence`` times the SP
    degree: DeepSpeed averages gradients over all ``dp x sp`` ranks, so the shares' factor makes
    that average the data-parallel mean of the true sequence losses' gradients; the world mean
    of the returned values is the true loss too.
    """

    def __init__(
        self, model: Transformer, *, zero_stage: int, sp_group: dist.ProcessGroup | None = None
    ):
        super().__init__()
        self.model = model
        self.sp_group = sp_group
        if zero_stage == 3:
            register = import_deepspeed().zero.register_external_parameter
            register(self, model.lm_head.weight)
            for layer in model.layers:  # cores that project for their layer (MoSA)
                for parameter in layer.self_attn.weights_read_by_core():
                    register(layer.self_attn, parameter)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor,
        position_ids: Tensor | None = None,
        doc_ids: Tensor | None = None,
        seq_positions: Tensor | None = None,
        rope_seq_len: int | None = None,
    ) -> Tensor:
        hidden = self.model.forward_hidden(
            input_ids,
            position_ids,
            doc_ids=doc_ids,
            seq_positions=seq_positions,
            rope_seq_len=rope_seq_len,
        )  # [B, T, d]
        share = tiled_cross_entropy(hidden, self.model.lm_head.weight, labels, group=self.sp_group)
        return share * world_mean_scale(self.sp_group)


def build_engine(
    model: Transformer, cfg: TrainerConfig, sp_group: dist.ProcessGroup | None = None
) -> DeepSpeedEngine:
    """Wrap ``model`` in ``ModelWithLoss`` and initialise DeepSpeed with the run's optimizer and
    schedule. ``model`` is used as given: the run's transforms (``apply_transforms`` with
    ``trainer.plans.transform_plan``) are applied before, once.

    ``torch.distributed`` must already be initialised (every rank calls this). Under sequence
    parallelism ``sp_group`` is the mesh's SP group (the loss counts tokens over it). The
    returned engine's ``module.model`` is the decoder.
    """
    deepspeed = import_deepspeed()
    module = ModelWithLoss(model, zero_stage=cfg.zero_stage, sp_group=sp_group)
    optimizer = build_optimizer(module, cfg)
    schedule = warmup_cosine_schedule(optimizer, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(cfg)
    )
    return engine


def apply_recipe_optimizer_settings(engine: DeepSpeedEngine, cfg: TrainerConfig) -> None:
    """Put the recipe's peak LR, betas and weight decay back in force after a resume.

    Loading a checkpoint restores the optimizer's param groups and the schedule's base LRs as
    they were saved, so a recipe that changes ``lr`` (or betas, weight decay, and through the
    schedule's factor ``steps``, ``warmup_steps``, ``min_lr``) for the continuation would be
    silently ignored. The schedule keeps its position; the current rate is recomputed as
    ``lr x lr_factor(position)``, the same expression ``LambdaLR`` evaluates, so an unchanged
    recipe continues bit for bit.
    """
    schedule = engine.lr_scheduler
    groups = schedule.optimizer.param_groups  # [decayed matrices, norm gains and biases]
    factor = schedule.lr_lambdas[0](schedule.last_epoch)
    for group, weight_decay in zip(groups, (cfg.weight_decay, 0.0)):
        group.update(
            initial_lr=cfg.lr, lr=cfg.lr * factor, betas=tuple(cfg.betas), weight_decay=weight_decay
        )
    schedule.base_lrs = [cfg.lr for _ in groups]


def global_grad_norm(engine: DeepSpeedEngine) -> float:
    """The pre-clipping gradient norm of the last optimizer step (``inf`` when it was skipped)."""
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)
