"""Where a staged run resumes, and the record of its plan in the run directory.

The stages themselves (``Stage``, ``plan_stages``, ``stage_of_step``, what a stage may change)
are part of the recipe: ``longctx.config.stages``. This module decides, from a run directory
and ``--resume``, which stage to train and from which checkpoint (``resume_point``), and keeps
``RUN/stages.json`` so that a resume whose recipe moved a boundary the run already crossed is
refused (``check_stage_record``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from longctx.checkpoint.store import (
    CHECKPOINTS_DIR,
    checkpoint_tag,
    read_manifest,
    resolve_checkpoint,
    write_atomic,
)
from longctx.config.stages import Stage, stage_of_step
from longctx.errors import LongctxError

STAGES_FILE = "stages.json"


@dataclass(frozen=True)
class ResumePoint:
    """Where a launch starts: ``stage`` is the stage to train; ``checkpoint`` is None (a fresh
    run), a checkpoint inside ``stage`` (exact resume, ``new_stage`` False), or the last
    checkpoint of the previous stage (``new_stage`` True: its weights, a fresh optimizer);
    ``checkpoint_stage`` is the stage that wrote the checkpoint (the one to verify it against)."""

    stage: Stage
    checkpoint: Path | None
    checkpoint_stage: Stage
    new_stage: bool

    @property
    def resumes_exactly(self) -> bool:
        return self.checkpoint is not None and not self.new_stage


def checkpoint_step(checkpoint: Path) -> int | None:
    """The step in a checkpoint's manifest, or None when it cannot be read (``validate_run``
    then reports the damage in its own words)."""
    try:
        return int(read_manifest(checkpoint)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_point(stages: list[Stage], run_dir: str | Path, resume: str | None) -> ResumePoint:
    """Which stage a launch with ``--resume resume`` trains, and from what. Reads the disk only;
    ``validate_run`` (with ``point.checkpoint_stage.recipe``) makes the full checks."""
    if resume is None:
        return ResumePoint(stages[0], None, stages[0], new_stage=True)
    checkpoint = resolve_checkpoint(run_dir, resume)
    step = checkpoint_step(checkpoint)
    owner = stage_of_step(stages, 0 if step is None else step)
    if step == owner.end_step and not owner.is_last:
        return ResumePoint(stages[owner.index + 1], checkpoint, owner, new_stage=True)
    return ResumePoint(owner, checkpoint, owner, new_stage=False)


def stage_start_checkpoint(stages: list[Stage], stage: Stage, run_dir: str | Path) -> Path | None:
    """The checkpoint whose weights ``stage`` starts from: the previous stage's final one, None
    for the first stage (the recipe's ``model.init``). It is the frozen base of an adapter
    stage."""
    if stage.index == 0:
        return None
    previous = stages[stage.index - 1]
    return Path(run_dir) / CHECKPOINTS_DIR / checkpoint_tag(previous.end_step)


def check_stage_record(stages: list[Stage], run_dir: str | Path, point: ResumePoint) -> None:
    """Refuse a resume whose recipe moved a stage boundary the run has already passed, so that
    the checkpoint's step would name another stage than the one that wrote it
    (``RUN/stages.json`` says which did): the stages before it must keep their step ranges,
    and its own stage its start and at least the checkpoint's step (it may be lengthened)."""
    path = Path(run_dir) / STAGES_FILE
    if point.checkpoint is None or not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())["stages"]
        ranges = [(int(was["start_step"]), int(was["end_step"])) for was in recorded]
    except (ValueError, KeyError, TypeError):
        raise LongctxError(
            f"{path} is damaged (not the stage record longctx writes); delete it to resume "
            "with the recipe's stages as they are"
        ) from None
    step = checkpoint_step(point.checkpoint)
    writer = next(
        (i for i, (lo, hi) in enumerate(ranges) if step is not None and lo < step <= hi), None
    )
    if writer is None or writer >= len(stages):
        return
    for stage in stages[: writer + 1]:
        start, end = ranges[stage.index]
        moved = stage.start_step != start or (
            stage.end_step != end if stage.index < writer else stage.end_step < step
        )
        if moved:
            raise LongctxError(
                f"{stage.label()} covered steps {start}-{end} when {point.checkpoint} (step "
                f"{step}, stage {writer + 1}) was trained but the recipe now says "
                f"{stage.start_step}-{stage.end_step}; restore the trainer.steps of the stages "
                "the run has finished"
            )


def write_stage_record(stages: list[Stage], run_dir: str | Path, current: Stage) -> None:
    """``RUN/stages.json``: every stage's range and the one now being trained (rank 0)."""
    record = {"current": current.index, "stages": [stage.record() for stage in stages]}
    write_atomic(Path(run_dir) / STAGES_FILE, json.dumps(record, indent=1) + "\n")
