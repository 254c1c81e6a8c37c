"""The training loop: optimizer steps, logging, evaluation, checkpoints, bad-step handling.

One optimizer step is ``grad_accum`` micro-batches, each ``engine(**batch)`` -> loss ->
``engine.backward`` -> ``engine.step`` (DeepSpeed applies the update on the last one). The loop
runs every rank in lockstep: everything that decides control flow (a step was skipped, a log,
eval or checkpoint step) is the same on all ranks, so collectives always match.

A step whose gradient norm is not finite (a non-finite loss makes one) is skipped by the
optimizer: weights, optimizer state and LR schedule are left as they were, the step still
counts (its data is consumed), and ``trainer.max_bad_steps`` consecutive skipped steps stop the
run with a ``LongctxError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from longctx.checkpoint.store import save_checkpoint
from longctx.errors import LongctxError
from longctx.parallel.batch import Batch, prepare_batch
from longctx.parallel.loss import scored_token_count, world_mean_scale
from longctx.trainer.engine import global_grad_norm
from longctx.trainer.metrics import (
    MetricsWriter,
    ProgressDisplay,
    peak_memory_gib,
    timed_phase,
)
from longctx.trainer.plans import batch_transform_for

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from longctx.config.recipe import Recipe
    from longctx.data import PackedLoader
    from longctx.parallel.mesh import ParallelMesh

Report = Callable[[dict, "str | None"], None]
# The long-context evaluation (eval_report.TrainingEvaluator): (step, TensorBoard writer or
# None) -> scalars; called on every rank at each eval step.
LongEval = Callable[[int, Any], dict[str, float]]


@dataclass
class TrainState:
    """Counters that survive a resume (``step`` and ``tokens_seen`` live in the manifest)."""

    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0
    consecutive_bad: int = 0


@dataclass
class StepResult:
    """One optimizer step: the sum of this rank's micro-batch losses, whether the update was
    applied (False: skipped for a non-finite gradient) and the pre-clipping gradient norm."""

    loss_sum: Tensor
    micro_batches: int
    applied: bool
    grad_norm: float


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with its tensors on ``device`` (plain values such as ``rope_seq_len`` kept)."""
    return {
        name: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
        for name, value in batch.items()
    }


def train_step(engine: DeepSpeedEngine, batches: Iterator[Batch], grad_accum: int) -> StepResult:
    """Run ``grad_accum`` micro-batches through forward, backward and the optimizer step."""
    losses = []
    for _ in range(grad_accum):
        loss = engine(**to_device(next(batches), engine.device))  # scalar
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())
    return StepResult(
        loss_sum=torch.stack(losses).sum(),
        micro_batches=grad_accum,
        applied=engine.was_step_applied(),
        grad_norm=global_grad_norm(engine),
    )


@torch.no_grad()
def eval_loss(
    engine: DeepSpeedEngine,
    batches: Iterable[Batch],
    num_batches: int,
    sp_group: dist.ProcessGroup | None = None,
) -> float:
    """Token-mean cross-entropy over ``num_batches`` micro-batches per rank, over all ranks.

    ``batches`` are model inputs from ``prepare_batch``. Every scored token weighs the same:
    each micro-batch's mean loss is turned back into a sum with its scored-token count before
    the all-rank reduction. Under sequence parallelism
    (``sp_group``: the batches are this rank's shards) the engine returns ``sp x`` this rank's
    share of its sequence's loss over the sequence's token count ``n``; each of the ``sp`` ranks
    adds ``value x n / sp`` (its NLL sum) and ``n / sp`` tokens, so the group adds its sequence
    once.
    """
    engine.eval()
    sp = world_mean_scale(sp_group)
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)  # [nll sum, tokens]
    for batch in islice(batches, num_batches):
        batch = to_device(batch, engine.device)
        scored = scored_token_count(batch["labels"], sp_group) / sp
        totals += torch.stack([engine(**batch).double() * scored, scored])
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


class IntervalStats:
    """Accumulates the steps between two log lines into the logged averages.

    Under sequence parallelism a rank's loss is ``sp x`` its share of its sequence's loss
    (``ModelWithLoss``); the all-rank sum then holds each sequence loss ``sp`` times, once per
    micro-batch count of its ``sp`` ranks, so the logged mean is the true loss.

    The loss sum stays on the engine's device (no host sync per step; NCCL reduces device
    tensors only)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.micro_batches = 0
        self.steps = 0
        self.seconds = 0.0
        self.tokens = 0

    def add(self, result: StepResult, seconds: float, tokens: int) -> None:
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        if result.applied:  # a skipped step's loss is not finite; it would poison the mean
            self.loss_sum += result.loss_sum.double()
            self.micro_batches += result.micro_batches

    def summary(self) -> dict[str, float]:
        """Loss averaged over all ranks' applied micro-batches (NaN when every step of the
        interval was skipped), step time and throughput of this rank's view."""
        count = torch.tensor(float(self.micro_batches), dtype=torch.float64, device=self.device)
        totals = torch.stack([self.loss_sum, count])  # [loss sum, micro-batches]
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, micro_batches = totals.tolist()
        return {
            "loss": loss_sum / micro_batches if micro_batches > 0 else float("nan"),
            "step_time_s": self.seconds / self.steps,
            "tokens_per_s": self.tokens / self.seconds,
        }


def _check_bad_steps(state: TrainState, result: StepResult, max_bad_steps: int) -> None:
    if result.applied:
        state.consecutive_bad = 0
        return
    state.bad_steps += 1
    state.consecutive_bad += 1
    if state.consecutive_bad >= max_bad_steps:
        raise LongctxError(
            f"{state.consecutive_bad} consecutive optimizer steps (up to step {state.step}) had a "
            f"non-finite gradient norm ({result.grad_norm}) and were skipped, reaching "
            f"trainer.max_bad_steps={max_bad_steps}; lower trainer.lr, check the data, or "
            "resume from an earlier checkpoint with --resume PATH"
        )


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train_loop(
    engine: DeepSpeedEngine,
    recipe: Recipe,
    run_dir: Path,
    *,
    end_step: int,
    train_loader: PackedLoader,
    eval_loader: PackedLoader | None,
    state: TrainState,
    tokens_per_step: int,
    tokenizer_bytes: bytes | None,
    writer: MetricsWriter,
    display: ProgressDisplay,
    report: Report | None,
    long_eval: LongEval | None = None,
    mesh: ParallelMesh | None = None,
) -> dict[str, Any]:
    """Train from ``state.step`` to the global step ``end_step`` (a stage's ``Stage.end_step``;
    ``recipe.trainer.steps`` counts the stage's own steps); returns the final summary
    ``{step, tokens_seen, loss, eval_loss, bad_steps, checkpoint}`` (the same on every rank).

    Logs every ``log_every`` steps, evaluates every ``eval_every`` steps (and at the end) when
    ``eval_loader`` is given, checkpoints every ``ckpt_every`` steps and at the end. ``report``
    is called on every rank with the logged metrics and the checkpoint directory (or None).
    ``long_eval`` (when given) runs at the eval steps too; its scalars join the logged metrics.
    Every loader batch (training and evaluation) goes through ``prepare_batch`` with the
    recipe's batch transform (``batch_transform_for``); with ``mesh`` (sequence parallelism) the
    loader batch is the SP group's [B, T] batch and this rank trains on its shard of it;
    ``tokens_per_step`` counts each SP group once.
    """
    cfg = recipe.trainer
    transform = batch_transform_for(recipe)

    def prepare(batch: dict[str, Tensor]) -> Batch:
        return prepare_batch(batch, mesh=mesh, transform=transform)

    batches = map(prepare, iter(train_loader))
    sp_group = None if mesh is None else mesh.sp_group
    device = torch.device(engine.device)
    interval = IntervalStats(device)
    summary: dict[str, Any] = {"loss": None, "eval_loss": None, "checkpoint": None}
    while state.step < end_step:
        started = time.perf_counter()
        lr = float(engine.get_lr()[0])  # the rate this step uses (the schedule moves after it)
        result = train_step(engine, batches, cfg.grad_accum)
        state.step += 1
        state.tokens_seen += tokens_per_step
        interval.add(result, time.perf_counter() - started, tokens_per_step)
        _check_bad_steps(state, result, cfg.max_bad_steps)

        values: dict[str, float] = {}
        if _due(state.step, cfg.log_every, end_step):
            values = interval.summary()
            values.update(
                lr=lr,
                grad_norm=result.grad_norm,
                peak_memory_gib=peak_memory_gib(device),
                bad_steps=float(state.bad_steps),
            )
            interval.reset()
            summary["loss"] = values["loss"]
        if eval_loader is not None and _due(state.step, cfg.eval_every, end_step):
            eval_batches = map(prepare, eval_loader.epoch_batches())
            values["eval_loss"] = eval_loss(engine, eval_batches, cfg.eval_batches, sp_group)
            summary["eval_loss"] = values["eval_loss"]
        if long_eval is not None and _due(state.step, cfg.eval_every, end_step):
            values.update(long_eval(state.step, writer.writer))
        checkpoint = None
        if _due(state.step, cfg.ckpt_every, end_step):
            save_started = time.perf_counter()
            checkpoint = timed_phase("save", run_dir)(save_checkpoint)(
                engine,
                run_dir,
                step=state.step,
                tokens_seen=state.tokens_seen,
                data_cursor=train_loader.state_dict(),
                recipe=recipe,
                tokenizer_bytes=tokenizer_bytes,
            )
            summary["checkpoint"] = str(checkpoint)
            values["checkpoint_save_s"] = time.perf_counter() - save_started
        writer.write(state.step, values)
        display.update(state.step, values)
        if checkpoint is not None:
            display.message(
                f"checkpoint {checkpoint} (save took {values['checkpoint_save_s']:.2f} s)"
            )
        if report is not None and (values or checkpoint is not None):
            metrics = {"step": state.step, "tokens_seen": state.tokens_seen, **values}
            report(metrics, None if checkpoint is None else str(checkpoint))
    return {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "bad_steps": state.bad_steps,
        **summary,
    }
