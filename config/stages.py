"""Staged recipes: one run that trains in stages, e.g. a short-context stage, then a context
extension at 4x the length with YaRN and ring attention.

A recipe's ``stages:`` list holds partial recipes; stage ``i``'s effective recipe is the
recipe's own sections with stage ``i``'s values laid over them (``stage_recipes``). A stage may
change what is safe to change between two trainings of the same weights (``STAGE_FIELDS``):
sequence length and task mix, RoPE (``model.rope_scaling``, ``rope_theta``,
``max_position_embeddings``), the parallel degrees, the kernel settings, steps, the optimizer,
the evaluation, and the adapters (``peft``: switched on or off, or their settings). It may not change the model's shape (``SHAPE_FIELDS``), the position
encoding or attention variant, the tokenizer, precision or ZeRO stage. Every stage's recipe is
validated when the recipe is loaded, and sequence lengths may not decrease from one stage to the
next; every problem is one ``LongctxError`` line naming the stage.

Steps. ``trainer.steps`` of a stage counts that stage's own steps; the run's step counter is
global (stage ``i`` covers steps ``start_step + 1 .. end_step``), so TensorBoard curves, the
checkpoint names and ``--resume`` all speak of one run.

Boundaries. The last step of every stage is checkpointed. The next stage builds its model under
its own settings, loads the previous stage's final weights (``checkpoint.saved_model.
build_model``: one tensor at a time, under ZeRO-3 only each rank's partitions) and trains them with a *fresh* optimizer and a fresh
warmup + cosine LR schedule over its own steps: the Adam moments and LR schedule of a stage at
another length and scaling are not carried over (the extension recipes restart them). Its data loaders start from the beginning of the stage's data.

Resume (``longctx.trainer.stages``). A checkpoint's step says which stage wrote it (``stage_of_step``): a step inside a
stage resumes that stage exactly (optimizer, schedule, data position, RNG), a stage's last step
starts the next stage from its weights. The run directory records the plan in
``RUN/stages.json`` (each stage's index, name, step range and sequence length, and the stage
being trained), and a resume whose recipe moved a boundary that the run already crossed is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from longctx.config.recipe_errors import single_line, validation_error_line
from longctx.errors import LongctxError

if TYPE_CHECKING:
    from longctx.config.recipe import Recipe

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
    # Adapters may start or stop at a stage boundary (a LongLoRA stage after a full one, or
    # the reverse): the weights the next stage starts from are always the merged model.
    "peft": frozenset({"enabled", "rank", "alpha", "dropout", "target_modules", "trainable"}),
}
STAGE_NAME_KEY = "name"


class StageSpec(BaseModel):
    """One entry of a recipe's ``stages:``: an optional name and, per section, the fields the
    stage lays over the recipe (only those ``STAGE_FIELDS`` allows; ``check_stage_keys`` refuses
    the rest before this model is built, with a one-line message naming the stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, description="the stage's name in logs; default stageN")
    model: dict[str, Any] = Field(default_factory=dict)
    attention: dict[str, Any] = Field(default_factory=dict)
    parallel: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    trainer: dict[str, Any] = Field(default_factory=dict)
    peft: dict[str, Any] = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _as_written(self, handler: Any) -> dict[str, Any]:
        """Only what the stage sets, as a recipe file would spell it (round-trips)."""
        return {key: value for key, value in handler(self).items() if value not in (None, {})}

    def overrides(self) -> dict[str, dict[str, Any]]:
        """``{section: {field: value}}`` of the sections the stage sets."""
        return {
            section: dict(values) for section in STAGE_FIELDS if (values := getattr(self, section))
        }

    def label(self, index: int) -> str:
        """The stage's name, or ``stage{index + 1}``."""
        return self.name if self.name is not None else f"stage{index + 1}"


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


def _where(index: int, raw: Any) -> str:
    if isinstance(raw, StageSpec):
        raw = raw.model_dump()
    name = raw.get(STAGE_NAME_KEY) if isinstance(raw, dict) else None
    return f"stages[{index}]" + (f" ({name!r})" if name is not None else "")


def check_stage_keys(stages: Any) -> None:
    """Refuse, in one line naming the stage, a ``stages:`` entry that is not a mapping or that
    sets a field a stage may not change (``Recipe`` runs it on the raw recipe, before pydantic
    builds the ``StageSpec`` models)."""
    if not isinstance(stages, list):
        return  # pydantic reports a stages value that is not a list
    for index, raw in enumerate(stages):
        if not isinstance(raw, StageSpec):
            _check_stage_keys(index, raw)


def _check_stage_keys(index: int, raw: Any) -> None:
    """Refuse a stage that is not a mapping, or that sets a field a stage may not change."""
    from longctx.config.recipe import SHAPE_FIELDS

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


def _merged(base: dict[str, Any], stage: StageSpec) -> dict[str, Any]:
    """The recipe mapping with the stage's fields laid over its sections (one level deep: a
    stage's ``model.rope_scaling`` replaces the whole dict, as ``--set`` would)."""
    merged = {key: value for key, value in base.items() if key != "stages"}
    for section, values in stage.overrides().items():
        merged[section] = {**(merged.get(section) or {}), **values}
    return merged


def stage_recipes(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """``(name, effective recipe)`` of every stage, validated; one-line ``LongctxError`` for
    the first bad stage (a field it may not set, a recipe that does not validate, a sequence
    length below the previous stage's). The fields a stage may set leave ``recipe_hash``
    unchanged, so every stage's checkpoints fit every other stage's model."""
    from longctx.config.recipe import Recipe

    base = recipe.model_dump(mode="json")
    resolved: list[tuple[str, Recipe]] = []
    for index, spec in enumerate(recipe.stages):
        where = _where(index, spec)
        try:
            stage = Recipe.model_validate(_merged(base, spec))
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
        resolved.append((spec.label(index), stage))
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
