"""What every rank runs: ``train_worker(job, report)``, from recipe to final checkpoint.

Order on each rank (DESIGN section 3):

1. join or create the process group (Ray Train and the test harness create it; a plain
   ``python`` call gets a one-process group);
2. ``validate_run`` (the same checks the CLI driver made; nothing is written before they pass),
   then rank 0 writes ``config.yaml``;
3. tokenizer (rank 0 trains it into the run directory when the recipe asks, the others wait and
   load it), vocabulary check, packed datasets and the data-parallel loaders;
4. the decoder (seeded, identical on every rank; ``hf:PATH`` weights when the recipe says so),
   under ``parallel.ulysses x ring > 1`` the mesh and ``parallelize`` (each SP group's ranks
   load the same batches and train on their shards), the DeepSpeed engine;
5. on resume: model, optimizer, schedule and counters from the checkpoint, the loader's
   position from the manifest, this rank's RNG state;
6. the loop; a barrier; the summary.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from longctx.data import PackedLoader, Tokenizer, build_datasets, resolve_tokenizer
from longctx.errors import LongctxError
from longctx.model import Transformer, load_hf
from longctx.parallel.mesh import build_mesh
from longctx.parallel.parallelize import check_recipe_supported, parallelize
from longctx.trainer.checkpoint import TOKENIZER_FILE, load_checkpoint
from longctx.trainer.config import Recipe
from longctx.trainer.engine import (
    apply_recipe_optimizer_settings,
    build_engine,
    select_device,
)
from longctx.trainer.eval_report import TrainingEvaluator, plan_from_recipe
from longctx.trainer.loop import TrainState, train_loop
from longctx.trainer.metrics import MetricsWriter, ProgressDisplay
from longctx.trainer.run_dir import (
    TENSORBOARD_DIR,
    check_vocabulary,
    validate_run,
    write_run_files,
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
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_layout(recipe: Recipe, world: int) -> int:
    """The data-parallel degree of ``world`` ranks under the recipe's layout.

    One-line ``LongctxError`` (the launcher's exit 2) when ``world`` does not fit
    ``dp x ulysses x ring``, when ``parallelize`` could not serve the recipe's attention variant
    or position encoding under its sequence-parallel mode (``check_recipe_supported``), or when
    the recipe asks for long-context evaluation tasks under sequence parallelism (they run the
    whole model on one rank's full sequence, which the parallelized model cannot).
    """
    parallel = recipe.parallel.resolve(world)
    check_recipe_supported(recipe.model, recipe.attention, recipe.positional, parallel)
    if parallel.sp > 1 and recipe.trainer.eval_tasks:
        raise LongctxError(
            f"trainer.eval_tasks {recipe.trainer.eval_tasks} run the model on whole sequences on "
            f"one rank, but parallel.ulysses x ring = {parallel.ulysses} x {parallel.ring} "
            "shards them; set trainer.eval_tasks: [] and evaluate the checkpoint with "
            "'longctx eval' afterwards"
        )
    return parallel.dp


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch alike on every rank, so the model starts identical."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(recipe: Recipe) -> Transformer:
    """The decoder of the recipe: random (``init: scratch``) or with ``hf:PATH`` weights.

    A checkpoint's model is built from the recipe's resolved ``ModelConfig`` (the checkpoint's
    shape plus the recipe's RoPE changes, e.g. a YaRN ``rope_scaling`` for context extension)
    around the checkpoint's weights.
    """
    if recipe.model.init.startswith("hf:"):
        model, _ = load_hf(
            recipe.model.init.removeprefix("hf:"),
            positional=recipe.positional,
            attention=recipe.attention,
            config=recipe.model,
        )
        return model
    return Transformer(recipe.model, recipe.positional, recipe.attention)


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


def train_worker(job: dict, report: Report | None = None) -> dict[str, Any]:
    """Train one rank of the run ``job`` describes; returns the final summary on every rank.

    ``job``: ``recipe`` (``Recipe.model_dump(mode="json")``), ``run_dir``, ``resume`` (None,
    ``"latest"`` or a checkpoint path) and optionally ``launch_id`` (see
    ``run_dir.validate_run``). ``report(metrics, checkpoint_dir_or_None)`` is called on every
    rank after each logged step and each checkpoint. Summary: ``step``, ``tokens_seen``,
    ``loss`` (last logged train loss), ``eval_loss`` (last, or None), ``bad_steps``,
    ``checkpoint`` (the last one written).
    """
    recipe = Recipe.model_validate(job["recipe"])
    run_dir = Path(job["run_dir"])
    created_group = init_distributed()
    try:
        return _train(recipe, run_dir, job.get("resume"), job.get("launch_id"), report)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(
    recipe: Recipe, run_dir: Path, resume: str | None, launch_id: str | None, report: Report | None
) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = recipe.trainer
    dp = check_layout(recipe, world)
    select_device()
    checkpoint = validate_run(recipe, run_dir, resume, launch_id=launch_id)
    dist.barrier()  # every rank has checked the directory before rank 0 writes into it
    if rank == 0:
        write_run_files(recipe, run_dir, launch_id)

    # Sequence parallelism: every rank of an SP group loads the group's batch (same dp rank)
    # and trains on its shard of it (train_loop); the model's attention runs over the group.
    mesh = build_mesh(recipe.parallel) if recipe.parallel.sp > 1 else None
    dp_rank = rank if mesh is None else mesh.dp_rank
    tokenizer = load_run_tokenizer(recipe, run_dir, checkpoint)
    splits = build_datasets(recipe.data, tokenizer)
    train_loader = PackedLoader(splits.train, cfg.micro_batch_size, dp_rank, dp)
    eval_loader = None
    if splits.eval is not None and cfg.eval_every > 0:
        eval_loader = PackedLoader(splits.eval, cfg.micro_batch_size, dp_rank, dp)

    seed_everything(cfg.seed)
    model = build_model(recipe)
    if mesh is not None:
        parallelize(model, mesh.config, mesh)
    engine = build_engine(model, cfg, sp_group=None if mesh is None else mesh.sp_group)
    long_eval = None
    if cfg.eval_tasks and cfg.eval_every > 0:
        long_eval = TrainingEvaluator(
            engine.module.model,
            tokenizer,
            plan_from_recipe(recipe),
            None if splits.corpus is None else splits.corpus.eval_documents,
            run_dir,
            is_writer=rank == 0,
        )
    state = TrainState()
    if checkpoint is not None:
        manifest = load_checkpoint(engine, checkpoint, recipe)
        apply_recipe_optimizer_settings(engine, cfg)
        train_loader.load_state_dict(manifest["data_cursor"])
        state = TrainState(step=manifest["step"], tokens_seen=manifest["tokens_seen"])

    writer = MetricsWriter(
        run_dir / TENSORBOARD_DIR if rank == 0 else None,
        resume_step=None if checkpoint is None else state.step,
    )
    display = ProgressDisplay(cfg.steps, state.step, enabled=rank == 0)
    if checkpoint is not None:
        display.message(
            f"resumed from {checkpoint} at step {state.step}"
            + (f" (already at trainer.steps={cfg.steps})" if state.step >= cfg.steps else "")
        )
    try:
        summary = train_loop(
            engine,
            recipe,
            run_dir,
            train_loader=train_loader,
            eval_loader=eval_loader,
            state=state,
            tokens_per_step=cfg.micro_batch_size * cfg.grad_accum * recipe.data.seq_len * dp,
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
    dist.barrier()
    return summary
