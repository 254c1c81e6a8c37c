"""``longctx train``: run a validated recipe on Ray Train workers, then say where its outputs are.

The driver (this module) rejects every bad input it can see before a worker starts, with the
one-line ``LongctxError`` the CLI turns into exit code 2: the world layout against ``--workers``,
the run directory and ``--resume`` target (``trainer.run_dir.validate_run``, the same check each
worker repeats), and the CPUs Ray has (``launch.ray_cluster``). Then Ray Train runs the workers
(``launch.ray_train``) and, at the end, the driver prints the loss curve's ends and where the
checkpoints and TensorBoard logs are.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from longctx.launch.ray_cluster import ray_cluster
from longctx.launch.ray_train import fit_on_ray, new_launch_id
from longctx.trainer.checkpoint import CHECKPOINTS_DIR
from longctx.trainer.run_dir import TENSORBOARD_DIR, validate_run

if TYPE_CHECKING:
    from longctx.trainer.config import Recipe

TRAINING_FAILED = 1
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
# Prompts scored by the passkey check at the end of a local run that trains on passkey.
PASSKEY_EXAMPLES = 50


def failure_line(error: BaseException) -> str:
    """One line for a failed run: the first failing rank and the last line of its error (the
    exception type and message; the full tracebacks were already printed by the workers)."""
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
) -> None:
    """The end of a run on the terminal: steps, loss from first to last logged step, the
    evaluation loss, the passkey check's line (when made), and where the checkpoints and
    TensorBoard logs are."""
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
    console.print(f"  continue:     {next_command}")


def continue_command(args: argparse.Namespace, steps: int) -> str:
    """The command that continues this run for as many steps again: the same recipe, overrides,
    workers and address, ``--resume latest`` and ``trainer.steps`` doubled."""
    words = ["longctx", "train", args.recipe]
    for assignment in args.set:
        if assignment.split("=", 1)[0].strip() != "trainer.steps":
            words += ["--set", assignment]
    if args.workers is not None:
        words += ["--workers", str(args.workers)]
    if args.address is not None:
        words += ["--address", args.address]
    words += ["--resume", "latest", "--set", f"trainer.steps={2 * steps}"]
    return shlex.join(words)


def run_training(recipe: Recipe, args: argparse.Namespace) -> int:
    """``longctx train`` after the recipe is loaded: validate, train on Ray, report.

    ``args``: ``recipe`` (its path), ``set`` (the overrides), ``workers`` (None: the recipe's
    layout), ``address`` (None: embedded Ray), ``resume`` (None, ``latest`` or a path). Returns
    the exit code: 0 when training finished, 1 when the workers failed more often than
    ``trainer.max_failures`` allows, 130 on Ctrl-C. Bad input raises ``LongctxError`` before
    anything starts.
    """
    from longctx.trainer.worker import check_layout

    started = time.monotonic()
    layout = recipe.parallel.resolve(args.workers)
    recipe = recipe.model_copy(update={"parallel": layout})
    check_layout(recipe, layout.world)
    run_dir = Path(recipe.trainer.run_dir).resolve()
    validate_run(recipe, run_dir, args.resume)
    launch_id = new_launch_id()
    job = {
        "recipe": recipe.model_dump(mode="json"),
        "run_dir": str(run_dir),
        "resume": args.resume,
        "launch_id": launch_id,
    }
    console = Console(highlight=False, soft_wrap=True)
    with ray_cluster(args.address, layout.world) as resources:
        console.print(f"longctx: training '{recipe.name}' on {layout.describe()}")
        console.print(f"  workers:  {resources.description}")
        console.print(f"  run dir:  {_short(run_dir)}")
        try:
            run = fit_on_ray(
                job,
                resources,
                launch_id=launch_id,
                max_failures=recipe.trainer.max_failures,
                workdir=os.getcwd() if args.address is None else None,
            )
        except KeyboardInterrupt:
            console.print(f"interrupted; continue with --resume latest ({_short(run_dir)})")
            return INTERRUPTED
        except Exception as error:
            if not _is_training_failure(error):
                raise
            console.print(f"error: {failure_line(error)}")
            console.print(
                "  (the workers' tracebacks are above; checkpoints so far are in "
                f"{_short(run_dir / CHECKPOINTS_DIR)}, continue with --resume latest)"
            )
            return TRAINING_FAILED
    passkey = None
    if recipe.data.active_tasks().get("passkey") and args.address is None:
        # A local run's final weights fit this machine; on a cluster they may not fit the driver.
        from longctx.launch.passkey_check import passkey_line

        passkey = passkey_line(run.summary["checkpoint"], PASSKEY_EXAMPLES)
    print_outcome(
        console,
        run_dir,
        run.summary,
        time.monotonic() - started,
        continue_command(args, run.summary["step"]),
        passkey,
    )
    return 0
