"""Staged recipes: one run that trains in stages, e.g. a short-context stage, then a context
extension at 4x the length with YaRN and ring attention.

A recipe's ``stages:`` list holds partial recipes; stage ``i``'s effective recipe is the
recipe's own sections with stage ``i``'s values laid over them (``stage_recipes``). A stage may
change what is safe to change between two trainings of the same weights (``STAGE_FIELDS``):
sequence length and task mix, RoPE (``model.rope_scaling``, ``rope_theta``,
``max_position_embeddings``), the parallel degrees, the kernel settings, steps, the optimizer
and the evaluation. It may not change the model's shape (``SHAPE_FIELDS``), the position
encoding or attention variant, the tokenizer, precision or ZeRO stage. Every stage's recipe is
validated when the recipe is loaded, and sequence lengths may not decrease from one stage to the
next; every problem is one ``LongctxError`` line naming the stage.

Steps. ``trainer.steps`` of a stage counts that stage's own steps; the run's step counter is
global (stage ``i`` covers steps ``start_step + 1 .. end_step``), so TensorBoard curves, the
checkpoint names and ``--resume`` all speak of one run.

Boundaries. The last step of every stage is checkpointed. The next stage builds its model under
its own settings, loads the previous stage's final full weights
(``checkpoint.load_model_state_dict``) and trains them with a *fresh* optimizer and a fresh
warmup + cosine LR schedule over its own steps: the Adam moments and LR schedule of a stage at
another length and scaling are not carried over (the extension recipes restart them). Its data loaders start from the beginning of the stage's data.

Resume. A checkpoint's step says which stage wrote it (``stage_of_step``): a step inside a
stage resumes that stage exactly (optimizer, schedule, data position, RNG), a stage's last step
starts the next stage from its weights. The run directory records the plan in
``RUN/stages.json`` (each stage's index, name, step range and sequence length, and the stage
being trained), and a resume whose recipe moved a boundary that the run already crossed is
refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from longctx.errors import LongctxError
from longctx.trainer.checkpoint import MANIFEST_FILE, resolve_checkpoint, write_atomic
from longctx.trainer.recipe_errors import single_line, validation_error_line

if TYPE_CHECKING:
    from longctx.trainer.config import Recipe

STAGES_FILE = "stages.json"
# What a stage may set, per section. Everything else is fixed for the whole run: the model's
# shape and encoding (the weights must fit every stage), the tokenizer (token ids must mean the
# same), precision and ZeRO stage (one DeepSpeed layout per run), the run directory and seeds.
STAGE_FIELDS: dict[str, frozenset[str]] = {
    "model": frozenset({"rope_scaling", "rope_theta", "max_position_embeddings"}),
    "attention": frozenset({"backend", "chunk_size"}),
    "parallel": frozenset({"dp", "ulysses", "ring"}),
    "data": frozenset({"seq_len", "tasks", "task_params", "task_length_range", "seed"}),
    "trainer": frozenset(
        {
            "steps",
            "lr",
            "min_lr",
            "warmup_steps",
            "weight_decay",
            "betas",
            "grad_clip",
            "micro_batch_size",
            "grad_accum",
            "activation_checkpointing",
            "log_every",
            "eval_every",
            "eval_batches",
            "eval_tasks",
            "eval_lengths",
            "eval_depths",
            "eval_samples",
            "eval_ppl_windows",
            "ckpt_every",
        }
    ),
}
STAGE_NAME_KEY = "name"


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its position in the plan, its global step range and its effective
    recipe (no ``stages``; ``recipe.trainer.steps`` is the stage's own step count)."""

    index: int
    count: int
    name: str
    start_step: int
    recipe: Recipe

    @property
    def end_step(self) -> int:
        """The global step at which the stage ends (its last step, checkpointed)."""
        return self.start_step + self.recipe.trainer.steps

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    def label(self) -> str:
        """``stage 2/2 'extend'`` for logs (``stage 1/1`` for a recipe without stages)."""
        return f"stage {self.index + 1}/{self.count} {self.name!r}"

    def record(self) -> dict[str, Any]:
        """What ``RUN/stages.json`` keeps of the stage."""
        return {
            "index": self.index,
            "name": self.name,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "seq_len": self.recipe.data.seq_len,
        }


def _stage_name(index: int, raw: dict[str, Any]) -> str:
    return str(raw.get(STAGE_NAME_KEY, f"stage{index + 1}"))


def _where(index: int, raw: Any) -> str:
    name = raw.get(STAGE_NAME_KEY) if isinstance(raw, dict) else None
    return f"stages[{index}]" + (f" ({name!r})" if name is not None else "")


def _check_stage_keys(index: int, raw: Any) -> None:
    """Refuse a stage that is not a mapping, or that sets a field a stage may not change."""
    from longctx.trainer.config import SHAPE_FIELDS

    where = _where(index, raw)
    if not isinstance(raw, dict):
        raise LongctxError(
            f"{where} is {raw!r}, not a mapping; write each stage as sections to override, "
            "e.g. {name: extend, data: {seq_len: 1024}, trainer: {steps: 200}}"
        )
    for section, values in raw.items():
        if section == STAGE_NAME_KEY:
            continue
        allowed = STAGE_FIELDS.get(section)
        if allowed is None:
            raise LongctxError(
                f"{where}: section {section!r} cannot change per stage; a stage may set "
                f"{STAGE_NAME_KEY!r} and fields of {', '.join(STAGE_FIELDS)}"
            )
        if not isinstance(values, dict):
            raise LongctxError(
                f"{where}: {section} is {values!r}, not a mapping of fields; write "
                f"{section}: {{FIELD: VALUE}}"
            )
        for key in values:
            if section == "model" and key in SHAPE_FIELDS:
                raise LongctxError(
                    f"{where}: model.{key} cannot change per stage: it fixes the shape of the "
                    "weights every stage trains; set it once in the recipe's model section"
                )
            if key not in allowed:
                raise LongctxError(
                    f"{where}: {section}.{key} cannot change per stage; a stage may set "
                    f"{section}.{{{', '.join(sorted(allowed))}}}"
                )


def _merged(base: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """The recipe mapping with the stage's fields laid over its sections (one level deep: a
    stage's ``model.rope_scaling`` replaces the whole dict, as ``--set`` would)."""
    merged = {key: value for key, value in base.items() if key != "stages"}
    for section, values in raw.items():
        if section != STAGE_NAME_KEY:
            merged[section] = {**merged[section], **values}
    return merged


def stage_recipes(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """``(name, effective recipe)`` of every stage, validated; one-line ``LongctxError`` for
    the first bad stage (a field it may not set, a recipe that does not validate, a sequence
    length below the previous stage's). The fields a stage may set leave ``recipe_hash``
    unchanged, so every stage's checkpoints fit every other stage's model."""
    from longctx.trainer.config import Recipe

    base = recipe.model_dump(mode="json")
    resolved: list[tuple[str, Recipe]] = []
    for index, raw in enumerate(recipe.stages):
        _check_stage_keys(index, raw)
        where = _where(index, raw)
        try:
            stage = Recipe.model_validate(_merged(base, raw))
        except ValidationError as error:
            raise LongctxError(
                single_line(f"{where}: {validation_error_line(Recipe, error)}")
            ) from None
        except LongctxError as error:
            raise LongctxError(single_line(f"{where}: {error}")) from None
        if resolved and stage.data.seq_len < resolved[-1][1].data.seq_len:
            previous = resolved[-1][1].data.seq_len
            raise LongctxError(
                f"{where}: data.seq_len={stage.data.seq_len} is shorter than the previous "
                f"stage's {previous}; stages extend the context, so use data.seq_len >= "
                f"{previous} or reorder the stages"
            )
        resolved.append((_stage_name(index, raw), stage))
    return resolved


def plan_stages(recipe: Recipe) -> list[Stage]:
    """The stages of a run in order, with global step ranges. A recipe without ``stages`` is
    one stage: the recipe itself, steps ``1..trainer.steps``."""
    if not recipe.stages:
        return [Stage(0, 1, recipe.name, 0, recipe)]
    stages, start = [], 0
    named = stage_recipes(recipe)
    for index, (name, stage_recipe) in enumerate(named):
        stages.append(Stage(index, len(named), name, start, stage_recipe))
        start += stage_recipe.trainer.steps
    return stages


def stage_of_step(stages: list[Stage], step: int) -> Stage:
    """The stage that wrote the checkpoint of global step ``step``: the one whose range
    ``start_step < step <= end_step`` holds it (the first for step 0, the last beyond the end)."""
    for stage in stages:
        if step <= stage.end_step:
            return stage
    return stages[-1]


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


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's manifest as JSON, unverified (callers verify the checkpoint first, or
    only look for which stage it belongs to)."""
    return json.loads((Path(checkpoint) / MANIFEST_FILE).read_text())


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
