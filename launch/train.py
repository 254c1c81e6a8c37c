"""``longctx train``: run a validated recipe on Ray Train workers, then say where its outputs are.

The driver (this module) rejects every bad input it can see before a worker starts, with the
one-line ``LongctxError`` the CLI turns into exit code 2: the world layout against ``--workers``,
the run directory and ``--resume`` target (``trainer.run_dir.validate_run``, the same check each
worker repeats), and the CPUs Ray has (``launch.ray_cluster``). Then Ray Train runs the workers
(``launch.ray_train``), one launch per stage of a staged recipe, each handed a ``TrainJob``.
The workers' own output (DeepSpeed's included) goes to ``RUN/logs/rank_N.log``; the terminal
shows rank 0's progress, replayed by the driver from ``RUN/logs/progress.jsonl``
(``launch.progress``), and, at the end, the loss curve's ends and where the checkpoints and
TensorBoard logs are. A failure is one ``error:`` line naming the rank.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console

from longctx.checkpoint.run_dir import TENSORBOARD_DIR, validate_run
from longctx.checkpoint.store import CHECKPOINTS_DIR
from longctx.errors import LongctxError
from longctx.eval.report import EVAL_DIR, eval_directory
from longctx.launch.progress import EVENTS_FILE, follow_progress, logs_dir
from longctx.launch.ray_cluster import ray_cluster
from longctx.launch.ray_train import fit_on_ray, new_launch_id
from longctx.positional.rope import rope_type_of
from longctx.trainer.job import TrainJob

if TYPE_CHECKING:
    from longctx.config.recipe import Recipe
    from longctx.config.stages import Stage

TRAINING_FAILED = 1
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
# Prompts scored by the passkey check at the end of a local run that trains on passkey.
PASSKEY_EXAMPLES = 50
# Prompts per row of the before / after passkey tables of a staged run (20 per depth): enough
# that the 95% interval of a row's mean is about +-10 points.
STAGE_PASSKEY_EXAMPLES = 100


def failure_line(error: BaseException) -> str:
    """One line for a failed run: the first failing rank and the last line of its error (the
    exception type and message; the full tracebacks are in the workers' log files)."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        rank = min(failures)
        return f"training failed on rank {rank}: {_last_line(failures[rank])}"
    cause = getattr(error, "controller_failure", error)
    return f"training failed: {_last_line(cause)}"


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _is_training_failure(error: BaseException) -> bool:
    from ray.train import TrainingFailedError

    return isinstance(error, TrainingFailedError)


def loss_curve(tensorboard_dir: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` of every ``train/loss`` point in the run's TensorBoard events (all
    sessions of a resumed run, by step), or [] when there are none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard_dir.is_dir():
        return []
    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0}).Reload()
    if "train/loss" not in events.Tags()["scalars"]:
        return []
    return sorted(
        (event.step, event.value)
        for event in events.Scalars("train/loss")
        if math.isfinite(event.value)
    )


def _short(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def print_outcome(
    console: Console,
    run_dir: Path,
    summary: dict[str, Any],
    seconds: float,
    next_command: str,
    passkey: str | None = None,
    next_label: str = "continue",
) -> None:
    """The end of a run on the terminal: steps, loss from first to last logged step, the
    evaluation loss, the passkey check's line (when made), where the checkpoints and
    TensorBoard logs are, and the command to run next (``next_label``: what it does)."""
    console.print(f"done in {_duration(seconds)}: trained to step {summary['step']}")
    curve = loss_curve(run_dir / TENSORBOARD_DIR)
    if curve:
        (first_step, first), (last_step, last) = curve[0], curve[-1]
        console.print(
            f"  train loss:   {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}"
        )
    if summary.get("eval_loss") is not None:
        console.print(f"  eval loss:    {summary['eval_loss']:.3f}")
    if passkey is not None:
        console.print(f"  {passkey}")
    checkpoint = summary.get("checkpoint")
    latest = f" (latest: {Path(checkpoint).name})" if checkpoint else ""
    console.print(f"  checkpoints:  {_short(run_dir / CHECKPOINTS_DIR)}{latest}")
    console.print(f"  tensorboard:  tensorboard --logdir {_short(run_dir / TENSORBOARD_DIR)}")
    console.print(f"  {next_label + ':':<13} {next_command}")


def continue_command(args: argparse.Namespace, steps: int) -> str:
    """The command that continues this run for as many steps again: the same recipe, overrides,
    workers and address, ``--resume latest`` and ``trainer.steps`` doubled."""
    words = _rerun_words(args, drop_steps=True)
    words += ["--resume", "latest", "--set", f"trainer.steps={2 * steps}"]
    return shlex.join(words)


def _rerun_words(args: argparse.Namespace, *, drop_steps: bool) -> list[str]:
    """``longctx train`` with this invocation's recipe, ``--set`` overrides (without
    ``trainer.steps`` when ``drop_steps``), workers, address and placement."""
    words = ["longctx", "train", args.recipe]
    for assignment in args.set:
        if not (drop_steps and assignment.split("=", 1)[0].strip() == "trainer.steps"):
            words += ["--set", assignment]
    if args.workers is not None:
        words += ["--workers", str(args.workers)]
    if args.address is not None:
        words += ["--address", args.address]
    if getattr(args, "placement", "PACK") != "PACK":
        words += ["--placement", args.placement]
    return words


def run_training(recipe: Recipe, args: argparse.Namespace) -> int:
    """``longctx train`` after the recipe is loaded: validate, train on Ray, report.

    ``args``: ``recipe`` (its path), ``set`` (the overrides), ``workers`` (None: the recipe's
    layout), ``address`` (None: embedded Ray), ``placement`` (Ray placement strategy),
    ``resume`` (None, ``latest`` or a path), ``until_stage`` (None: every stage; N: stop after
    stage N of a staged recipe). Returns the exit code: 0 when training finished, 1 when the
    workers failed more often than ``trainer.max_failures`` allows, 130 on Ctrl-C. Bad input
    raises ``LongctxError`` before anything starts.

    Stages (``trainer/stages.py``) run one Ray Train launch each, in order, from the stage the
    resume point names; each stage gets its own layout (``--workers`` ranks, or the stage's
    ``dp x ulysses x ring``) and starts from the previous stage's final checkpoint. A local run
    that trains passkey prints, around each stage after the first, the passkey table at that
    stage's length before (the previous stage's weights under its settings) and after it.
    """
    from longctx.config.stages import plan_stages
    from longctx.trainer.stages import check_stage_record, resume_point
    from longctx.trainer.worker import check_adapter_resume, check_layout

    started = time.monotonic()
    stages = plan_stages(recipe)
    last = _last_stage(stages, getattr(args, "until_stage", None))
    layouts = [stage.recipe.parallel.resolve(args.workers) for stage in stages]
    for stage, layout in zip(stages, layouts):
        check_layout(stage.recipe, layout.world)
    if not recipe.stages:  # config.yaml keeps the resolved layout of an unstaged run
        recipe = recipe.model_copy(update={"parallel": layouts[0]})
    run_dir = Path(recipe.trainer.run_dir).resolve()
    point = resume_point(stages, run_dir, args.resume)
    validate_run(point.checkpoint_stage.recipe, run_dir, args.resume)
    check_stage_record(stages, run_dir, point)
    check_adapter_resume(stages, point, run_dir)
    console = Console(highlight=False, soft_wrap=True, markup=False)  # paths may hold [ ]
    if point.stage.index > last:
        console.print(
            f"stages 1-{last + 1} of '{recipe.name}' are already trained ({point.checkpoint}); "
            f"continue with {_stage_command(args)}"
        )
        return 0
    launch_id = new_launch_id()
    logs = logs_dir(run_dir)
    events = logs / EVENTS_FILE
    job = TrainJob(
        recipe, str(run_dir), resume=args.resume, launch_id=launch_id, events=str(events)
    )
    todo = stages[point.stage.index : last + 1]
    world = max(layouts[stage.index].world for stage in todo)
    local = args.address is None
    placement = getattr(args, "placement", "PACK")
    with ray_cluster(args.address, world, placement, worker_output=False) as resources:
        console.print(
            f"longctx: training '{recipe.name}' on {layouts[todo[0].index].describe()}; "
            f"worker output in {_short(logs)}/rank_N.log"
        )
        console.print(f"  workers:  {resources.description}")
        console.print(f"  run dir:  {_short(run_dir)}")
        boundary = point.checkpoint if point.new_stage else None
        for stage in todo:
            layout = layouts[stage.index]
            if len(stages) > 1:
                console.print(_stage_line(stage, layout.describe()))
            if boundary is not None and local and _trains_passkey(stage):
                before = run_dir / EVAL_DIR / f"before_stage_{stage.index + 1}"
                console.print(
                    f"passkey before {stage.label()} (stage {stage.index}'s final weights at "
                    f"this stage's length):"
                )
                console.print(stage_passkey_table(boundary, stage, before, before=True))
            try:
                with follow_progress(events, console.file):
                    run = fit_on_ray(
                        job.for_stage(stage.index),
                        replace(resources, num_workers=layout.world),
                        launch_id=launch_id
                        if len(stages) == 1
                        else f"{launch_id}-s{stage.index + 1}",
                        max_failures=recipe.trainer.max_failures,
                        workdir=os.getcwd() if local else None,
                        log_dir=logs,
                    )
            except KeyboardInterrupt:
                console.print(f"interrupted; continue with --resume latest ({_short(run_dir)})")
                return INTERRUPTED
            except Exception as error:
                if not _is_training_failure(error):
                    raise
                console.print(f"error: {failure_line(error)}")
                console.print(
                    f"  (the workers' tracebacks are in {_short(logs)}/rank_N.log; checkpoints "
                    f"so far are in {_short(run_dir / CHECKPOINTS_DIR)}, continue with "
                    "--resume latest)"
                )
                return TRAINING_FAILED
            boundary = Path(run.summary["checkpoint"])
            job = job.resuming(boundary)
            if stage.index > 0 and local and _trains_passkey(stage):
                console.print(f"passkey after {stage.label()}:")
                after = eval_directory(run_dir, run.summary["step"])
                console.print(stage_passkey_table(boundary, stage, after))
    passkey = None
    if len(stages) == 1 and local and _trains_passkey(stages[0]):
        # A local run's final weights fit this machine; on a cluster they may not fit the driver.
        from longctx.eval.passkey_check import passkey_line

        passkey = passkey_line(run.summary["checkpoint"], PASSKEY_EXAMPLES)
    next_label, next_command = "continue", continue_command(args, run.summary["step"])
    if last < len(stages) - 1:
        next_command = _stage_command(args)
        console.print(f"stopped after {stages[last].label()} (--until-stage {last + 1})")
    elif len(stages) > 1:
        next_label = "export"
        next_command = f"longctx export {_short(run_dir)} --hf {_short(run_dir)}-hf"
    seconds = time.monotonic() - started
    print_outcome(console, run_dir, run.summary, seconds, next_command, passkey, next_label)
    return 0


def _last_stage(stages: list[Stage], until_stage: int | None) -> int:
    """The index of the last stage to train: ``--until-stage N`` (1-based) or the last one."""
    if until_stage is None:
        return len(stages) - 1
    if not 1 <= until_stage <= len(stages):
        raise LongctxError(
            f"--until-stage {until_stage} is not a stage of this recipe, which has "
            f"{len(stages)}; pass a number from 1 to {len(stages)}"
        )
    return until_stage - 1


def _stage_line(stage: Stage, layout: str) -> str:
    """``stage 2/2 'extend': steps 601-800, seq_len 1024, YaRN x4, dp 1 x ulysses 1 x ring 2``."""
    scaling = stage.recipe.model.rope_scaling
    rope = "" if scaling is None else f", rope_scaling {rope_type_of(scaling)}"
    if scaling is not None and "factor" in scaling:
        rope += f" x{scaling['factor']:g}"
    return (
        f"{stage.label()}: steps {stage.start_step + 1}-{stage.end_step}, seq_len "
        f"{stage.recipe.data.seq_len}{rope}, {layout}"
    )


def _stage_command(args: argparse.Namespace) -> str:
    """The command that trains the remaining stages: the same one with ``--resume latest`` and
    no ``--until-stage``."""
    words = _rerun_words(args, drop_steps=False)
    return shlex.join([*words, "--resume", "latest"])


def _trains_passkey(stage: Stage) -> bool:
    """Whether the driver prints passkey results for ``stage`` (it trains on passkey and the
    recipe leaves ``trainer.passkey_check`` on)."""
    recipe = stage.recipe
    return recipe.trainer.passkey_check and bool(recipe.data.active_tasks().get("passkey"))


def stage_passkey_table(checkpoint: Path, stage: Stage, out: Path, *, before: bool = False) -> str:
    """The passkey accuracy table of a checkpoint's weights under ``stage``'s model settings
    (its RoPE scaling), at the stage's ``data.seq_len``, by fact depth, over
    ``STAGE_PASSKEY_EXAMPLES`` prompts (one process), each row with its 95% interval.
    ``before``: the weights are the previous stage's, labelled so, and when the stage scales
    RoPE a first row scores them with plain RoPE (no scaling) too, into ``out/plain_rope``.
    ``passkey.json`` and the heatmap ``passkey.png`` go to ``out``; returns the table and where
    the heatmaps are."""
    from longctx.eval.passkey_check import format_passkey_rows

    recipe = stage.recipe
    owner = f"stage {stage.index if before else stage.index + 1}"
    rope = _rope_words(recipe.model.rope_scaling)
    settings = [(f"{owner}, {rope}" + (" (this stage's)" if before else ""), recipe, out)]
    if before and recipe.model.rope_scaling is not None:
        plain = recipe.model_copy(
            update={"model": recipe.model.model_copy(update={"rope_scaling": None})}
        )
        settings.insert(0, (f"{owner}, plain RoPE (no scaling)", plain, out / "plain_rope"))
    rows, heatmaps = [], []
    for label, settings_recipe, directory in settings:
        result, heatmap = _score_passkey(checkpoint, settings_recipe, directory, stage)
        rows.append((label, result))
        heatmaps.append(_short(heatmap))
    return f"{format_passkey_rows(rows)}\n  heatmap{'s' if len(heatmaps) > 1 else ''}: " + (
        ", ".join(heatmaps)
    )


def _rope_words(scaling: dict | None) -> str:
    """``YaRN x4`` / ``linear x4`` / ``plain RoPE`` for a table row."""
    if scaling is None:
        return "plain RoPE"
    name = {"yarn": "YaRN"}.get(rope_type_of(scaling), rope_type_of(scaling))
    return f"{name} x{scaling['factor']:g}" if "factor" in scaling else name


def _score_passkey(checkpoint: Path, recipe: Recipe, out: Path, stage: Stage) -> tuple[Any, Path]:
    """The passkey grid of ``checkpoint``'s weights in a model built from ``recipe``, written
    to ``out``; returns the result and its heatmap."""
    from longctx.checkpoint.saved_model import load_trained_model, open_checkpoint
    from longctx.eval.passkey_check import DEPTHS
    from longctx.eval.report import EvalPlan, run_eval_suite, write_eval_outputs
    from longctx.trainer.plans import batch_transform_for

    saved = replace(open_checkpoint(checkpoint), recipe=recipe)
    data = recipe.data
    plan = EvalPlan(
        tasks=("passkey",),
        lengths=(data.seq_len,),
        depths=DEPTHS,
        samples=max(1, STAGE_PASSKEY_EXAMPLES // len(DEPTHS)),
        seed=data.seed + 1,
        params=data.task_params,
    )
    with torch.no_grad():
        results = run_eval_suite(
            load_trained_model(saved),
            saved.tokenizer,
            plan,
            None,
            transform=batch_transform_for(recipe),
        )
    meta = {
        "step": saved.step,
        "checkpoint": str(checkpoint),
        "stage": stage.index + 1,
        "rope_scaling": recipe.model.rope_scaling,
    }
    written = write_eval_outputs(results, out, meta)
    return results["passkey"], next(path for path in written if path.suffix == ".png")
