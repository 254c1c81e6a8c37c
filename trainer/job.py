"""``TrainJob``: what the driver hands to every rank's ``train_worker``.

The launcher (``launch/train.py``) builds one per stage launch and Ray Train pickles it to each
worker (``launch/ray_train.py``); a worker restarted by Ray Train gets a copy with ``resume`` set
to the launch's newest checkpoint. A plain ``python`` call (the tests' killed-process runs) may
pass the JSON form instead, ``TrainJob.to_dict()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from longctx.config.recipe import Recipe


@dataclass(frozen=True)
class TrainJob:
    """One launch of a run on every rank.

    ``recipe``: the whole recipe (every stage; ``parallel.dp`` resolved for an unstaged run);
    ``run_dir``: the run directory (absolute on the driver); ``resume``: None (a fresh run),
    ``"latest"`` or a checkpoint path; ``launch_id``: this invocation's id (see
    ``run_dir.validate_run``), None outside the launcher; ``last_stage``: the index of the last
    stage this launch may train (None: no limit); ``events``: where rank 0 appends its progress
    as JSON lines for the driver's terminal (``metrics.ProgressReplay``; None: it only prints). The stage a worker trains, and so the global
    step its loop ends at (``Stage.end_step``), follow from the resume point
    (``trainer.stages.resume_point``).
    """

    recipe: Recipe
    run_dir: str
    resume: str | None = None
    launch_id: str | None = None
    last_stage: int | None = None
    events: str | None = None

    @classmethod
    def coerce(cls, job: TrainJob | dict[str, Any]) -> TrainJob:
        """``job`` itself, or the job its JSON form (``to_dict``) describes."""
        if isinstance(job, TrainJob):
            return job
        fields = dict(job)
        return cls(**{**fields, "recipe": Recipe.model_validate(fields["recipe"])})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the recipe as ``Recipe.model_dump(mode="json")``."""
        return {**asdict(self), "recipe": self.recipe.model_dump(mode="json")}

    def resuming(self, checkpoint: str | Path) -> TrainJob:
        """The same job continuing from ``checkpoint``."""
        return replace(self, resume=str(checkpoint))

    def for_stage(self, index: int) -> TrainJob:
        """The same job, allowed to train up to stage ``index``."""
        return replace(self, last_stage=index)
