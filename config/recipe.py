"""The recipe: one YAML file that says what to train, on what, how, and on how many ranks.

Each package owns its config model (``ModelConfig``, ``AttentionConfig``, ``PositionalConfig``,
``ParallelConfig``, ``DataConfig``); this module adds ``TrainerConfig`` and composes all of them
into ``Recipe``, whose validators hold only the rules that span packages (RoPE needs an even
head dim, Ulysses needs heads divisible by its degree, the zigzag layout needs a sequence length
divisible by ``2 x sp``, ...). ``load_recipe`` reads the YAML, applies ``--set`` overrides and
turns every mistake into a one-line ``LongctxError`` naming the field, the value and the fix.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from longctx.attention.config import AttentionConfig
from longctx.attention.registry import recipe_problem, sequence_problem
from longctx.config.recipe_errors import check_key_path, single_line, validation_error_line
from longctx.config.stages import StageSpec, check_stage_keys
from longctx.data.config import DataConfig
from longctx.errors import LongctxError
from longctx.model.adapters import AdapterConfig, target_module_problem
from longctx.model.config import ModelConfig
from longctx.parallel.config import ParallelConfig
from longctx.parallel.ulysses import check_ulysses_heads
from longctx.positional.config import PositionalConfig

# ModelConfig fields that fix the shapes of the weights: an hf: checkpoint defines them, and a
# checkpoint saved under one set of values cannot be resumed under another.
SHAPE_FIELDS = (
    "arch",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "attention_bias",
)
# AttentionConfig fields that choose a kernel, not a model: excluded from the recipe hash.
_KERNEL_FIELDS = {"backend", "chunk_size"}


class TrainerConfig(BaseModel):
    """How to optimise: steps, batch, AdamW with warmup + cosine decay, precision, ZeRO stage,
    logging, evaluation and checkpoint cadence. ``run_dir`` defaults to ``runs/<recipe name>``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    run_dir: str | None = Field(None, description="outputs; None means runs/<recipe name>")
    seed: int = Field(0, ge=0)
    steps: int = Field(1000, gt=0, description="optimizer steps")
    micro_batch_size: int = Field(1, gt=0, description="sequences per rank per forward")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(3e-4, gt=0, description="peak learning rate, reached after warmup")
    min_lr: float = Field(3e-5, ge=0, description="floor of the cosine decay")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(
        False,
        description="DeepSpeed ZeRO offload_optimizer: AdamW moments and the fp32 master "
        "partition live in CPU memory and the step runs there (needs zero_stage >= 1)",
    )
    offload_param: bool = Field(
        False,
        description="DeepSpeed ZeRO-3 offload_param: the parameter partitions live in CPU "
        "memory between uses (needs zero_stage: 3)",
    )
    dtype: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = Field(False, description="recompute each layer in backward")
    activation_checkpointing_mode: Literal["selective", "full"] = Field(
        "selective",
        description="selective: keep each layer's attention output (backward recomputes no "
        "attention); full: keep only the layer inputs (one attention forward more per layer, "
        "Hq x head_dim fewer activations per token and layer)",
    )
    tiled_mlp_chunk: int | None = Field(
        None, gt=0, description="tokens per MLP chunk, each recomputed in backward; None = off"
    )
    offload_activations: bool = Field(
        False, description="keep saved activations in CPU memory (matters on GPU)"
    )
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="where rank 0 logs scalars and figures; wandb runs offline unless "
        "WANDB_MODE or WANDB_API_KEY is set (needs the 'tracking' extra)",
    )
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(200, ge=0, description="steps between evaluations; 0 = never")
    eval_batches: int = Field(8, gt=0)
    eval_tasks: list[
        Literal["ppl", "passkey", "niah", "counting", "selective_copy", "flip_flop"]
    ] = Field(
        default_factory=list,
        description="long-context evaluations at each eval step (eval/evaluate.py): "
        "perplexity by position, passkey and multi-key needle accuracy, and answer accuracy "
        "on counting / selective_copy / flip_flop (eval/task_accuracy.py); [] = none",
    )
    eval_lengths: list[Annotated[int, Field(ge=2)]] = Field(
        default_factory=list, description="context lengths of those evaluations; [] = seq_len"
    )
    eval_depths: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0],
        min_length=1,
        description="fact depths (fractions of the context) of the retrieval grid",
    )
    eval_samples: int = Field(2, gt=0, description="retrieval examples per length x depth cell")
    eval_ppl_windows: int = Field(4, gt=0, description="held-out windows per perplexity length")
    eval_ppl_text: Literal["held_out", "long_text"] = Field(
        "held_out",
        description="text the perplexity evaluation scores: 'held_out' = the eval split of the "
        "training corpus; 'long_text' = consecutive windows of all of data.sources' documents "
        "in seeded order (data/long_text.py), for a model that never trained on them "
        "(training-free extension studies of a pretrained checkpoint)",
    )
    passkey_check: bool = Field(
        True,
        description="after a local run that trains on passkey, score passkey prompts in the "
        "driver and print the result (turn off for large models: it runs on one process)",
    )
    ckpt_every: int = Field(500, gt=0, description="steps between checkpoints")
    keep_last: int = Field(3, gt=0, description="checkpoints kept on disk")
    max_bad_steps: int = Field(
        10, gt=0, description="consecutive non-finite steps tolerated before the run stops"
    )
    max_failures: int = Field(0, ge=0, description="worker-group restarts Ray Train may make")

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainerConfig:
        if self.min_lr > self.lr:
            raise ValueError(
                f"min_lr={self.min_lr} is above lr={self.lr}; the cosine decay goes from lr down "
                "to min_lr, so set min_lr <= lr"
            )
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}; "
                f"use at most {self.steps} warmup steps"
            )
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas={list(self.betas)} must each be in [0, 1); e.g. [0.9, 0.95]")
        if "wandb" in self.trackers and importlib.util.find_spec("wandb") is None:
            raise ValueError(
                "trackers includes 'wandb' but the wandb package is not installed; "
                "pip install 'longctx[tracking]' or remove wandb from trainer.trackers"
            )
        if self.offload_optimizer and self.zero_stage < 1:
            raise ValueError(
                f"offload_optimizer needs ZeRO (zero_stage={self.zero_stage}): DeepSpeed offloads "
                "the optimizer partitions of stages 1-3; set zero_stage: 1, 2 or 3"
            )
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(
                f"offload_param needs zero_stage: 3 (got {self.zero_stage}): only ZeRO-3 "
                "partitions the parameters it offloads; set zero_stage: 3"
            )
        if self.activation_checkpointing_mode == "full" and not self.activation_checkpointing:
            raise ValueError(
                "activation_checkpointing_mode: full needs activation_checkpointing: true "
                "(the mode says what a checkpointed layer keeps); set both or drop the mode"
            )
        return self


class Recipe(BaseModel):
    """A whole training run. Every section has defaults, so ``Recipe()`` is a valid (small,
    from-scratch) run; ``model.init: hf:PATH`` takes the shape from a checkpoint's config.json."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name")
    model: ModelConfig = Field(default_factory=ModelConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    positional: PositionalConfig = Field(default_factory=PositionalConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    peft: AdapterConfig | None = Field(
        None,
        description="LoRA / LongLoRA adapters through peft (model/adapters.py); None = full "
        "fine-tuning",
    )
    stages: list[StageSpec] = Field(
        default_factory=list,
        description="train in stages, each a partial recipe laid over this one (e.g. a longer "
        "data.seq_len with a YaRN model.rope_scaling); see config/stages.py; [] = one stage",
    )

    @model_validator(mode="before")
    @classmethod
    def _shape_from_checkpoint(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        check_stage_keys(data.get("stages"))  # one line naming the stage, before pydantic's
        model = data.get("model")
        if isinstance(model, ModelConfig):
            model = model.model_dump(include=model.model_fields_set)
        if isinstance(model, dict) and str(model.get("init", "")).startswith("hf:"):
            data = {**data, "model": merge_checkpoint_shape(model)}
            return with_checkpoint_tokenizer(data, model["init"])
        return data

    @model_validator(mode="after")
    def _check_across_sections(self) -> Recipe:
        model, parallel = self.model, self.parallel
        if self.positional.kind == "rope" and model.dim_per_head % 2:
            raise ValueError(
                f"the head dim is {model.dim_per_head} (model.head_dim or hidden_size / "
                "num_attention_heads), odd, but positional.kind 'rope' rotates pairs of "
                "dimensions; make it even or set positional.kind: none"
            )
        check_ulysses_heads(
            model.num_attention_heads, model.kv_heads, parallel.ulysses, recipe_fields=True
        )
        chunks = 2 * parallel.sp
        if parallel.sp > 1 and self.data.seq_len % chunks:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is not divisible by 2 x parallel.ulysses x "
                f"ring = {chunks} (the zigzag layout cuts a sequence into 2 x sp equal chunks); "
                f"use a multiple of {chunks}, e.g. {-(-self.data.seq_len // chunks) * chunks}"
            )
        # The attention core's own rules; the last layer is windowed whenever any layer is.
        shape = model.attention_shape(model.num_hidden_layers - 1)
        problem = recipe_problem(
            shape, self.attention, self.positional, ulysses=parallel.ulysses, ring=parallel.ring
        )
        if problem is None:
            problem = sequence_problem(self.attention, self.positional, self.data.seq_len)
        if problem is not None:
            raise ValueError(problem)
        if self.adapters is not None:
            problem = target_module_problem(self.adapters, model, self.positional, self.attention)
            if problem is not None:
                raise ValueError(problem)
        tokenizer = self.data.tokenizer
        if tokenizer.path is None and tokenizer.vocab_size > model.vocab_size:
            raise ValueError(
                f"data.tokenizer.vocab_size={tokenizer.vocab_size} exceeds model.vocab_size="
                f"{model.vocab_size}, so token ids would fall outside the embedding; set "
                f"model.vocab_size >= {tokenizer.vocab_size} or lower data.tokenizer.vocab_size"
            )
        if self.trainer.run_dir is None:
            self.trainer.run_dir = f"runs/{self.name}"
        return self

    @model_validator(mode="after")
    def _check_stages(self) -> Recipe:
        if self.stages:
            from longctx.config.stages import stage_recipes

            stage_recipes(self)  # raises a one-line LongctxError naming the first bad stage
        return self

    @property
    def adapters(self) -> AdapterConfig | None:
        """The adapter settings when this recipe trains adapters, None for full fine-tuning."""
        return self.peft if self.peft is not None and self.peft.enabled else None

    def resolved_yaml(self) -> str:
        """The fully resolved recipe (defaults filled, overrides and checkpoint shape applied)
        as YAML; loading it again gives an equal ``Recipe``. A one-stage recipe has no
        ``stages`` key (an explicit ``stages: []`` in a recipe file is refused as a mistake)."""
        unset = ({"stages"} if not self.stages else set()) | (
            {"peft"} if self.peft is None else set()
        )
        resolved = self.model_dump(mode="json", exclude=unset or None)
        return yaml.safe_dump(resolved, sort_keys=False)

    def recipe_hash(self) -> str:
        """16 hex digits identifying the model's shape: the weight-shape fields of the model
        (with derived kv heads and head dim filled in), the position encoding and the attention
        variant. Learning rates, data, parallelism and kernels do not change it, so a checkpoint
        resumes under any of those; a different hash means the weights do not fit."""
        model = self.model.model_dump(include=set(SHAPE_FIELDS))
        model.update(num_key_value_heads=self.model.kv_heads, head_dim=self.model.dim_per_head)
        # Sections other than the model contribute only their non-default values (plus the
        # kind and variant themselves), so adding a field with a default to one of them later
        # leaves the hash of existing recipes, and the resume of their checkpoints, unchanged.
        positional = self.positional.model_dump(mode="json", exclude_defaults=True)
        attention = self.attention.model_dump(
            mode="json", exclude_defaults=True, exclude=_KERNEL_FIELDS
        )
        shape = {
            "model": model,
            "positional": {**positional, "kind": self.positional.kind},
            "attention": {**attention, "variant": self.attention.variant},
        }
        canonical = json.dumps(shape, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def merge_checkpoint_shape(model: dict[str, Any]) -> dict[str, Any]:
    """``model`` section with ``init: hf:PATH`` -> the checkpoint's config.json fields, updated
    with the recipe's own fields. Shape fields the recipe sets to a different value than the
    checkpoint are an error (the weights would not fit); the others (``rope_scaling``,
    ``rope_theta``, ``max_position_embeddings``, ...) override, which is how a context extension
    recipe changes RoPE."""
    init = model["init"]
    directory = Path(init.removeprefix("hf:")).expanduser()
    if not (directory / "config.json").is_file():
        what = "directory does not exist" if not directory.is_dir() else "has no config.json"
        raise LongctxError(
            f"model.init={init!r}: {directory} {what}; point hf: at a Hugging Face checkpoint "
            "directory holding config.json"
        )
    from longctx.model.hf_io import model_config_from_hf

    checkpoint = model_config_from_hf(str(directory))
    explicit = {key: value for key, value in model.items() if key != "init"}
    merged = {**checkpoint.model_dump(), **explicit, "init": init}
    try:
        resolved = ModelConfig.model_validate(merged)
    except ValidationError:
        return merged  # the Recipe's own validation reports it, with the field's path
    conflicts = [
        f"{key}={_shape_value(resolved, key)!r} (checkpoint: {_shape_value(checkpoint, key)!r})"
        for key in SHAPE_FIELDS
        if key in explicit and _shape_value(resolved, key) != _shape_value(checkpoint, key)
    ]
    if conflicts:
        raise LongctxError(
            f"model fields conflict with {directory / 'config.json'}: {', '.join(conflicts)}; "
            "remove them from the recipe (an hf: checkpoint defines the model shape)"
        )
    return merged


def with_checkpoint_tokenizer(data: dict[str, Any], init: str) -> dict[str, Any]:
    """The raw recipe with ``data.tokenizer.path`` pointing at the ``hf:`` checkpoint's
    ``tokenizer.model`` when the checkpoint has one and the recipe names no tokenizer: the
    pretrained embedding rows belong to that tokenizer's ids, so training a new one would
    scramble them."""
    tokenizer_file = Path(init.removeprefix("hf:")).expanduser() / "tokenizer.model"
    section = _explicit_fields(data.get("data"))
    tokenizer = _explicit_fields(section.get("tokenizer"))
    if tokenizer.get("path") is not None or not tokenizer_file.is_file():
        return data
    section["tokenizer"] = {**tokenizer, "path": str(tokenizer_file)}
    return {**data, "data": section}


def _explicit_fields(section: Any) -> dict[str, Any]:
    """A raw recipe section as a dict of the fields it sets (a validated section: the fields
    set on it; anything else, e.g. a missing section: none)."""
    if isinstance(section, BaseModel):
        return section.model_dump(exclude_unset=True)
    return dict(section) if isinstance(section, dict) else {}


def _shape_value(config: ModelConfig, key: str) -> Any:
    if key == "num_key_value_heads":
        return config.kv_heads
    if key == "head_dim":
        return config.dim_per_head
    return getattr(config, key)


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus: ``3e-4`` is a float (YAML 1.2; PyYAML's 1.1 rules read it as
    a string), and a key repeated in one mapping is an error instead of silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                break  # PyYAML's own construct_mapping reports an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader subclass: no object tags


def _yaml_problem(source: Path, error: yaml.YAMLError) -> str:
    """``FILE:LINE:COLUMN: invalid YAML: PROBLEM (CONTEXT); fix ...`` from PyYAML's error."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is None:
        return f"{source}: invalid YAML: {error}"
    context = f" ({error.context})" if getattr(error, "context", None) else ""
    return (
        f"{source}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {error.problem}{context}; "
        f"fix the recipe at line {mark.line + 1}"
    )


def read_recipe_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping of a recipe file; one-line errors for a missing file, a directory,
    non-UTF-8 bytes, YAML syntax (with line and column) and a top level that is not a mapping."""
    source = Path(path)
    if not source.exists():
        where = "" if source.is_absolute() else f" (relative to {Path.cwd()})"
        raise LongctxError(f"recipe file {source} does not exist{where}; check the path")
    if source.is_dir():
        raise LongctxError(f"recipe path {source} is a directory; pass a .yaml recipe file")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LongctxError(
            f"recipe file {source} is not UTF-8 text (byte {error.start}); save it as UTF-8 YAML"
        ) from None
    try:
        raw = _parse_yaml(text)
    except yaml.YAMLError as error:
        raise LongctxError(single_line(_yaml_problem(source, error))) from None
    if raw is None or raw == {}:
        raise LongctxError(
            f"the recipe {source} is empty (no settings, only comments or whitespace); start "
            "from recipes/tiny.yaml"
        )
    if not isinstance(raw, dict):
        raise LongctxError(
            f"{source}: a recipe is a mapping of sections (name, model, data, trainer, ...), "
            f"got a YAML {type(raw).__name__}; write 'section:' lines with 'key: value' below"
        )
    return raw


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` to the raw recipe mapping, in place.

    The value is parsed as YAML, so ``3e-4`` is a float, ``true`` a bool, ``[0.9, 0.99]`` a list
    and ``{rope_type: yarn, factor: 4}`` a mapping; validation happens afterwards with the rest.
    The key path must exist in the schema (keys inside free-form mappings such as
    ``model.rope_scaling`` are free).
    """
    if "=" not in assignment:
        raise LongctxError(
            f"--set {assignment!r} has no '='; write --set section.key=value, "
            "e.g. --set trainer.lr=3e-4"
        )
    key, text = assignment.split("=", 1)
    if not text.strip():
        raise LongctxError(
            f"--set {assignment!r} has an empty value; write a value after '=' (or null to "
            "clear a field that allows it)"
        )
    parts = key.strip().split(".")
    if not all(parts):
        raise LongctxError(
            f"--set {assignment!r} has an empty key part in {key!r}; write dotted names such "
            "as trainer.lr"
        )
    try:
        check_key_path(Recipe, parts)
        value = _parse_yaml(text)
    except LongctxError as error:
        raise LongctxError(f"--set {assignment}: {error}") from None
    except yaml.YAMLError as error:
        raise LongctxError(
            single_line(f"--set {assignment}: the value is not valid YAML ({error}); quote it")
        ) from None
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise LongctxError(
                f"--set {assignment}: '{'.'.join(parts[: depth + 1])}' is {child!r} in the "
                "recipe, not a section; fix the recipe or set that key itself"
            )
        node = child
    node[parts[-1]] = value


def parse_recipe(raw: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate a raw recipe mapping; any problem becomes a one-line ``LongctxError`` prefixed
    with ``source`` (the file name) when given."""
    prefix = f"{source}: " if source else ""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        raise LongctxError(prefix + single_line(validation_error_line(Recipe, error))) from None
    except LongctxError as error:
        raise LongctxError(prefix + single_line(str(error))) from None


def load_recipe(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides in order, and validate it.

    ``name`` defaults to the file's stem (``recipes/tiny.yaml`` -> ``tiny``). The file is only
    read, never written.
    """
    raw = read_recipe_file(path)
    if raw.get("stages", None) == []:
        raise LongctxError(
            f"{path}: stages is an empty list; remove the stages key for a one-stage run or "
            "list at least one stage"
        )
    for assignment in overrides:
        apply_override(raw, assignment)
    raw.setdefault("name", Path(path).stem)
    return parse_recipe(raw, source=str(path))
