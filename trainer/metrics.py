"""Training metrics: tracker scalars (TensorBoard, wandb) and terminal progress, on rank 0 only.

Scalars (tag names are what tests and dashboards read back):

    train/loss            mean token cross-entropy over the log interval, all ranks
    train/lr              learning rate of the last optimizer step
    train/grad_norm       global gradient norm before clipping, last step (inf when skipped)
    train/tokens_per_s    tokens processed by all ranks per second over the interval
    train/step_time_s     mean wall time of an optimizer step over the interval
    train/peak_memory_gib peak memory of rank 0's process (CUDA: allocated; CPU: resident set)
    train/bad_steps       optimizer steps skipped so far because the gradient was not finite
    eval/loss             token cross-entropy on the held-out split

Phase timings: ``timed_phase(NAME, run_dir)(fn)(...)`` runs ``fn`` and appends one JSON line
``{"phase", "rank", "pid", "start", "end"}`` (Unix seconds) to ``RUN/phases.jsonl`` on every
rank, for the phases whose memory and time matter at scale: ``init`` (the model built and its
weights loaded), ``save`` and ``restore`` of a checkpoint (``bench/checkpoint.py`` reads them).

The terminal gets a rich progress bar when stdout is a terminal, and one concise line per
logged step otherwise (Ray workers, CI logs). Under ``longctx train`` the workers' output goes
to log files, so rank 0's display also writes what it shows as JSON lines to an events file
(``events=``), which the driver follows and replays on its own terminal (``ProgressReplay``).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TextIO, TypeVar

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TRAIN_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "step_time_s": "train/step_time_s",
    "peak_memory_gib": "train/peak_memory_gib",
    "bad_steps": "train/bad_steps",
}
EVAL_TAGS = {"eval_loss": "eval/loss"}
_GIB = 1024**3
PHASES_FILE = "phases.jsonl"


P = ParamSpec("P")
R = TypeVar("R")


def timed_phase(name: str, run_dir: Path) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Wrap a function so that each call appends its wall-clock span, with this process's
    rank, as one JSON line to ``run_dir/phases.jsonl`` (one ``write`` of a short line in
    append mode, so ranks sharing the file do not interleave within a line)."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            start = time.time()
            result = fn(*args, **kwargs)
            rank = dist.get_rank() if dist.is_initialized() else 0
            record = {"phase": name, "rank": rank, "pid": os.getpid(), "start": start}
            line = json.dumps(record | {"end": time.time()}) + "\n"
            with (Path(run_dir) / PHASES_FILE).open("a") as handle:
                handle.write(line)
            return result

        return timed

    return wrap


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far, in GiB: CUDA's peak allocation on a GPU, the peak
    resident set size (Linux reports KiB) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GIB


class Trackers:
    """The one fan-out of scalars and figures to every tracker of ``trainer.trackers``.

    It has the ``SummaryWriter`` calls the trainer and the evaluator make (``add_scalar``,
    ``add_figure``, ``flush``, ``close``) and sends each to TensorBoard (under ``log_dir``) and
    to a wandb run (files under ``log_dir``'s parent ``/wandb``). wandb runs offline unless the
    user chose a mode (``WANDB_MODE``) or set a key (``WANDB_API_KEY``).
    """

    def __init__(
        self,
        log_dir: Path,
        trackers: Sequence[str] = ("tensorboard",),
        resume_step: int | None = None,
        run_name: str = "longctx",
    ):
        self.tensorboard = None
        self.wandb = None
        self._pending: dict[int, dict] = {}  # step -> wandb values not yet logged
        if "tensorboard" in trackers:
            purge = None if resume_step is None else resume_step + 1
            self.tensorboard = SummaryWriter(str(log_dir), purge_step=purge)
        if "wandb" in trackers:
            import wandb

            mode = os.environ.get("WANDB_MODE") or (
                "online" if os.environ.get("WANDB_API_KEY") else "offline"
            )
            directory = log_dir.parent / "wandb"
            directory.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=run_name, dir=str(directory), mode=mode)
            self._image = wandb.Image

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self._pending.setdefault(step, {})[tag] = value

    def add_figure(self, tag: str, figure: Figure, step: int, close: bool = True) -> None:
        if self.wandb is not None:  # before TensorBoard, which closes the figure
            self._pending.setdefault(step, {})[tag] = self._image(figure)
        if self.tensorboard is not None:
            self.tensorboard.add_figure(tag, figure, step, close=close)

    def flush(self, *, last_step_too: bool = False) -> None:
        """Write what is buffered. wandb gets one committed row per step (its steps only go
        forward), so the latest step waits for later values at the same step (the evaluation
        after a step's training scalars) until a later step arrives or the run closes."""
        if self.tensorboard is not None:
            self.tensorboard.flush()
        ready = sorted(self._pending)[: None if last_step_too else -1]
        for step in ready:
            self.wandb.log(self._pending.pop(step), step=step, commit=True)

    def close(self) -> None:
        self.flush(last_step_too=True)
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class MetricsWriter:
    """Writes scalars to the run's trackers (``Trackers``: TensorBoard under ``log_dir``, and
    wandb when ``trackers`` names it) on rank 0; a writer with ``log_dir=None`` (other ranks)
    accepts the same calls and writes nothing.

    ``resume_step``: on resume, events a crashed attempt logged after the checkpoint's step are
    hidden (TensorBoard's ``purge_step``) so the curves do not fold back on themselves.
    """

    def __init__(
        self,
        log_dir: Path | None,
        resume_step: int | None = None,
        trackers: Sequence[str] = ("tensorboard",),
        run_name: str = "longctx",
    ):
        self.writer = None
        if log_dir is not None:
            self.writer = Trackers(log_dir, trackers, resume_step, run_name)

    def write(self, step: int, values: dict[str, float]) -> None:
        """Write each known metric of ``values`` under its tag at ``step``."""
        if self.writer is None:
            return
        for key, value in values.items():
            tag = TRAIN_TAGS.get(key) or EVAL_TAGS.get(key)
            if tag is not None:
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_metrics(step: int, total: int, values: dict[str, float]) -> str:
    """One log line: ``step 20/100 loss 5.4321 lr 1.00e-03 grad_norm 0.812 ...``."""
    parts = [f"step {step}/{total}"]
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4f}")
    if "eval_loss" in values:
        parts.append(f"eval_loss {values['eval_loss']:.4f}")
    if "lr" in values:
        parts.append(f"lr {values['lr']:.2e}")
    if "grad_norm" in values:
        parts.append(f"grad_norm {values['grad_norm']:.3f}")
    if "tokens_per_s" in values:
        parts.append(f"tok/s {values['tokens_per_s']:,.0f}")
    if "step_time_s" in values:
        parts.append(f"step {values['step_time_s'] * 1000:.0f} ms")
    if "peak_memory_gib" in values:
        parts.append(f"mem {values['peak_memory_gib']:.2f} GiB")
    if values.get("bad_steps"):
        parts.append(f"bad_steps {values['bad_steps']:.0f}")
    return " ".join(parts)


class ProgressDisplay:
    """Rank 0's terminal view: a progress bar on a terminal, log lines elsewhere; other ranks
    (``enabled=False``) print nothing.

    ``events`` (a file path): every call is also appended there as one JSON line
    (``{"start", "total"}``, ``{"step", "values"}``, ``{"message"}``) for ``ProgressReplay``.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        *,
        enabled: bool,
        stream: TextIO | None = None,
        events: str | Path | None = None,
    ):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.progress: Progress | None = None
        self.events: TextIO | None = None
        if enabled and events is not None:
            self.events = open(events, "a")  # noqa: SIM115 (closed by close())
            self._event({"start": start_step, "total": total_steps})
        if enabled and self.stream.isatty():
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=Console(file=self.stream),
            )
            self.task = self.progress.add_task("", total=total_steps, completed=start_step)
            self.progress.start()

    def _event(self, record: dict) -> None:
        if self.events is not None:
            self.events.write(json.dumps(record) + "\n")
            self.events.flush()

    def update(self, step: int, values: dict[str, float] | None) -> None:
        """Advance to ``step``; ``values`` (a logged step) also updates the text or prints."""
        if not self.enabled:
            return
        self._event({"step": step, "values": values or {}})
        if self.progress is not None:
            description = format_metrics(step, self.total, values) if values else None
            self.progress.update(self.task, completed=step, description=description)
        elif values:
            print(format_metrics(step, self.total, values), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line that stays on screen (evaluation results, checkpoint paths)."""
        if not self.enabled:
            return
        self._event({"message": text})
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.events is not None:
            self.events.close()
            self.events = None


class ProgressReplay:
    """The driver's end of ``ProgressDisplay(events=...)``: shows each event record on this
    process's terminal through a ``ProgressDisplay`` of its own (a bar on a terminal, step lines
    otherwise). A ``start`` record (a stage, or a group Ray Train restarted) begins a new one."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.display: ProgressDisplay | None = None

    def feed(self, record: dict) -> None:
        if "start" in record:
            self.close()
            self.display = ProgressDisplay(
                int(record["total"]), int(record["start"]), enabled=True, stream=self.stream
            )
        elif "message" in record:
            if self.display is not None:
                self.display.message(str(record["message"]))
            else:
                print(record["message"], file=self.stream, flush=True)
        elif "step" in record and self.display is not None:
            self.display.update(int(record["step"]), record.get("values") or None)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
            self.display = None
