"""What every rank runs: ``train_worker(job, report)``, from recipe to final checkpoint.

One call trains one stage of a staged recipe (``trainer/stages.py``; a recipe without stages
is one stage). Order on each rank (DESIGN section 3):

1. join or create the process group (Ray Train and the test harness create it; a plain
   ``python`` call gets a one-process group);
2. ``validate_run`` (the same checks the CLI driver made; nothing is written before they pass),
   then rank 0 writes ``config.yaml``;
3. tokenizer (rank 0 trains it into the run directory when the recipe asks, the others wait and
   load it), vocabulary check, packed datasets over the corpora prepared in ``RUN/data``
   (``load_run_data``: rank 0 first, the others memory-map after a barrier) and the
   data-parallel loaders;
4. the decoder (seeded, identical on every rank; ``hf:PATH`` weights when the recipe says so,
   the previous stage's final weights when a new stage starts), under ``parallel.ulysses x
   ring > 1`` the mesh (each SP group's ranks load the same batches and train on their
   shards), then ONE ``apply_transforms`` call (sequence parallelism, tiled MLP, activation
   checkpointing and offload, as ``transform_plan`` reads them from the recipe), the DeepSpeed
   engine (a fresh optimizer and LR schedule per stage);
5. on resume inside a stage: model, optimizer, schedule and counters from the checkpoint, the
   loader's position from the manifest, this rank's RNG state;
6. the loop; a barrier; the summary.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from longctx.checkpoint.adapter_base import BASE_KEY, base_reference, check_adapter_base
from longctx.checkpoint.run_dir import (
    PREPARED_DATA_DIR,
    TENSORBOARD_DIR,
    check_vocabulary,
    validate_run,
    write_run_files,
)
from longctx.checkpoint.saved_model import build_model
from longctx.checkpoint.store import TOKENIZER_FILE, load_checkpoint, read_manifest
from longctx.config.recipe import Recipe
from longctx.config.stages import Stage, plan_stages
from longctx.data import (
    DataConfig,
    DataSplits,
    PackedLoader,
    Tokenizer,
    build_datasets,
    resolve_tokenizer,
)
from longctx.errors import LongctxError
from longctx.eval.report import TrainingEvaluator, perplexity_documents, plan_from_recipe
from longctx.model import Transformer
from longctx.model.adapters import attach_adapters
from longctx.parallel.accelerator import select_device
from longctx.parallel.apply import apply_transforms
from longctx.parallel.mesh import build_mesh
from longctx.parallel.parallelize import check_recipe_supported
from longctx.parallel.ports import free_port
from longctx.parallel.zero_init import partition_new_parameters
from longctx.trainer.engine import (
    apply_recipe_optimizer_settings,
    build_engine,
    deepspeed_config,
)
from longctx.trainer.job import TrainJob
from longctx.trainer.loop import TrainState, train_loop
from longctx.trainer.metrics import MetricsWriter, ProgressDisplay, timed_phase
from longctx.trainer.plans import batch_transform_for, transform_plan
from longctx.trainer.stages import (
    ResumePoint,
    check_stage_record,
    resume_point,
    stage_start_checkpoint,
    write_stage_record,
)

Report = Callable[[dict, "str | None"], None]


def init_distributed() -> bool:
    """Join the default process group, creating it from the environment when nobody has yet
    (gloo on CPU, NCCL on CUDA). Without ``WORLD_SIZE`` in the environment this is a
    single-process run on a free local port. Returns True when this call created the group (the
    worker then also destroys it)."""
    if dist.is_initialized():
        return False
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return True


def check_layout(recipe: Recipe, world: int) -> int:
    """The data-parallel degree of ``world`` ranks under the recipe's layout.

    One-line ``LongctxError`` (the launcher's exit 2) when ``world`` does not fit
    ``dp x ulysses x ring``, when ``parallelize`` could not serve the recipe's attention variant
    or position encoding under its sequence-parallel mode (``check_recipe_supported``).
    """
    parallel = recipe.parallel.resolve(world)
    check_recipe_supported(recipe.model, recipe.attention, recipe.positional, parallel)
    return parallel.dp


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch alike on every rank, so the model starts identical."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_run_tokenizer(recipe: Recipe, run_dir: Path, checkpoint: Path | None) -> Tokenizer:
    """Rank 0 resolves the tokenizer first (training it into the run directory when the recipe
    has no path); the other ranks wait, then load the same file.

    A run resumed from a checkpoint whose recipe trained its own tokenizer uses the checkpoint's
    copy, so token ids mean what they meant when the weights were trained.
    """
    if dist.get_rank() == 0:
        run_copy = run_dir / TOKENIZER_FILE
        saved = None if checkpoint is None else checkpoint / TOKENIZER_FILE
        if (
            recipe.data.tokenizer.path is None
            and not run_copy.exists()
            and saved is not None
            and saved.is_file()
        ):
            shutil.copyfile(saved, run_copy)
        tokenizer = resolve_tokenizer(recipe.data, str(run_dir))
    dist.barrier()
    if dist.get_rank() != 0:
        tokenizer = resolve_tokenizer(recipe.data, str(run_dir))
    check_vocabulary(tokenizer.vocab_size, recipe, tokenizer.path)
    return tokenizer


def load_run_data(data: DataConfig, tokenizer: Tokenizer, run_dir: Path) -> DataSplits:
    """The splits, every rank memory-mapping the same prepared corpora. Raw ``data.sources``
    are prepared into ``RUN/data`` once: normally the CLI driver did it before the workers
    started (``check_data``) and rank 0 finds it there; when it could not (a tokenizer the
    run trains) rank 0 prepares now. The other ranks wait for rank 0, then open what it
    found or wrote (the run directory is shared storage on a multi-node cluster)."""
    data_dir = run_dir / PREPARED_DATA_DIR
    if dist.get_rank() == 0:
        splits = build_datasets(data, tokenizer, data_dir)
    dist.barrier()
    if dist.get_rank() != 0:
        splits = build_datasets(data, tokenizer, data_dir)
    return splits


def train_worker(job: TrainJob | dict, report: Report | None = None) -> dict[str, Any]:
    """Train one rank of the run ``job`` describes; returns the final summary on every rank.

    ``job``: a ``TrainJob`` (or its JSON form, ``TrainJob.to_dict()``). One call trains one
    stage (``trainer.stages``): the stage the resume point names (``stages.resume_point``); a
    recipe without stages is one stage. When that stage lies past ``job.last_stage`` (a group
    Ray Train restarted after the stage's final checkpoint) nothing is trained.
    ``report(metrics, checkpoint_dir_or_None)`` is called on every rank after each logged step
    and each checkpoint. Summary: ``step`` (global), ``tokens_seen``, ``loss`` (last logged
    train loss), ``eval_loss`` (last, or None), ``bad_steps``, ``checkpoint`` (the last one
    written), ``stage`` (the index of the stage trained) and ``stages`` (their count).
    """
    job = TrainJob.coerce(job)
    created_group = init_distributed()
    try:
        return _train(job, report)
    finally:
        if created_group:
            dist.destroy_process_group()


def with_layout(recipe: Recipe, world: int) -> Recipe:
    """``recipe`` with its ``parallel.dp`` resolved for ``world`` ranks (``dp: auto``)."""
    return recipe.model_copy(update={"parallel": recipe.parallel.resolve(world)})


def _untrained_summary(stage: Stage, checkpoint: Path) -> dict[str, Any]:
    """The summary of a launch whose stages are already trained: the checkpoint's counters."""
    manifest = read_manifest(checkpoint)
    return {
        "step": manifest["step"],
        "tokens_seen": manifest["tokens_seen"],
        "bad_steps": 0,
        "loss": None,
        "eval_loss": None,
        "checkpoint": str(checkpoint),
        "stage": stage.index - 1,
        "stages": stage.count,
    }


def check_adapter_resume(stages: list[Stage], point: ResumePoint, run_dir: Path) -> None:
    """Refuse (one line) to resume an adapter checkpoint exactly onto another base than the one
    it was trained on, or with adapters switched on or off (the driver runs it before Ray
    starts, each rank again)."""
    if not point.resumes_exactly:
        return
    saved = read_manifest(point.checkpoint).get(BASE_KEY)
    if point.stage.recipe.adapters is None:
        if saved is not None:
            raise LongctxError(
                f"checkpoint {point.checkpoint} holds adapters (peft) but {point.stage.label()} "
                "trains every weight; resume it with the recipe's peft section as it was"
            )
        return
    if saved is None:
        raise LongctxError(
            f"checkpoint {point.checkpoint} holds full weights but {point.stage.label()} trains "
            "adapters (peft); resume it with the recipe it was trained with"
        )
    base = stage_start_checkpoint(stages, point.stage, run_dir)
    check_adapter_base(saved, base_reference(point.stage.recipe, base), point.checkpoint)


def build_stage_model(
    stages: list[Stage],
    point: ResumePoint,
    run_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    zero3: dict[str, Any] | None = None,
) -> Transformer:
    """The decoder ``point.stage`` trains, in ``dtype``, before any transform (seed torch
    first).

    Full fine-tuning: the recipe's ``model.init``, or at a new stage the previous stage's final
    weights under this stage's settings (RoPE scaling, layout), built partitioned when
    ``zero3`` (the run's DeepSpeed config) is given; an exact resume then overwrites every
    weight. Adapters (``peft``): the stage's frozen base (the recipe's ``model.init`` for the
    first stage, else the previous stage's final weights, merged when they were adapters),
    built the same way (partitioned under ZeRO-3), with fresh LoRA layers drawn from the
    stage's ``trainer.seed`` alone (so ``A`` does not depend on how the base was built); the
    worker's ``load_checkpoint`` fills them on an exact resume. peft reads a partitioned
    ``Linear``'s shape from its attributes, so it wraps it as it wraps a whole one; the LoRA
    matrices are created whole (small: ``r x (in + out)`` per layer) and partitioned at once
    (``partition_new_parameters``). The base's reference goes into every checkpoint's
    manifest (``decoder.adapter_base``).
    """
    stage_recipe = point.stage.recipe
    if stage_recipe.adapters is None:
        weights = point.checkpoint if point.new_stage else None
        return build_model(stage_recipe, weights=weights, dtype=dtype, zero3=zero3)
    base = stage_start_checkpoint(stages, point.stage, run_dir)
    model = build_model(stage_recipe, weights=base, dtype=dtype, zero3=zero3)
    with torch.random.fork_rng():
        torch.manual_seed(stage_recipe.trainer.seed)
        attach_adapters(model, stage_recipe.adapters)
    if zero3 is not None:
        partition_new_parameters(model)
    model.adapter_base = base_reference(stage_recipe, base)
    return model


def _train(job: TrainJob, report: Report | None) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    recipe, run_dir = job.recipe, Path(job.run_dir)
    resume, launch_id = job.resume, job.launch_id
    stages = plan_stages(recipe)
    point = resume_point(stages, run_dir, resume)
    stage = point.stage
    stage_recipe = with_layout(stage.recipe, world)
    cfg = stage_recipe.trainer
    dp = check_layout(stage_recipe, world)
    select_device()
    # The checkpoint is checked against the recipe of the stage that wrote it (its layout).
    checkpoint = validate_run(point.checkpoint_stage.recipe, run_dir, resume, launch_id=launch_id)
    check_stage_record(stages, run_dir, point)
    check_adapter_resume(stages, point, run_dir)
    last_stage = job.last_stage
    if checkpoint is not None and last_stage is not None and stage.index > last_stage:
        return _untrained_summary(stage, checkpoint)
    dist.barrier()  # every rank has checked the directory before rank 0 writes into it
    if rank == 0:
        write_run_files(recipe, run_dir, launch_id)
        if recipe.stages:
            write_stage_record(stages, run_dir, stage)

    # Sequence parallelism: every rank of an SP group loads the group's batch (same dp rank)
    # and trains on its shard of it (train_loop); the model's attention runs over the group.
    mesh = build_mesh(stage_recipe.parallel) if stage_recipe.parallel.sp > 1 else None
    dp_rank = rank if mesh is None else mesh.dp_rank
    tokenizer = load_run_tokenizer(stage_recipe, run_dir, checkpoint)
    splits = load_run_data(stage_recipe.data, tokenizer, run_dir)
    train_loader = PackedLoader(splits.train, cfg.micro_batch_size, dp_rank, dp)
    eval_loader = None
    if splits.eval is not None and cfg.eval_every > 0:
        eval_loader = PackedLoader(splits.eval, cfg.micro_batch_size, dp_rank, dp)

    seed_everything(cfg.seed)
    # Under ZeRO-3 the model (or an adapter run's frozen base) is built partitioned whatever
    # its weights (scratch, Hugging Face, the previous stage): each rank computes or reads only
    # its share. Otherwise one copy in the training dtype.
    model = timed_phase("init", run_dir)(build_stage_model)(
        stages,
        point,
        run_dir,
        dtype=torch.bfloat16 if cfg.dtype == "bf16" else torch.float32,
        zero3=deepspeed_config(cfg) if cfg.zero_stage == 3 else None,
    )
    apply_transforms(model, transform_plan(cfg, mesh))  # the one place the model changes
    engine = build_engine(model, cfg, sp_group=None if mesh is None else mesh.sp_group)
    long_eval = None
    if cfg.eval_tasks and cfg.eval_every > 0:
        plan = plan_from_recipe(stage_recipe)
        long_eval = TrainingEvaluator(
            engine.module.model,
            tokenizer,
            plan,
            perplexity_documents(
                plan,
                stage_recipe.data,
                tokenizer,
                None if splits.corpus is None else splits.corpus.eval_documents,
            ),
            run_dir,
            is_writer=rank == 0,
            mesh=mesh,
            transform=batch_transform_for(stage_recipe),
        )
    state = TrainState()
    restore_s = 0.0
    if point.resumes_exactly:
        started = time.perf_counter()
        manifest = timed_phase("restore", run_dir)(load_checkpoint)(
            engine, checkpoint, stage_recipe
        )
        restore_s = time.perf_counter() - started
        apply_recipe_optimizer_settings(engine, cfg)
        train_loader.load_state_dict(manifest["data_cursor"])
        state = TrainState(step=manifest["step"], tokens_seen=manifest["tokens_seen"])
    elif checkpoint is not None:
        manifest = read_manifest(checkpoint)
        state = TrainState(step=manifest["step"], tokens_seen=manifest["tokens_seen"])

    writer = MetricsWriter(
        run_dir / TENSORBOARD_DIR if rank == 0 else None,
        resume_step=None if checkpoint is None else state.step,
        trackers=stage_recipe.trainer.trackers,
        run_name=stage_recipe.name,
    )
    display = ProgressDisplay(stage.end_step, state.step, enabled=rank == 0, events=job.events)
    if splits.train.mixture_description:
        display.message(splits.train.mixture_description)
    if stage.count > 1:
        display.message(
            f"{stage.label()}: steps {stage.start_step + 1}-{stage.end_step}, data.seq_len "
            f"{stage_recipe.data.seq_len}, {stage_recipe.parallel.describe()}"
            + (f", weights from {checkpoint}" if point.new_stage and checkpoint else "")
        )
    if point.resumes_exactly:
        display.message(
            f"resumed from {checkpoint} at step {state.step}"
            + (
                f" (already at the end step {stage.end_step} of {stage.label()})"
                if state.step >= stage.end_step
                else ""
            )
            + f"; checkpoint restore took {restore_s:.2f} s"
        )
    try:
        summary = train_loop(
            engine,
            stage_recipe,
            run_dir,
            end_step=stage.end_step,
            train_loader=train_loader,
            eval_loader=eval_loader,
            state=state,
            tokens_per_step=cfg.micro_batch_size * cfg.grad_accum * stage_recipe.data.seq_len * dp,
            tokenizer_bytes=tokenizer.model_bytes(),
            writer=writer,
            display=display,
            report=report,
            long_eval=long_eval,
            mesh=mesh,
        )
    finally:
        writer.close()
        display.close()
    if summary["checkpoint"] is None and checkpoint is not None:
        summary["checkpoint"] = str(checkpoint)  # resumed at the last step: nothing new written
    summary.update(stage=stage.index, stages=stage.count)
    dist.barrier()
    return summary
